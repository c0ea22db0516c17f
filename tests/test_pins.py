"""pins: a planted hot set is recovered; a drifting one shows the held-out drop; the scores against plain
simulators (set membership, the plain LRU/OPT of test_analysis_cache); both file formats; bad input."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_synth import write_synth_trace
from test_analysis_cache import plain

from gguf_experts.analysis.pins import counts_of, pick_per_layer, score_pins, split_fraction
from gguf_experts.gguf.reader import open_model
from gguf_experts.gguf.layout import expert_bytes

L, M, K = 3, 16, 2


def planted(tokens: int, hot: list[list[int]], p_hot: float = 0.9, seed: int = 0,
            hot_later: list[list[int]] | None = None) -> dict[str, np.ndarray]:
    """Decode rows (one per layer per token): with probability p_hot a token's k experts come from its
    layer's hot set (hot_later's in the second half when given), else from all experts."""
    rng = np.random.default_rng(seed)
    layer, experts = [], []
    for t in range(tokens):
        for li in range(L):
            pool = (hot_later if hot_later is not None and t >= tokens // 2 else hot)[li]
            src = pool if rng.random() < p_hot else range(M)
            experts.append(rng.choice(list(src), K, replace=False))
            layer.append(li)
    n = len(layer)
    return {"seq": np.zeros(n, np.int32), "phase": np.ones(n, np.uint8),
            "pos": np.repeat(np.arange(tokens), L).astype(np.int32), "token": np.zeros(n, np.int32),
            "layer": np.array(layer, np.int32), "experts": np.array(experts, np.int32),
            "weights": np.ones((n, K), np.float32)}


HOT = [[1, 5, 9, 12], [0, 2, 4, 6], [15, 14, 3, 8]]
LATER = [[2, 3, 7, 11], [1, 9, 10, 13], [0, 5, 6, 12]]


def _plain_held_out(rows: list[list[int]], n_train: int, c: int, policy: str) -> int:
    """Held-out hits of the plain simulator warmed on the training rows."""
    return plain(rows, c, policy)[0] - plain(rows[:n_train], c, policy)[0] if policy == "lru" else \
        _opt_held_out(rows, n_train, c)


def _opt_held_out(rows: list[list[int]], n_train: int, c: int) -> int:
    """OPT's held-out hits: the plain OPT over the whole stream, counting rows after the training ones."""
    hits_before = plain_prefix_opt(rows, n_train, c)
    return plain(rows, c, "opt")[0] - hits_before


def plain_prefix_opt(rows: list[list[int]], n: int, c: int) -> int:
    """Hits of OPT (which sees the whole stream's future) within the first n rows: the plain OPT of
    test_analysis_cache run on rows whose hits after n are not counted (those rows still shape the choices)."""
    cache: set[int] = set()
    hits = 0
    for t, row in enumerate(rows):
        if t < n:
            hits += sum(e in cache for e in row)

        def nxt(e: int, t: int = t) -> int:
            return next((u for u in range(t + 1, len(rows)) if e in rows[u]), 1 << 40)

        mine = sorted(row, key=lambda e: (-nxt(e), -e), reverse=True)
        others = sorted(cache - set(row), key=lambda e: (-nxt(e), -e), reverse=True)
        cache = set((mine + others)[:c])
    return hits


def test_planted_hot_set_is_recovered_and_scored_exactly():
    d = planted(300, HOT, seed=1)
    sp = split_fraction(d["layer"], d["experts"], L, 0.5)
    train = counts_of(sp.train_layer, sp.train_experts, L, M)
    pins = pick_per_layer(train, 4)
    assert [sorted(np.flatnonzero(p).tolist()) for p in pins] == [sorted(h) for h in HOT]
    assert not pick_per_layer(np.vstack([train, np.zeros((1, M), np.int64)]), 4)[-1].any()  # no requests
    sc = score_pins(sp, L, M, K, pins, capacity=4).set_index("layer")
    for li in range(L):
        test_rows = sp.test_experts[sp.test_layer == li].tolist()
        all_rows = d["experts"][d["layer"] == li].tolist()
        n_train = int((sp.train_layer == li).sum())
        assert n_train == 150 and all_rows[:n_train] == sp.train_experts[sp.train_layer == li].tolist()
        want = sum(e in HOT[li] for r in test_rows for e in r) / (2 * len(test_rows))
        row = sc.loc[str(li)]
        assert row.pins_hit_rate == pytest.approx(want)
        assert row.uniform_hit_rate == pytest.approx(4 / M)
        assert round(row.lru_hit_rate * row.test_accesses) == _plain_held_out(all_rows, n_train, 4, "lru")
        assert round(row.opt_hit_rate * row.test_accesses) == _plain_held_out(all_rows, n_train, 4, "opt")
    a = sc.loc["all"]
    assert a.pins_hit_rate > 0.8 > 4 / M and a.pins_hit_rate <= a.hindsight_hit_rate
    # OPT is the best DEMAND cache (every requested expert enters it); pins never admit the noise
    # experts, so on a fixed hot set they beat even OPT
    assert a.pins_hit_rate > a.opt_hit_rate > a.lru_hit_rate
    assert a.beats_lru  # a fixed hot set with 10% noise: pinning it beats LRU's churn


def test_drifting_hot_set_shows_the_held_out_drop():
    d = planted(300, HOT, seed=3, hot_later=LATER)
    sp = split_fraction(d["layer"], d["experts"], L, 0.5)
    pins = pick_per_layer(counts_of(sp.train_layer, sp.train_experts, L, M), 4)
    a = score_pins(sp, L, M, K, pins, capacity=4).set_index("layer").loc["all"]
    assert a.pins_train_hit_rate > 0.8  # in sample the list looks excellent
    assert a.pins_hit_rate < 0.2 < a.lru_hit_rate  # held out it is worse than LRU
    assert a.hindsight_hit_rate > 0.8  # a static list would have worked: the hot set moved
    assert not a.beats_lru


@pytest.fixture
def model(small_moe) -> Path:
    return small_moe(n_layer=L, n_expert=M)


def _write(tmp_path: Path, model: Path, name: str, d: dict) -> Path:
    p = tmp_path / name
    write_synth_trace(p, model, d)
    return p


def test_cli_writes_both_formats_and_a_verdict(run_cli, tmp_path, model):
    d = planted(120, HOT, seed=4)
    tr = _write(tmp_path, model, "t.bin", d)
    csv, pl = tmp_path / "pins.csv", tmp_path / "pins.txt"
    r = run_cli("pins", tr, "--capacity", "4", "--list-csv", csv, "--pin-list", pl, "-f", "table")
    assert r.rc == 0, r.err
    assert f"wrote {csv} (csv" in r.err and f"wrote {pl} (" in r.err
    assert r.out.startswith("pinning beats LRU here: static pins hit ")
    df = pd.read_csv(csv)
    assert list(df.columns) == ["layer", "expert", "count"]
    first = Counter(d["experts"][d["layer"] == 0][:60].ravel().tolist())
    want = sorted(first.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
    assert list(zip(df[df.layer == 0].expert, df[df.layer == 0]["count"], strict=True)) == want
    lines = pl.read_text().splitlines()
    assert lines[0] == "# EXPERT_CACHE_PIN_LIST v1" and lines[1] == f"# source trace: {tr}"
    assert lines[2] == f"# top_k: {K}" and lines[4:6] == [f"n_layer {L}", f"n_expert {M}"]
    assert lines[6] == "layer 0: " + " ".join(str(e) for e, _ in want) and len(lines) == 6 + L
    r = run_cli("pins", tr, "--capacity", "4", "-f", "json")
    doc = json.loads(r.out)
    assert doc["verdict"].startswith("pinning beats LRU") and doc["rows"][-1]["layer"] == "all"


def test_cli_train_test_files_and_global_budget(run_cli, tmp_path, model):
    a = _write(tmp_path, model, "a.bin", planted(80, HOT, seed=5))
    b = _write(tmp_path, model, "b.bin", planted(80, LATER, seed=6))
    r = run_cli("pins", "--train", a, "--test", b, "--capacity", "4", "-f", "csv")
    sc = pd.read_csv(io.StringIO(r.out), keep_default_na=False, na_values=[""]).set_index("layer")
    assert r.rc == 0 and sc.loc["all"].pins_hit_rate < sc.loc["all"].lru_hit_rate
    assert sc.loc["all"].train_accesses == sc.loc["all"].test_accesses == 80 * L * K
    eb = expert_bytes(open_model(model))
    one = int(eb["bytes"].iloc[0])  # every expert of this model has the same bytes
    r = run_cli("pins", a, "--model", model, "--budget", str(one * 12), "-f", "csv", "--list-csv",
                tmp_path / "g.csv")
    sc = pd.read_csv(io.StringIO(r.out), keep_default_na=False, na_values=[""]).set_index("layer")
    assert r.rc == 0, r.err
    assert sc.loc["all"].pinned == 12 and sc.loc["all"].pinned_bytes == one * 12
    assert np.isnan(sc.loc["0"].lru_hit_rate) and sc.loc["all"].lru_hit_rate > 0
    g = pd.read_csv(tmp_path / "g.csv")
    assert sorted(map(tuple, g[["layer", "expert"]].to_numpy().tolist())) == \
        sorted((li, e) for li in range(L) for e in HOT[li])


@pytest.mark.parametrize("argv,msg", [
    (["pins", "{t}", "--capacity", "99"], "--capacity"),
    (["pins", "{t}", "--budget", "8G"], "needs --model"),
    (["pins", "{t}", "--capacity", "4", "--train-fraction", "1.5"], "--train-fraction"),
    (["pins", "--train", "{t}", "--capacity", "4"], "--test"),
    (["pins", "--capacity", "4"], "TRACE"),
])
def test_pins_bad_input(run_cli, tmp_path, model, argv, msg):
    t = _write(tmp_path, model, "t.bin", planted(10, HOT))
    r = run_cli(*[x.format(t=t) for x in argv])
    assert r.rc == 2 and msg in r.err and r.err.count("\n") == 1, r.err


@pytest.mark.live
def test_pins_and_access_order_on_a_real_llama_cpp_capture(run_cli, tmp_path):
    """The bundled tiny model run by llama.cpp: cache-sim --order access equals the textbook per-access
    LRU on its trace, and pins' held-out score equals a direct count."""
    pytest.importorskip("llama_cpp")
    from gguf_experts.trace.reader import read_trace
    from test_analysis_policies import per_access_lru

    model, trace = tmp_path / "tiny.gguf", tmp_path / "live.bin"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def quicksort(xs):\nOnce upon a time\nThe capital of France is\n")
    assert run_cli("make-model", model, "-f", "json").rc == 0
    assert run_cli("capture", model, "--prompts", prompts, "-n", "24", "-o", trace, "--no-progress", "-t", "1",
                   "-f", "json").rc == 0
    data = read_trace(trace)
    fp = data.header.fingerprint
    r = run_cli("cache-sim", trace, "--order", "access", "--policy", "lru,lfuda,s3fifo,opt", "--capacity", "2,4,8")
    df = pd.read_csv(io.StringIO(r.out), keep_default_na=False, na_values=[""])
    assert r.rc == 0, r.err
    for li in np.unique(data.layer).tolist():
        rows = data.experts[data.layer == li].tolist()
        for c in (2, 4, 8):
            got = df[(df.layer == str(li)) & (df.policy == "lru") & (df.capacity == c)].iloc[0]
            assert got.hits == per_access_lru(rows, c, dict.fromkeys(range(fp.n_expert), 1))[0]
    a = df[df.layer == "all"].set_index(["policy", "capacity"])
    assert (a.loc["opt", "hits"] >= a.loc["lfuda", "hits"]).all()
    assert (a.loc["opt", "hits"] >= a.loc["s3fifo", "hits"]).all()
    pl = tmp_path / "pins.txt"
    r = run_cli("pins", trace, "--capacity", "4", "--pin-list", pl, "-f", "json")
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    sp = split_fraction(data.layer, data.experts, fp.n_layer, 0.5)
    pins = pick_per_layer(counts_of(sp.train_layer, sp.train_experts, fp.n_layer, fp.n_expert), 4)
    hits = sum(bool(pins[li, e]) for li, row in zip(sp.test_layer.tolist(), sp.test_experts.tolist(), strict=True)
               for e in row)
    assert doc["rows"][-1]["pins_hit_rate"] == pytest.approx(hits / sp.test_experts.size)
    listed = [ln for ln in pl.read_text().splitlines() if ln.startswith("layer ")]
    assert len(listed) == fp.n_layer and all(len(ln.split(":")[1].split()) == 4 for ln in listed)
