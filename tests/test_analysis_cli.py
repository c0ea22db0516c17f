"""stats, reuse and cache-sim through the CLI: every format, --model bytes, bad input as one line + exit 2,
and a trace captured by the real llama.cpp from the bundled tiny model."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_synth import synth, write_synth_trace

from gguf_experts.gguf.reader import open_model
from gguf_experts.gguf.layout import expert_bytes
from gguf_experts.gguf.fingerprint import fingerprint
from gguf_experts.trace.writer import TraceWriter
from gguf_experts.trace.reader import read_trace

N_LAYER, N_EXPERT, K = 3, 8, 2


@pytest.fixture
def model(small_moe) -> Path:
    return small_moe(n_layer=N_LAYER, n_expert=N_EXPERT)


@pytest.fixture
def trace(tmp_path: Path, model: Path) -> Path:
    d = synth(n_layer=N_LAYER, n_expert=N_EXPERT, k=K, n_seq=3, prompt=6, gen=15, skew=2.0, seed=2)
    path = tmp_path / "t.bin"
    write_synth_trace(path, model, d)
    return path


def _csv(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""])


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_stats_formats(run_cli, trace, model, fmt):
    r = run_cli("stats", trace, "--model", model, "-f", fmt)
    assert r.rc == 0, r.err
    data = read_trace(trace)
    counts = np.bincount(data.layer.astype(np.int64)[:, None].repeat(K, 1).ravel() * N_EXPERT
                         + data.experts.ravel(), minlength=N_LAYER * N_EXPERT).reshape(N_LAYER, N_EXPERT)
    eb = expert_bytes(open_model(model)).set_index(["layer", "expert"])["bytes"]
    if fmt == "csv":
        df = _csv(r.out)
        assert list(df.columns[:4]) == ["layer", "expert", "activations", "share"]
        got = df.set_index(["layer", "expert"])
        for (l, e), row in got.iterrows():
            assert row.activations == counts[l, e] and row.bytes == eb[(l, e)]
            assert row.bytes_read == counts[l, e] * eb[(l, e)]
    elif fmt == "json":
        doc = json.loads(r.out)
        for lay in doc["layers"]:
            assert lay["activation_counts"] == counts[lay["layer"]].tolist()
            assert lay["never_activated"] == np.flatnonzero(counts[lay["layer"]] == 0).tolist()
    else:
        assert "busiest" in r.out and "gini" in r.out


@pytest.mark.parametrize("by", ["layer", "sequence"])
def test_stats_by(run_cli, trace, by):
    r = run_cli("stats", trace, "--by", by)
    assert r.rc == 0 and len(_csv(r.out)) == 3


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_reuse_formats(run_cli, trace, tmp_path, fmt):
    co = tmp_path / "co.csv"
    r = run_cli("reuse", trace, "-f", fmt, "--coactivation", co)
    assert r.rc == 0, r.err
    if fmt == "csv":
        df = _csv(r.out)
        assert df.layer.tolist() == [0, 1, 2] and (df.decode_pairs == 3 * 14).all()
        assert ((df.mean_overlap >= 0) & (df.mean_overlap <= 1)).all()
    elif fmt == "json":
        doc = json.loads(r.out)
        assert {"layers", "gaps"} <= set(doc)
    else:
        assert "mean_overlap" in r.out
    pairs = _csv(co.read_text())
    data = read_trace(trace)
    first = data.experts[data.layer == 0]
    a, b = np.minimum(first[:, 0], first[:, 1]), np.maximum(first[:, 0], first[:, 1])
    want = pd.Series(list(zip(a, b))).value_counts().to_dict()
    sub = pairs[pairs.layer == 0]
    assert dict(zip(zip(sub.expert_a, sub.expert_b), sub["count"])) == want


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_cache_sim_formats(run_cli, trace, model, fmt):
    r = run_cli("cache-sim", trace, "--model", model, "--policy", "lru,lfu,opt", "--capacity", "2,4,8", "-f", fmt)
    assert r.rc == 0, r.err
    if fmt == "csv":
        df = _csv(r.out)
        assert list(df.columns) == ["layer", "policy", "capacity", "accesses", "hits", "hit_rate", "bytes_fetched",
                                    "gap_share"]
        a = df[df.layer == "all"].set_index(["policy", "capacity"])
        assert (a.loc["opt", "hits"] >= a.loc["lru", "hits"]).all()
        eb = expert_bytes(open_model(model)).groupby("layer")["bytes"].first()
        one = df[(df.layer == "1") & (df.policy == "lru") & (df.capacity == 4)].iloc[0]
        assert one.bytes_fetched == (one.accesses - one.hits) * eb[1]  # experts of a layer: one size
        data = read_trace(trace)
        full = df[(df.policy == "lru") & (df.capacity == N_EXPERT) & (df.layer != "all")]
        used = [len(np.unique(data.experts[data.layer == int(l)])) for l in full.layer]
        assert (full.accesses - full.hits).tolist() == used  # all experts fit: first uses only
    elif fmt == "json":
        doc = json.loads(r.out)
        assert doc["convention"] and len(doc["smallest_lru_capacity"]) == N_LAYER + 1
    else:
        assert "smallest LRU cache" in r.out


def test_cache_sim_curve_budget_and_working_set(run_cli, trace, model):
    r = run_cli("cache-sim", trace)
    df = _csv(r.out)
    assert r.rc == 0 and sorted(df.capacity.unique().tolist()) == list(range(1, N_EXPERT + 1))
    assert df.bytes_fetched.isna().all()  # no --model: bytes unknown
    eb = expert_bytes(open_model(model))
    per_layer = eb.groupby("layer")["bytes"].sum()
    everything = int(per_layer.sum())
    r = run_cli("cache-sim", trace, "--model", model, "--budget", f"1,{everything}")
    g = _csv(r.out)
    assert r.rc == 0, r.err
    assert g.layer.astype(str).tolist() == ["all", "all"]
    assert g.iloc[0].hits == 0  # nothing fits in one byte
    data = read_trace(trace)
    distinct = len(set(zip(np.repeat(data.layer, K).tolist(), data.experts.ravel().tolist())))
    assert g.iloc[1].accesses - g.iloc[1].hits == distinct  # everything fits: first uses only
    r = run_cli("cache-sim", trace, "--model", model, "--working-set", "--tau", "1,4")
    ws = _csv(r.out)
    assert r.rc == 0 and set(ws.tau) == {1, 4}
    assert np.allclose(ws[(ws.tau == 1) & (ws.layer != "all")].experts, K)


def test_cache_sim_curve_has_opt_rows_and_policies_report_their_gap(run_cli, trace):
    r = run_cli("cache-sim", trace, "--curve", "--capacity", "2")
    df = _csv(r.out)
    assert r.rc == 0 and set(df.policy) == {"lru", "opt"}  # --curve: LRU and OPT, every capacity
    for p in ("lru", "opt"):
        assert sorted(df[(df.policy == p) & (df.layer == "all")].capacity) == list(range(1, N_EXPERT + 1))
    r = run_cli("cache-sim", trace, "--policy", "lfuda,s3fifo", "--capacity", "2,4", "--order", "access")
    df = _csv(r.out)
    assert r.rc == 0 and set(df.policy) == {"lru", "opt", "lfuda", "s3fifo"}  # LRU and OPT: the references
    a = df[df.layer == "all"].set_index(["policy", "capacity"])
    for p in ("lfuda", "s3fifo"):
        for c in (2, 4):
            lru, opt, mine = (a.loc[(q, c), "hits"] for q in ("lru", "opt", p))
            assert a.loc[(p, c), "gap_share"] == pytest.approx((mine - lru) / (opt - lru))
    r = run_cli("cache-sim", trace, "--order", "access", "-f", "json")
    assert r.rc == 0 and json.loads(r.out)["order"] == "access"


@pytest.mark.parametrize("argv,msg", [
    (["cache-sim", "{trace}", "--capacity", "99"], "exceeds"),
    (["cache-sim", "{trace}", "--policy", "fifo"], "--policy"),
    (["cache-sim", "{trace}", "--budget", "8G"], "needs --model"),
    (["cache-sim", "{trace}", "--capacity", "two"], "not a number"),
    (["stats", "{model}"], "not a gguf-experts trace"),
    (["reuse", "{missing}"], "no such file"),
])
def test_bad_input_one_line_exit_2(run_cli, trace, model, tmp_path, argv, msg):
    argv = [a.format(trace=trace, model=model, missing=tmp_path / "nope.bin") for a in argv]
    r = run_cli(*argv)
    assert r.rc == 2 and msg in r.err and r.err.count("\n") == 1


def test_trace_from_another_model_is_refused(run_cli, trace, small_moe):
    other = small_moe("other.gguf", n_layer=N_LAYER, n_expert=16)
    r = run_cli("stats", trace, "--model", other)
    assert r.rc == 2 and "not captured from" in r.err


@pytest.mark.live
def test_commands_on_a_real_llama_cpp_capture(run_cli, tmp_path):
    """The bundled tiny model, quantized and run by llama.cpp: every analysis command on its trace."""
    pytest.importorskip("llama_cpp")
    model, trace = tmp_path / "tiny.gguf", tmp_path / "live.bin"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def quicksort(xs):\nOnce upon a time\n")
    assert run_cli("make-model", model, "--quant", "Q4_K_M", "-f", "json").rc == 0
    assert run_cli("capture", model, "--prompts", prompts, "-n", "8", "-o", trace, "--no-progress", "-t", "1",
                   "-f", "json").rc == 0
    data = read_trace(trace)
    fp = data.header.fingerprint
    r = run_cli("stats", trace, "--model", model, "-f", "json")
    doc = json.loads(r.out)
    assert r.rc == 0 and sum(sum(l["activation_counts"]) for l in doc["layers"]) == data.experts.size
    r = run_cli("cache-sim", trace, "--model", model, "--policy", "lru,opt", "--capacity", str(fp.n_expert_used))
    df = _csv(r.out)
    assert r.rc == 0 and (df.accesses > 0).all()
    r = run_cli("reuse", trace)
    assert r.rc == 0 and (_csv(r.out).decode_pairs == 2 * 7).all()


def test_other_quantization_warns_and_uses_its_bytes(run_cli, trace, model, tmp_path):
    from gguf_experts.gguf.reader import open_model as om
    from gguf_experts.gguf.writer import TensorSpec, write_gguf

    m = om(model)
    tensors = [TensorSpec.make(t.name, t.ne, "Q4_0" if "_exps" in t.name else t.type.name) for t in m.tensors]
    q4 = write_gguf(tmp_path / "q4.gguf", {k: v for k, v in m.kv.items() if not k.startswith("GGUF.")}, tensors)
    r = run_cli("cache-sim", trace, "--model", q4, "--capacity", "4")
    assert r.rc == 0 and "warning: " in r.err and "another quantization" in r.err
    df = _csv(r.out)
    eb = expert_bytes(open_model(q4)).groupby("layer")["bytes"].first()
    one = df[df.layer == "0"].iloc[0]
    assert one.bytes_fetched == (one.accesses - one.hits) * eb[0]


@pytest.mark.parametrize("cmd", [["stats"], ["stats", "--by", "layer"], ["stats", "--by", "sequence"], ["reuse"],
                                 ["reuse", "--by", "gap"], ["cache-sim", "--policy", "lru,lfu,opt"],
                                 ["cache-sim", "--policy", "lfuda,s3fifo", "--order", "access"],
                                 ["pins", "--capacity", "2"],
                                 ["cache-sim", "--working-set"]])
@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_empty_trace(run_cli, model, tmp_path, cmd, fmt):
    path = tmp_path / "empty.bin"
    TraceWriter(path, fingerprint(open_model(model))).close()
    r = run_cli(cmd[0], path, *cmd[1:], "-f", fmt)
    assert r.rc == 0, r.err
    if fmt == "json":
        json.loads(r.out)
