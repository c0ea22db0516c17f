"""Cache simulation: the one-pass LRU curves and the vectorised LFU/OPT simulators against plain
per-row simulations at every capacity, written independently here with Python sets and sort keys."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from analysis_synth import synth
from hypothesis import given, settings
from hypothesis import strategies as st

from gguf_experts.analysis.cache.cache import GlobalLRU, LayerLRU, simulate, smallest_capacity
from gguf_experts.errors import InputError


def plain(rows: list[list[int]], capacity: int, policy: str, sizes: dict[int, int] | None = None):
    """Per-row plain simulation of one layer: (hits, bytes fetched). Keeps the row's experts, then the
    best others by the policy's priority (see cache.py's convention)."""
    cache: set[int] = set()
    last: dict[int, tuple[int, int]] = {}
    freq: dict[int, int] = {}
    hits = fetched = 0
    for t, row in enumerate(rows):
        for e in row:
            if e in cache:
                hits += 1
            else:
                fetched += (sizes or {}).get(e, 1)
        for s, e in enumerate(row):
            last[e] = (t, -s)
            freq[e] = freq.get(e, 0) + 1

        def nxt(e: int, t: int = t) -> int:
            for u in range(t + 1, len(rows)):
                if e in rows[u]:
                    return u
            return 1 << 40

        if policy == "lru":
            key = lambda e: last[e]
        elif policy == "lfu":
            key = lambda e: (freq[e], last[e])
        else:
            key = lambda e: (-nxt(e), -e)
        mine = sorted(row, key=key, reverse=True)
        others = sorted(cache - set(row), key=key, reverse=True)
        cache = set((mine + others)[:capacity])
    return hits, fetched


def _layer_rows(d, l):
    return d["experts"][d["layer"] == l].tolist()


@pytest.mark.parametrize("skew", [0.0, 3.0])
def test_lru_curves_match_plain_at_every_capacity(skew):
    d = synth(n_layer=3, n_expert=16, k=4, n_seq=2, prompt=6, gen=30, skew=skew, seed=int(skew))
    sizes = np.arange(1, 17)[None, :] * np.array([[1], [10], [100]])
    acc = LayerLRU(3, 16, 4, expert_bytes=sizes)
    for a in range(0, len(d["layer"]), 37):  # odd chunking: state must carry across chunks
        acc.update(d["layer"][a:a + 37], d["experts"][a:a + 37])
    cur = acc.curves()
    for l in range(3):
        rows = _layer_rows(d, l)
        for c in range(1, 17):
            h, f = plain(rows, c, "lru", {e: int(sizes[l, e]) for e in range(16)})
            got = cur[(cur.layer == str(l)) & (cur.capacity == c)].iloc[0]
            assert (got.hits, got.bytes_fetched) == (h, f), (l, c)
    allrow = cur[(cur.layer == "all") & (cur.capacity == 16)].iloc[0]
    assert allrow.accesses == d["experts"].size


@pytest.mark.parametrize("policy", ["lru", "lfu", "opt"])
def test_simulate_matches_plain(policy):
    d = synth(n_layer=2, n_expert=12, k=3, n_seq=2, prompt=4, gen=25, skew=2.0, seed=7)
    caps = [1, 2, 3, 5, 8, 12]
    out = simulate(d["layer"], d["experts"], 2, 12, policy, caps)
    for l in range(2):
        rows = _layer_rows(d, l)
        for c in caps:
            h, f = plain(rows, c, policy)
            got = out[(out.layer == str(l)) & (out.capacity == c)].iloc[0]
            assert (got.hits, got.bytes_fetched) == (h, f), (policy, l, c)


def test_simulated_lru_equals_curve_and_opt_dominates():
    d = synth(n_layer=2, n_expert=32, k=4, n_seq=2, prompt=8, gen=60, skew=1.5, seed=3)
    acc = LayerLRU(2, 32, 4)
    acc.update(d["layer"], d["experts"])
    caps = [2, 4, 8, 16, 24]
    cur = acc.curves(caps).set_index(["layer", "capacity"]).sort_index()
    sim = simulate(d["layer"], d["experts"], 2, 32, "lru", caps).set_index(["layer", "capacity"]).sort_index()
    assert (cur["hits"] == sim["hits"]).all() and (cur["bytes_fetched"] == sim["bytes_fetched"]).all()
    opt = simulate(d["layer"], d["experts"], 2, 32, "opt", caps).set_index(["layer", "capacity"]).sort_index()
    assert (opt["hits"] >= sim["hits"]).all() and (opt["hits"] > sim["hits"]).any()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(4, 70), k=st.integers(1, 4), chunk=st.integers(1, 50))
def test_lru_curves_property(seed, m, k, chunk):
    k = min(k, m)
    d = synth(n_layer=2, n_expert=m, k=k, n_seq=2, prompt=3, gen=8, skew=seed % 3, seed=seed)
    acc = LayerLRU(2, m, k)
    for a in range(0, len(d["layer"]), chunk):
        acc.update(d["layer"][a:a + chunk], d["experts"][a:a + chunk])
    cur = acc.curves()
    for l in range(2):
        rows = _layer_rows(d, l)
        hits = cur[cur.layer == str(l)].sort_values("capacity")["hits"].to_numpy()
        assert hits.tolist() == [plain(rows, c, "lru")[0] for c in range(1, m + 1)]


@pytest.mark.parametrize("uniform", [True, False])
def test_global_budget_matches_plain(uniform):
    d = synth(n_layer=3, n_expert=10, k=3, n_seq=2, prompt=4, gen=15, skew=2.0, seed=11)
    sizes = np.repeat(np.array([[100], [250], [70]]), 10, axis=1)
    if not uniform:  # any sizes: each expert weighed by its own bytes
        sizes = sizes + np.arange(10)[None, :] * 7
    budgets = [100, 420, 1000, 2500, 5000]
    g = GlobalLRU(3, 10, 3, sizes, np.array(budgets))
    g.update(d["layer"], d["experts"])
    fr = g.frame()
    for b in budgets:
        # the plain model: the cache is the longest prefix of the recency list that fits
        got = fr[fr.capacity == b].iloc[0]
        h, f = _prefix_lru(d["layer"], d["experts"], b, sizes)
        assert (got.hits, got.bytes_fetched) == (h, f), b


def test_global_budget_many_experts_matches_plain():
    """Enough experts (bitsets of 38 words) for the path that computes rank masks instead of a table."""
    d = synth(n_layer=4, n_expert=600, k=6, n_seq=1, prompt=20, gen=40, skew=4.0, seed=2)
    rng = np.random.default_rng(0)
    sizes = rng.choice([1000, 1500, 2200], size=(4, 600))
    budgets = [3000, 40_000, 200_000]
    g = GlobalLRU(4, 600, 6, sizes, np.array(budgets))
    for a in range(0, len(d["layer"]), 50):
        g.update(d["layer"][a:a + 50], d["experts"][a:a + 50])
    fr = g.frame()
    for b in budgets:
        got = fr[fr.capacity == b].iloc[0]
        assert (got.hits, got.bytes_fetched) == _prefix_lru(d["layer"], d["experts"], b, sizes), b
    assert fr.hits.iloc[-1] > 0


def _prefix_lru(layer, experts, budget, sizes):
    rec: list[tuple[int, int]] = []
    cache: set = set()
    hits = fetched = 0
    for l, row in zip(layer.tolist(), experts.tolist()):
        for e in row:
            if (l, e) in cache:
                hits += 1
            else:
                fetched += int(sizes[l, e])
        for e in reversed(row):
            if (l, e) in rec:
                rec.remove((l, e))
            rec.insert(0, (l, e))
        cache, total = set(), 0
        for it in rec:
            if total + sizes[it] > budget:
                break
            total += sizes[it]
            cache.add(it)
    return hits, fetched


def test_smallest_capacity_and_errors():
    d = synth(n_layer=1, n_expert=8, k=2, n_seq=1, prompt=2, gen=200, skew=3.0, seed=1)
    acc = LayerLRU(1, 8, 2)
    acc.update(d["layer"], d["experts"])
    cur = acc.curves()
    sc = smallest_capacity(cur, (0.5, 0.9, 0.999))
    row = sc[sc.layer == "0"].iloc[0]
    hr = cur[cur.layer == "0"].set_index("capacity")["hit_rate"]
    for t in (50, 90):
        c = int(row[f"capacity_{t}"])
        assert hr[c] >= t / 100 and (c == 1 or hr[c - 1] < t / 100)
    assert row["capacity_100"] is pd.NA or hr.max() >= 0.999
    bad = d["experts"].copy()
    bad[5, 1] = bad[5, 0]
    with pytest.raises(InputError, match="twice"):
        LayerLRU(1, 8, 2).update(d["layer"], bad)
    with pytest.raises(InputError):
        simulate(d["layer"], d["experts"], 1, 8, "lru", [0])


@pytest.mark.parametrize("chunk", [7, 1000])
def test_working_set_matches_sliding_windows(chunk):
    d = synth(n_layer=2, n_expert=12, k=3, n_seq=2, prompt=5, gen=40, skew=2.0, seed=4)
    sizes = np.array([[10.0] * 12, [3.0] * 12])
    acc = LayerLRU(2, 12, 3, expert_bytes=sizes)
    for a in range(0, len(d["layer"]), chunk):
        acc.update(d["layer"][a:a + chunk], d["experts"][a:a + chunk])
    taus = [1, 2, 3, 7, 30, 200]
    ws = acc.working_set(taus)
    for l in range(2):
        rows = [set(r) for r in d["experts"][d["layer"] == l].tolist()]
        for tau in taus:
            sizes_t = [len(set().union(*rows[max(0, t - tau + 1):t + 1])) for t in range(len(rows))]
            got = ws[(ws.layer == str(l)) & (ws.tau == tau)].iloc[0]
            assert got.experts == pytest.approx(np.mean(sizes_t))
            assert got.bytes == pytest.approx(np.mean(sizes_t) * sizes[l, 0])


@pytest.fixture(scope="module")
def trained_routing(tmp_path_factory):
    """Routing that training produced: the bundled trained model captured live (llama-cpp-python) on its held-out
    code and prose, prefill and greedy decode."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [live] extra) is not installed")
    from gguf_experts.demo.flow import TRAINED_MODEL
    from gguf_experts.trace.live.capture import capture
    from gguf_experts.trace.reader import read_trace

    texts = [(TRAINED_MODEL.parent / f"heldout-{k}.txt").read_text(encoding="utf-8")[:400] for k in ("code", "prose")]
    out = tmp_path_factory.mktemp("trained") / "t.bin"
    capture(TRAINED_MODEL, texts, out, n_predict=16, n_ctx=256, n_threads=2)
    return read_trace(out)


@pytest.mark.live
@pytest.mark.parametrize("policy", ["lru", "lfu", "opt"])
def test_simulate_matches_plain_on_trained_routing(trained_routing, policy):
    """cache-sim's simulators against the plain per-row simulation on the trained model's real, skewed routing."""
    d = trained_routing
    n_layer, n_expert = int(d.layer.max()) + 1, d.header.fingerprint.n_expert
    caps = [1, 2, 4, 8, 16, n_expert]
    out = simulate(d.layer, d.experts, n_layer, n_expert, policy, caps)
    for l in range(n_layer):
        rows = d.experts[d.layer == l].tolist()
        assert len(rows) > 20
        for c in caps:
            h, f = plain(rows, c, policy)
            got = out[(out.layer == str(l)) & (out.capacity == c)].iloc[0]
            assert (got.hits, got.bytes_fetched) == (h, f), (policy, l, c)
