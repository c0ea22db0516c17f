"""One-pass OPT curves (Mattson's priority stack) against the plain OPT simulations at every capacity:
cache.simulate (vectorised per token) and the per-row Python-set simulator of test_analysis_cache."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_synth import synth, write_synth_trace
from hypothesis import given, settings
from hypothesis import strategies as st
from test_analysis_cache import plain

from gguf_experts.analysis.cache.cache import simulate
from gguf_experts.analysis.cache.opt import opt_curves, opt_histograms
from gguf_experts.errors import InputError
from gguf_experts.gguf.reader import open_model
from gguf_experts.gguf.layout import expert_bytes

KEY = ["layer", "capacity"]
COLS = ["layer", "policy", "capacity", "accesses", "hits", "bytes_fetched"]


def assert_equals_simulate(layer, experts, n_layer, n_expert, sizes=None) -> pd.DataFrame:
    """Every capacity 1..n_expert, every layer and 'all': hits, accesses and bytes identical."""
    got = opt_curves(layer, experts, n_layer, n_expert, expert_bytes=sizes)
    want = simulate(layer, experts, n_layer, n_expert, "opt", range(1, n_expert + 1), expert_bytes=sizes)
    a = got.sort_values(KEY).reset_index(drop=True)[COLS]
    b = want.sort_values(KEY).reset_index(drop=True)[COLS]
    assert len(a) == (len(np.unique(layer)) + 1) * n_expert
    pd.testing.assert_frame_equal(a, b, check_dtype=False)
    return got


def _trace(seed: int, n_layer: int, m: int, k: int, rows: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of k distinct experts; layers interleaved unevenly (streams of different lengths, maybe absent).
    mode: 'uniform' subsets, 'zipf' skewed, 'repeat' a few rows over and over (ties of next use: the
    experts of one repeated row are all next used together, broken by id)."""
    rng = np.random.default_rng(seed)
    layer = rng.choice(n_layer, size=rows, p=rng.dirichlet(np.ones(n_layer)))
    if mode == "zipf":
        w = 1.0 / np.arange(1, m + 1) ** 1.5
        ex = np.stack([rng.choice(m, k, replace=False, p=w / w.sum()) for _ in range(rows)])
    elif mode == "repeat":
        pats = np.stack([rng.permutation(m)[:k] for _ in range(3)])
        ex = pats[rng.integers(0, len(pats), rows)]
    else:
        ex = np.argsort(rng.random((rows, m)), axis=1)[:, :k]
    return layer.astype(np.int32), ex.astype(np.int16)


@pytest.mark.parametrize("skew", [0.0, 3.0])
def test_opt_curve_equals_simulate_and_plain_at_every_capacity(skew):
    d = synth(n_layer=3, n_expert=16, k=4, n_seq=2, prompt=6, gen=30, skew=skew, seed=5 + int(skew))
    sizes = np.arange(1, 17)[None, :] * np.array([[1], [10], [100]])
    cur = assert_equals_simulate(d["layer"], d["experts"], 3, 16, sizes)
    for l in range(3):
        rows = d["experts"][d["layer"] == l].tolist()
        for c in range(1, 17):
            got = cur[(cur.layer == str(l)) & (cur.capacity == c)].iloc[0]
            assert (got.hits, got.bytes_fetched) == plain(rows, c, "opt", {e: int(sizes[l, e]) for e in range(16)})


@pytest.mark.parametrize("m,k", [(1, 1), (5, 1), (9, 1), (4, 4), (7, 7), (6, 5)])
@pytest.mark.parametrize("mode", ["uniform", "zipf", "repeat"])
def test_opt_curve_edge_shapes(m, k, mode):
    """k = 1 (classic single-request OPT stack), k = n_expert (every row requests everything), k = n - 1."""
    layer, ex = _trace(m * 10 + k, 2, m, k, 60, mode)
    cur = assert_equals_simulate(layer, ex, 2, m)
    if k == m:  # only the first row of each layer misses, at every capacity >= k; below k every row misses
        full = cur[(cur.layer != "all") & (cur.capacity == m)]
        assert ((full.accesses - full.hits) == m).all()


@pytest.mark.parametrize("mode", ["uniform", "zipf"])
def test_opt_curve_many_experts(mode):
    """Deep stacks (96 experts, top-6): the carries run over long prefixes of positions."""
    layer, ex = _trace(17, 2, 96, 6, 300, mode)
    assert_equals_simulate(layer, ex, 2, 96, np.random.default_rng(1).integers(1, 50, (2, 96)))


def test_opt_curve_ties_and_repeated_tokens():
    """Experts next used at the same row (or never again) tie and the lower id must stay. Which one stays
    never changes the hit count (both are next requested together), only the bytes fetched: sizes differ."""
    rows = [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4, 5], [5, 4], [3, 2], [3, 2], [3, 2], [1, 0], [6, 7]]
    ex = np.array(rows * 3, np.int16)
    layer = np.zeros(len(ex), np.int32)
    sizes = 1 + 10 * np.arange(8)[None, :]
    cur = assert_equals_simulate(layer, ex, 1, 8, sizes)
    for c in range(1, 9):
        got = cur[(cur.layer == "0") & (cur.capacity == c)].iloc[0]
        assert (got.hits, got.bytes_fetched) == plain(ex.tolist(), c, "opt", {e: 1 + 10 * e for e in range(8)})


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 100_000), n_layer=st.integers(1, 3), m=st.integers(1, 12), k=st.integers(1, 12),
       rows=st.integers(1, 80), mode=st.sampled_from(["uniform", "zipf", "repeat"]))
def test_opt_curve_property(seed, n_layer, m, k, rows, mode):
    k = min(k, m)
    layer, ex = _trace(seed, n_layer, m, k, rows, mode)
    sizes = np.random.default_rng(seed).integers(1, 1000, (n_layer, m))
    assert_equals_simulate(layer, ex, n_layer, m, sizes)


def test_opt_dominates_lru_and_histogram_totals():
    d = synth(n_layer=2, n_expert=32, k=4, n_seq=2, prompt=8, gen=60, skew=1.5, seed=3)
    hist, byte_hist, layers = opt_histograms(d["layer"], d["experts"], 2, 32)
    assert hist.sum() == d["experts"].size and byte_hist.sum() == d["experts"].size
    assert layers.tolist() == [0, 1]
    opt = opt_curves(d["layer"], d["experts"], 2, 32).set_index(KEY).sort_index()
    lru = simulate(d["layer"], d["experts"], 2, 32, "lru", range(1, 33)).set_index(KEY).sort_index()
    assert (opt.hits >= lru.hits).all() and (opt.hits > lru.hits).any()
    sel = opt_curves(d["layer"], d["experts"], 2, 32, capacities=[3, 7]).set_index(KEY).sort_index()
    assert (sel.hits == opt.loc[sel.index, "hits"]).all()


def test_opt_curve_errors():
    d = synth(n_layer=1, n_expert=8, k=2, n_seq=1, prompt=2, gen=20, skew=1.0, seed=1)
    bad = d["experts"].copy()
    bad[5, 1] = bad[5, 0]
    with pytest.raises(InputError, match="twice"):
        opt_curves(d["layer"], bad, 1, 8)
    with pytest.raises(InputError, match="capacity"):
        opt_curves(d["layer"], d["experts"], 1, 8, capacities=[0, 3])
    with pytest.raises(InputError, match="expert id"):
        opt_curves(d["layer"], d["experts"], 1, 4)


@pytest.fixture
def cli_trace(tmp_path: Path, small_moe) -> tuple[Path, Path, dict]:
    model = small_moe(n_layer=3, n_expert=8)
    d = synth(n_layer=3, n_expert=8, k=2, n_seq=2, prompt=5, gen=20, skew=2.0, seed=9)
    path = tmp_path / "t.bin"
    write_synth_trace(path, model, d)
    return path, model, d


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_cache_sim_curve_has_opt_at_every_capacity(run_cli, cli_trace, fmt):
    path, model, d = cli_trace
    r = run_cli("cache-sim", path, "--model", model, "--policy", "lru,opt", "--capacity", "2", "--curve", "-f", fmt)
    assert r.rc == 0, r.err
    if fmt == "table":
        assert "opt" in r.out and "lru" in r.out
        return
    rows = pd.read_csv(io.StringIO(r.out), dtype={"layer": str}) if fmt == "csv" else \
        pd.DataFrame(json.loads(r.out)["rows"]).astype({"layer": str})
    opt = rows[rows.policy == "opt"]
    assert sorted(set(opt.layer)) == ["0", "1", "2", "all"]
    assert (opt.groupby("layer").capacity.apply(sorted).map(list) == [list(range(1, 9))] * 4).all()
    eb = expert_bytes(open_model(model))
    sizes = np.zeros((3, 8))
    sizes[eb.layer.to_numpy(), eb.expert.to_numpy()] = eb.bytes.to_numpy()
    want = simulate(d["layer"], d["experts"], 3, 8, "opt", range(1, 9), expert_bytes=sizes)
    a = opt.sort_values(KEY).reset_index(drop=True)[COLS]
    b = want.sort_values(KEY).reset_index(drop=True)[COLS]
    pd.testing.assert_frame_equal(a, b, check_dtype=False)
    lru = rows[rows.policy == "lru"].set_index(KEY).sort_index()
    assert (opt.set_index(KEY).sort_index().hits >= lru.hits).all()


def test_cache_sim_opt_without_curve_keeps_requested_capacities(run_cli, cli_trace):
    r = run_cli("cache-sim", cli_trace[0], "--policy", "opt", "--capacity", "3,5")
    assert r.rc == 0, r.err
    rows = pd.read_csv(io.StringIO(r.out), dtype={"layer": str})
    assert set(rows.policy) == {"opt"} and sorted(set(rows.capacity)) == [3, 5]
