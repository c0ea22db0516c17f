"""Many traces at once (issue 22 part 2): stats, join-trace, cache-sim, pins and diff over several real
captures (and a vLLM-style routed array of one of them) under the documented rules: counts add, one cache
per trace reported per trace and pooled, sequences keep their origin; an empty glob and traces of two
models are one line and exit 2."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gguf_experts.demo import tinymodel
from gguf_experts.errors import InputError
from gguf_experts.fleet import expand


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two servers' traces of one tiny model (real llama.cpp captures, other prompts) and one of another model."""
    from gguf_experts.cli import main

    d = tmp_path_factory.mktemp("fleet")
    model = tinymodel.make_tiny_model(d / "tiny.gguf", seed=4)
    other = tinymodel.make_tiny_model(d / "other.gguf", seed=4, n_layer=3)
    (d / "a.txt").write_text("def add(a, b):\n    return a + b\nOnce upon a time\n")
    (d / "b.txt").write_text("Q: 12 * 7? A: 84\nThe quick brown fox jumps\nhello\n")
    (d / "servers").mkdir()
    for name, prompts, m in (("s1", "a.txt", model), ("s2", "b.txt", model), ("x", "a.txt", other)):
        out = d / "servers" / f"{name}.bin" if name != "x" else d / "x.bin"
        assert main(["capture", str(m), "--prompts", str(d / prompts), "-n", "6", "--ignore-eos", "-t", "2",
                     "-o", str(out), "--no-progress"]) == 0
    return {"model": model, "a": d / "servers" / "s1.bin", "b": d / "servers" / "s2.bin", "other": d / "x.bin",
            "glob": d / "servers" / "s*.bin", "dir": d}


def csv(run_cli, *argv) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    r = run_cli(*argv, "-f", "csv")
    assert r.rc == 0, r.err
    return pd.read_csv(io.StringIO(r.out))


def by_expert(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["layer", "expert"], ignore_index=True)


def test_stats_counts_add_and_sequences_keep_their_origin(run_cli, fleet):
    a, b = fleet["a"], fleet["b"]
    sa, sb = by_expert(csv(run_cli, "stats", a)), by_expert(csv(run_cli, "stats", b))
    both = by_expert(csv(run_cli, "stats", a, b))
    for col in ("activations", "prefill", "decode"):
        assert np.array_equal(both[col], sa[col] + sb[col]), col
    assert both["activations"].sum() > sa["activations"].sum() > 0
    globbed = by_expert(csv(run_cli, "stats", str(fleet["glob"])))  # a quoted glob: the same two files
    pd.testing.assert_frame_equal(globbed, both)
    qa, qb = csv(run_cli, "stats", a, "--by", "sequence"), csv(run_cli, "stats", b, "--by", "sequence")
    q = csv(run_cli, "stats", a, b, "--by", "sequence")
    assert list(q.columns[:2]) == ["trace", "seq"] and len(q) == len(qa) + len(qb)
    assert q[q.trace == "s1.bin"]["seq"].tolist() == qa["seq"].tolist()  # their own numbers
    assert np.array_equal(q[q.trace == "s2.bin"]["activations"], qb["activations"])
    for fmt in ("json", "table"):
        r = run_cli("stats", a, b, "-f", fmt)
        assert r.rc == 0, r.err
    doc = json.loads(run_cli("stats", a, b, "-f", "json").out)
    assert [t["trace"] for t in doc["traces"]] == ["s1.bin", "s2.bin"]


def test_join_trace_counts_add(run_cli, fleet):
    a, b, m = fleet["a"], fleet["b"], fleet["model"]
    ja, jb = csv(run_cli, "join-trace", a, "-m", m), csv(run_cli, "join-trace", b, "-m", m)
    j = csv(run_cli, "join-trace", a, b, "-m", m)
    for col in ("activations", "bytes_read"):
        assert np.array_equal(j[col], ja[col] + jb[col]), col
    doc = {x: json.loads(run_cli("join-trace", *p, "-m", m, "-f", "json").out)["summary"]
           for x, p in (("a", [a]), ("b", [b]), ("ab", [a, b]))}
    assert doc["ab"]["sequences"] == doc["a"]["sequences"] + doc["b"]["sequences"]  # kept apart
    assert doc["ab"]["tokens"] == doc["a"]["tokens"] + doc["b"]["tokens"]
    # a routed array (vLLM layout) of one server joins with the trace of the other
    npz = fleet["dir"] / "s2.npz"
    assert run_cli("convert", b, npz).rc == 0
    mixed = csv(run_cli, "join-trace", a, npz, "-m", m)
    assert np.array_equal(mixed["activations"], j["activations"])


def test_cache_sim_per_trace_and_pooled(run_cli, fleet):
    a, b = fleet["a"], fleet["b"]
    argv = ("--capacity", "4,8", "--policy", "lru,opt")
    ca, cb = csv(run_cli, "cache-sim", a, *argv), csv(run_cli, "cache-sim", b, *argv)
    c = csv(run_cli, "cache-sim", a, b, *argv)
    cols = ["layer", "policy", "capacity", "accesses", "hits", "hit_rate"]
    for name, one in (("s1.bin", ca), ("s2.bin", cb)):  # one cache per trace: each trace's own numbers
        pd.testing.assert_frame_equal(c[c.trace == name][cols].reset_index(drop=True), one[cols])
    p = c[c.trace == "pooled"].reset_index(drop=True)
    assert np.array_equal(p["hits"], ca["hits"] + cb["hits"])
    assert np.array_equal(p["accesses"], ca["accesses"] + cb["accesses"])
    assert np.allclose(p["hit_rate"], (ca["hits"] + cb["hits"]) / (ca["accesses"] + cb["accesses"]))
    lru, opt = p[p.policy == "lru"].reset_index(drop=True), p[p.policy == "opt"].reset_index(drop=True)
    assert (opt["hits"] >= lru["hits"]).all()
    for fmt in ("json", "table"):
        assert run_cli("cache-sim", a, b, *argv, "-f", fmt).rc == 0


def test_pins_one_list_scored_per_trace_and_pooled(run_cli, fleet, tmp_path):
    a, b = fleet["a"], fleet["b"]
    s = csv(run_cli, "pins", a, b, "--capacity", "4", "--list-csv", tmp_path / "pins.csv")
    assert set(s.trace) == {"s1.bin", "s2.bin", "pooled"}
    per = s[s.trace != "pooled"]
    pool = s[s.trace == "pooled"].set_index("layer")
    tot = per.groupby("layer")[["train_accesses", "test_accesses"]].sum()
    assert np.array_equal(pool.loc[tot.index, "test_accesses"], tot["test_accesses"])
    hits = (per["pins_hit_rate"] * per["test_accesses"]).groupby(per["layer"]).sum()
    assert np.allclose(pool.loc[hits.index, "pins_hit_rate"], hits / tot["test_accesses"])
    pins = pd.read_csv(tmp_path / "pins.csv")
    assert (pins.groupby("layer").size() == 4).all()
    assert run_cli("pins", a, b, "--capacity", "4", "-f", "json").rc == 0


def test_diff_sides_of_several(run_cli, fleet):
    a, b, m = fleet["a"], fleet["b"], fleet["model"]
    d = csv(run_cli, "diff", f"{a},{b}", a, "-m", m)
    sa, sb = by_expert(csv(run_cli, "stats", a)), by_expert(csv(run_cli, "stats", b))
    d = by_expert(d)
    assert np.array_equal(d["activations_a"], sa["activations"] + sb["activations"])
    assert np.array_equal(d["activations_b"], sa["activations"])
    d2 = by_expert(csv(run_cli, "diff", str(fleet["glob"]), a))  # a glob side, without --model
    assert np.array_equal(d2["activations_a"], d["activations_a"])


def test_empty_glob_and_two_models_refused(run_cli, fleet):
    a, other = fleet["a"], fleet["other"]
    nothing = str(fleet["dir"] / "nowhere" / "*.bin")
    for argv in (["stats", a, nothing], ["join-trace", nothing, "-m", fleet["model"]], ["cache-sim", nothing],
                 ["pins", nothing, "--capacity", "2"], ["diff", nothing, a]):
        r = run_cli(*argv)
        assert r.rc == 2 and "matches no file" in r.err and r.err.count("\n") == 1, (argv, r.err)
    for argv in (["stats", a, other], ["cache-sim", a, other], ["pins", a, other, "--capacity", "2"],
                 ["diff", f"{a},{other}", a], ["join-trace", a, other, "-m", fleet["model"]]):
        r = run_cli(*argv)
        assert r.rc == 2 and r.err.count("\n") == 1 and "x.bin" in r.err and "Traceback" not in r.err, (argv, r.err)


def test_expand_sorts_and_reads_a_file_once(fleet):
    g = str(fleet["glob"])
    assert expand([g]) == [str(fleet["b"].parent / n) for n in ("s1.bin", "s2.bin")]
    assert expand([str(fleet["b"]), g]) == [str(fleet["b"]), str(fleet["a"])]
    with pytest.raises(InputError, match="matches no file"):
        expand([str(fleet["dir"] / "*.nothing")])


def test_report_side_of_several_pools_caches(run_cli, fleet, tmp_path):
    """report 'glob': one side of two servers: heat of the summed counts, LRU curves per trace pooled (equal
    to cache-sim's pooled rows); two sides compare."""
    from gguf_experts.report import build_report

    a, b, m = fleet["a"], fleet["b"], fleet["model"]
    inp = build_report([[str(a), str(b)]], m, opt=False)
    j = csv(run_cli, "join-trace", a, b, "-m", m)
    assert int(inp.heat.experts["activations"].sum()) == int(j["activations"].sum())
    lru = inp.curves[(inp.curves.policy == "lru") & (inp.curves.layer == "all")].set_index("capacity")
    c = csv(run_cli, "cache-sim", a, b, "--capacity", "4,8")
    pooled = c[(c.trace == "pooled") & (c.layer == "all")].set_index("capacity")
    for cap in (4, 8):
        assert lru.loc[cap, "hits"] == pooled.loc[cap, "hits"]
        assert lru.loc[cap, "accesses"] == pooled.loc[cap, "accesses"]
    out = tmp_path / "r.html"
    r = run_cli("report", str(fleet["glob"]), a, "-m", m, "-o", out, "--no-opt")
    assert r.rc == 0, r.err
    html = out.read_text()
    assert "s1.bin +1" in html and "one cache per trace, pooled" in html
    r = run_cli("report", f"{a},{fleet['other']}", "-m", m, "-o", tmp_path / "x.html")
    assert r.rc == 2 and "x.bin" in r.err and not (tmp_path / "x.html").exists()
