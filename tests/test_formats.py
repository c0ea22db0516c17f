"""Other tools' formats (issue 13): each one written byte by byte as its source writes it and read back with the
right counts; every format round trips through `convert` / `stats --format` with identical per (layer, expert)
counts and prefill/decode splits (where the format can hold them); bad files give one line and exit 2."""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gguf_experts.demo import tinymodel
from gguf_experts.formats.counts import ExpertCounts
from gguf_experts.formats.load import detect_format, load_counts, load_trace
from gguf_experts.formats.passes import records_to_trace
from gguf_experts.gguf.reader import open_model
from gguf_experts.trace.reader import read_trace
from gguf_experts.trace.format import TraceRecoveryWarning

PROMPTS = "def add(a, b):\n    return a + b\nOnce upon a time, a small robot\nQ: 12 * 7? A: 84\n"
L, M, K = 4, 16, 4  # the tiny qwen3moe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real capture (llama.cpp through llama-cpp-python): three prompts, prefill + decode, gate weights."""
    from gguf_experts.cli import main

    d = tmp_path_factory.mktemp("formats")
    model = tinymodel.make_tiny_model(d / "tiny.gguf", seed=3)
    (d / "prompts.txt").write_text(PROMPTS)
    assert main(["capture", str(model), "--prompts", str(d / "prompts.txt"), "-n", "9", "--weights",
                 "--ignore-eos", "-t", "2", "-o", str(d / "t.bin"), "--no-progress"]) == 0
    return {"model": model, "trace": d / "t.bin", "dir": d}


def counts_of(td) -> ExpertCounts:  # type: ignore[no-untyped-def]
    return ExpertCounts.from_chunks([td], td.header.fingerprint)


def stats_csv(run_cli, *argv) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    r = run_cli("stats", *argv, "-f", "csv")
    assert r.rc == 0, r.err
    return pd.read_csv(io.StringIO(r.out)).sort_values(["layer", "expert"], ignore_index=True)


# --- round trips ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,name", [("mblt", "x.mblt"), ("moe-trace-csv", "x.csv"), ("rtrace", "x.rtrace")])
def test_ordered_round_trip(run_cli, tiny, tmp_path, fmt, name):
    src = read_trace(tiny["trace"])
    out, back = tmp_path / name, tmp_path / "back.bin"
    r = run_cli("convert", tiny["trace"], out, "--to", fmt)
    assert r.rc == 0, r.err
    assert detect_format(out) == fmt
    assert run_cli("convert", out, back, "--model", tiny["model"]).rc == 0
    got = read_trace(back)
    assert got.header.fingerprint == src.header.fingerprint
    a, b = counts_of(src), counts_of(got)
    assert np.array_equal(a.activations, b.activations)  # per (layer, expert), every format
    assert np.array_equal(got.experts, src.experts) and np.array_equal(got.layer, src.layer)
    if fmt == "rtrace":  # no phases or sequences in RTRACE01: everything reads as decode, one sequence
        assert (got.phase == 1).all() and (got.seq == 0).all()
        assert np.array_equal(a.tokens.sum(axis=0), b.tokens.sum(axis=0))
    else:  # prefill/decode split, sequences and positions are inferred back exactly
        assert np.array_equal(a.counts, b.counts) and np.array_equal(a.tokens, b.tokens)
        assert np.array_equal(got.seq, src.seq) and np.array_equal(got.pos, src.pos)
        assert np.array_equal(got.phase, src.phase)
    # and the stats of the converted file equal the stats of the original
    cols = ["layer", "expert", "activations"] + ([] if fmt == "rtrace" else ["prefill", "decode"])
    s0 = stats_csv(run_cli, tiny["trace"])
    s1 = stats_csv(run_cli, out, "--model", tiny["model"])
    pd.testing.assert_frame_equal(s0[cols], s1[cols])


@pytest.mark.parametrize("fmt,name", [("tracer-json", "c.json"), ("reap-json", "c.reap.json"),
                                      ("imatrix", "c.imatrix.gguf")])
def test_count_round_trip(run_cli, tiny, tmp_path, fmt, name):
    out = tmp_path / name
    r = run_cli("stats", tiny["trace"], "--model", tiny["model"], "--format", fmt, "-o", out)
    assert r.rc == 0, r.err
    assert f"wrote {out}" in r.err  # a person learns where the file went
    assert detect_format(out) == fmt
    a = counts_of(read_trace(tiny["trace"]))
    b = load_counts(out, tiny["model"])
    assert np.array_equal(a.activations, b.activations)
    if fmt == "imatrix":  # an imatrix has no phases: all prefill; tokens = routed rows / k
        assert b.counts[1].sum() == 0 and np.array_equal(b.tokens[0], a.tokens.sum(axis=0))
    else:
        assert np.array_equal(a.counts, b.counts) and np.array_equal(a.tokens, b.tokens)
    cols = ["layer", "expert", "activations", "share", "bytes", "bytes_read"] + (
        [] if fmt == "imatrix" else ["prefill", "decode"])
    s0 = stats_csv(run_cli, tiny["trace"], "--model", tiny["model"])
    s1 = stats_csv(run_cli, out, "--model", tiny["model"])
    pd.testing.assert_frame_equal(s0[cols], s1[cols])
    # count formats convert into one another, and a JSON goes to stdout without -o
    again = tmp_path / "again.json"
    assert run_cli("convert", out, again, "--to", "tracer-json", "--model", tiny["model"]).rc == 0
    assert np.array_equal(load_counts(again).activations[:L], a.activations)
    r = run_cli("stats", out, "--model", tiny["model"], "--format", "tracer-json")
    assert r.rc == 0 and json.loads(r.out)["per_layer"]["0"]


def test_join_diff_report_take_every_format(run_cli, tiny, tmp_path):
    m = tiny["model"]
    files = {"trace": tiny["trace"]}
    for fmt, name in [("mblt", "x.mblt"), ("rtrace", "x.rtrace"), ("moe-trace-csv", "x.csv")]:
        files[fmt] = tmp_path / name
        assert run_cli("convert", tiny["trace"], files[fmt], "--to", fmt).rc == 0
    for fmt, name in [("imatrix", "x.gguf"), ("reap-json", "r.json"), ("tracer-json", "t.json")]:
        files[fmt] = tmp_path / name
        assert run_cli("stats", tiny["trace"], "-m", m, "--format", fmt, "-o", files[fmt]).rc == 0
    base = run_cli("join-trace", tiny["trace"], "-m", m, "-f", "json")
    bytes_read = json.loads(base.out)["summary"]["bytes_read"]
    for fmt, path in files.items():
        r = run_cli("join-trace", path, "-m", m, "-f", "json")
        assert r.rc == 0, (fmt, r.err)
        assert json.loads(r.out)["summary"]["bytes_read"] == bytes_read, fmt
        d = run_cli("diff", tiny["trace"], path, "-m", m, "-f", "json")
        assert d.rc == 0 and json.loads(d.out)["overall_js_divergence"] == pytest.approx(0, abs=1e-12), fmt
    r = run_cli("report", files["imatrix"], files["mblt"], "-m", m, "-o", tmp_path / "r.html", "--no-opt")
    assert r.rc == 0, r.err
    assert "counts only (no token order)" in (tmp_path / "r.html").read_text()


def test_order_dependent_commands_refuse_counts(run_cli, tiny, tmp_path):
    out = tmp_path / "c.json"
    assert run_cli("stats", tiny["trace"], "--format", "tracer-json", "-o", out).rc == 0
    for cmd in ("reuse", "cache-sim"):
        r = run_cli(cmd, out)
        assert r.rc == 2 and r.err.count("\n") == 1 and "needs a trace in token order" in r.err, r.err
    mb = tmp_path / "x.mblt"
    assert run_cli("convert", tiny["trace"], mb).rc == 0  # the name picks MBLT
    r = run_cli("reuse", mb, "-f", "json")
    r0 = run_cli("reuse", tiny["trace"], "-f", "json")
    assert r.rc == 0 and json.loads(r.out)["layers"] == json.loads(r0.out)["layers"]


# --- files as their own tools write them ----------------------------------------------------------------

def test_mblt_as_mbolt_writes_it(tmp_path):
    """int32 MAGIC, 1, n_expert; records layer, k, n_tokens, ids (token-major): a 3-token prefill whose last
    layer routes only the last token (as mbolt's docstring says), two decode passes, a truncated record."""
    rng = np.random.default_rng(0)
    words = [0x544C424D, 1, M]
    expect = []
    for layer in range(L):  # prefill
        n = 1 if layer == L - 1 else 3
        ids = np.stack([rng.permutation(M)[:K] for _ in range(n)])
        words += [layer, K, n] + ids.ravel().tolist()
        expect += [(0, 0, p, layer, tuple(i)) for p, i in zip(range(3 - n, 3), ids)]
    for step in range(2):
        for layer in range(L):
            ids = rng.permutation(M)[:K]
            words += [layer, K, 1] + ids.tolist()
            expect.append((0, 1, 3 + step, layer, tuple(ids)))
    words += [0, K, 1, 5]  # cut short: the process was killed mid-write
    p = tmp_path / "m.mblt"
    p.write_bytes(struct.pack(f"<{len(words)}i", *words))
    with pytest.warns(TraceRecoveryWarning, match="truncated MBLT record"):
        td = load_trace(p)
    got = list(zip(td.seq.tolist(), td.phase.tolist(), td.pos.tolist(), td.layer.tolist(),
                   map(tuple, td.experts.tolist())))
    assert got == expect
    assert td.header.fingerprint.n_expert == M and td.header.fingerprint.n_layer == L


def test_rtrace_as_router_trace_writes_it(run_cli, tiny, tmp_path):
    """b"RTRACE01", int32 n_experts, int32 0, records (int32 token, int32 layer, f32 probs[n]): the top-k of
    the probabilities are the experts; planted near-ties are counted by stats."""
    rng = np.random.default_rng(1)
    T = 40
    dt = np.dtype([("token_idx", "<i4"), ("layer_idx", "<i4"), ("probs", "<f4", (M,))])
    rec = np.zeros(T * L, dt)
    rec["token_idx"] = np.repeat(np.arange(T), L)
    rec["layer_idx"] = np.tile(np.arange(L), T)
    logits = rng.normal(size=(T * L, M)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1)
    tie = rng.random(T * L) < 0.25  # plant: the (k+1)-th equals the k-th minus 1e-6
    r = np.flatnonzero(tie)
    probs[r, order[r, K]] = probs[r, order[r, K - 1]] - 1e-6
    rec["probs"] = probs
    p = tmp_path / "r.bin"  # the name says nothing: detected by content
    p.write_bytes(b"RTRACE01" + struct.pack("<ii", M, 0) + rec.tobytes())
    td = load_trace(p, tiny["model"])
    want = np.argsort(-rec["probs"], axis=1, kind="stable")[:, :K]
    assert np.array_equal(td.experts, want) and np.array_equal(td.pos, rec["token_idx"])
    out = run_cli("stats", p, "--model", tiny["model"], "-f", "json")
    assert out.rc == 0, out.err
    nt = json.loads(out.out)["near_ties"]
    m32 = rec["probs"][np.arange(T * L), want[:, K - 1]] - np.sort(rec["probs"], axis=1)[:, -K - 1]
    assert nt["share"] == pytest.approx(float((m32 < 1e-3).mean())) and nt["share"] >= tie.mean()
    assert "near-ties" in run_cli("stats", p, "--model", tiny["model"], "-f", "table").out


def test_moe_trace_csv_as_pr_28544_writes_it(tiny, tmp_path):
    """One 'layer,expert' row per routed activation, no header: two prefill tokens then one decode token."""
    rng = np.random.default_rng(2)
    lines, ids = [], {}
    for layer in range(L):
        for t in range(2):
            ids[(t, layer)] = rng.permutation(M)[:K]
            lines += [f"{layer},{e}" for e in ids[(t, layer)]]
    for layer in range(L):
        ids[(2, layer)] = rng.permutation(M)[:K]
        lines += [f"{layer},{e}" for e in ids[(2, layer)]]
    p = tmp_path / "moe_trace.txt"
    p.write_text("\n".join(lines) + "\n")
    td = load_trace(p, tiny["model"])
    assert td.phase.tolist() == [0] * 2 * L + [1] * L
    for row in range(len(td)):
        assert td.experts[row].tolist() == ids[(int(td.pos[row]), int(td.layer[row]))].tolist()


def test_moe_trace_fork_with_phase_and_token(tiny, tmp_path):
    """The fork's 'phase,token,layer,rank,expert' form: phases and token indices come from the file."""
    rng = np.random.default_rng(6)
    lines, want = ["phase,token,layer,rank,expert"], []
    for t, ph in ((0, "prefill"), (1, "prefill"), (2, "decode")):
        for layer in range(L):
            ids = rng.permutation(M)[:K]
            lines += [f"{ph},{t},{layer},{r},{e}" for r, e in enumerate(ids)]
            want.append((int(ph == "decode"), t, layer, ids.tolist()))
    p = tmp_path / "fork.csv"
    p.write_text("\n".join(lines) + "\n")
    assert detect_format(p) == "moe-trace-csv"
    td = load_trace(p, tiny["model"])
    assert [(int(a), int(b), int(c), d.tolist()) for a, b, c, d in zip(td.phase, td.pos, td.layer, td.experts)] == want
    p.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(Exception, match="ranks do not run"):
        load_trace(p, tiny["model"])


def test_reap_json_as_expert_profile_writes_it(run_cli, tiny, tmp_path):
    """save_stats' text: one object per MoE layer id with total_tokens, arrays of n_experts, never_activated."""
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 50, (L, M))
    counts[1, 5] = 0
    parts = []
    for il in range(L):
        c = counts[il]
        tt = int(c.sum() // K)
        arr = lambda v: "[" + ", ".join(str(x) for x in v) + "]"  # noqa: E731
        parts.append(f'  "{il}": {{\n    "total_tokens": {tt},\n    "activation_counts": {arr(c)},\n'
                     f'    "activation_frequency": {arr(c / tt)},\n    "avg_gate_weight": {arr(np.full(M, 0.25))},\n'
                     f'    "ean_mean": {arr(np.full(M, 1.5))},\n    "reap": {arr(np.arange(M) / 10)},\n'
                     f'    "never_activated": {int((c == 0).sum())}\n  }}')
    p = tmp_path / "expert_stats.json"
    p.write_text("{\n" + ",\n".join(parts) + "\n}\n")
    got = load_counts(p, tiny["model"])
    assert np.array_equal(got.activations, counts) and got.counts[1].sum() == 0
    assert np.allclose(got.meta["reap"]["reap"][2], np.arange(M) / 10)
    df = stats_csv(run_cli, p, "--model", tiny["model"])
    assert df.set_index(["layer", "expert"]).loc[(1, 5), "activations"] == 0
    back = tmp_path / "back.json"  # REAP fields survive a round trip through our writer
    assert run_cli("convert", p, back, "--to", "reap-json").rc == 0
    doc = json.loads(back.read_text())
    assert doc["2"]["reap"] == pytest.approx((np.arange(M) / 10).tolist()) and doc["1"]["never_activated"] >= 1


@pytest.mark.parametrize("shape", ["issue", "layers"])
def test_tracer_json_shapes(run_cli, tiny, tmp_path, shape):
    rng = np.random.default_rng(4)
    counts = rng.integers(0, 9, (L, M)) * K
    if shape == "issue":
        doc = {"total_tokens": 99, "expert_activations": {str(e): int(v) for e, v in enumerate(counts.sum(0))},
               "per_layer": {str(l): {str(e): int(counts[l, e]) for e in range(M) if counts[l, e]} for l in range(L)}}
    else:  # LLAMA_EXPERT_TRACE_OUTPUT of ernestuz-b/llama-prefetch.cpp
        doc = {"layers": [{"layer_id": l, "total_tokens": int(counts[l].sum()), "experts": [
            {"expert_id": e, "activations": int(counts[l, e]), "percentage": 1.0} for e in range(M) if counts[l, e]]}
            for l in range(L)]}
    p = tmp_path / "stats.out"
    p.write_text(json.dumps(doc))
    got = load_counts(p, tiny["model"])
    assert np.array_equal(got.activations, counts) and not got.phase_known
    assert np.array_equal(got.tokens[1], counts.sum(axis=1) // K)  # k from the model


def test_imatrix_as_llama_imatrix_writes_it(run_cli, tiny, tmp_path):
    """gguf-py's writer with llama-imatrix's layout: sorted names, <t>.in_sum2 {n_cols, n_expert} and
    <t>.counts {1, n_expert} F32, general.type imatrix, imatrix.datasets/chunk_count/chunk_size."""
    import gguf

    model = open_model(tiny["model"])
    exps = sorted((t for t in model.tensors if t.name.endswith("_exps.weight")), key=lambda t: t.name)
    rng = np.random.default_rng(5)
    counts = {l: rng.integers(0, 300, M).astype(np.float32) for l in range(L)}
    w = gguf.GGUFWriter(str(tmp_path / "imatrix.gguf"), arch="")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["calibration.txt"])
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 512)
    for t in sorted(exps, key=lambda t: t.name):
        layer = int(t.name.split(".")[1])
        w.add_tensor(t.name + ".in_sum2", rng.random((M, t.ne[0])).astype(np.float32))
        w.add_tensor(t.name + ".counts", counts[layer].reshape(M, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    p = tmp_path / "imatrix.gguf"
    df = stats_csv(run_cli, p, "--model", tiny["model"]).set_index(["layer", "expert"])
    for l in range(L):
        assert df.loc[l]["activations"].tolist() == counts[l].astype(int).tolist()
        assert df.loc[l]["prefill"].tolist() == counts[l].astype(int).tolist()
    got = load_counts(p)  # no model: tokens from chunk_count x chunk_size
    assert got.meta["datasets"] == ["calibration.txt"] and (got.tokens[0] == 3 * 512).all()
    # and ours, read by gguf-py, has the same layout
    ours = tmp_path / "ours.gguf"
    assert run_cli("convert", p, ours, "--model", tiny["model"]).rc == 0
    r = gguf.GGUFReader(str(ours))
    names = [t.name for t in r.tensors]
    assert names == [f"{t.name}.{s}" for t in exps for s in ("in_sum2", "counts")]
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == ([1, M] if t.name.endswith(".counts") else [t.shape[0], M])
    assert r.fields["general.type"].contents() == "imatrix"
    assert {"imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"} <= set(r.fields)


def test_records_to_trace_positions_and_sequences():
    """Two prompts with decode between them: the second prefill starts a new sequence at position 0."""
    from gguf_experts.gguf.fingerprint import ModelFingerprint

    f = ModelFingerprint("x", 2, 4, 1, "", "")
    layer = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    n = np.array([3, 1, 1, 1, 2, 2, 1, 1])
    td = records_to_trace(layer, n, np.arange(n.sum()).reshape(-1, 1) % 4, f)
    assert td.seq.tolist() == [0] * 6 + [1] * 6
    assert td.pos.tolist() == [0, 1, 2, 2, 3, 3, 0, 1, 0, 1, 2, 2]
    assert td.phase.tolist() == [0] * 4 + [1] * 2 + [0] * 4 + [1] * 2


# --- bad input -------------------------------------------------------------------------------------------

def _imatrix(path: Path, counts: np.ndarray) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch="")
    w.add_string("general.type", "imatrix")
    w.add_tensor("blk.0.ffn_down_exps.weight.in_sum2", np.ones((counts.size, 8), np.float32))
    w.add_tensor("blk.0.ffn_down_exps.weight.counts", counts.reshape(-1, 1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


BAD = {
    "mblt-version": (struct.pack("<3i", 0x544C424D, 2, M), "MBLT version 2"),
    "mblt-k": (struct.pack("<7i", 0x544C424D, 1, M, 0, 0, 1, 3), "damaged MBLT record at byte 12"),
    "mblt-id": (struct.pack("<8i", 0x544C424D, 1, M, 0, 2, 1, 3, 99), "expert id 99"),
    "rtrace-experts": (b"RTRACE01" + struct.pack("<ii", 8, 0), "says 8 experts, the model has 16"),
    "rtrace-nan": (b"RTRACE01" + struct.pack("<ii", M, 0) + struct.pack("<ii", 0, 0)
                   + np.full(M, np.nan, "<f4").tobytes(), "non-finite probabilities"),
    "csv-run": (b"0,1\n0,2\n0,3\n", "is not a multiple of k = 4"),
    "csv-id": (b"0,1\n0,2\n0,3\n0,16\n", "line 4: expert 16 outside [0, 16)"),
    "json-count": (b'{"per_layer": {"0": {"1": -3}}}', "is not a count"),
    "json-layer": (b'{"per_layer": {"x": {}}}', "is not a layer number"),
    "json-cut": (b'{"per_layer": {"0": {"1": 3', "unreadable JSON"),
    "json-other": (b'{"hello": 1}', "neither tracer statistics"),
    "reap-len": (b'{"0": {"total_tokens": 1, "activation_counts": [1, 2]}, "1": {"total_tokens": 1, '
                 b'"activation_counts": [1]}}', "1 activation_counts, layer 0 has 2"),
    "reap-model": (b'{"0": {"total_tokens": 1, "activation_counts": [1, 2]}}', "2 experts per layer, but the model"),
    "unknown": (b"\x00\x01\x02garbage", "not a gguf-experts trace nor a known format"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_one_line_exit_2(run_cli, tiny, tmp_path, case):
    data, msg = BAD[case]
    p = tmp_path / "bad.dat"
    p.write_bytes(data)
    for argv in (["stats", p, "--model", tiny["model"]], ["diff", p, p, "-m", tiny["model"]]):
        r = run_cli(*argv)
        assert r.rc == 2 and r.err.count("\n") == 1 and msg in r.err and "Traceback" not in r.err, (case, r.err)
    assert not (tmp_path / "o.bin").exists()


@pytest.mark.parametrize("values,msg", [([1.5, 2, 3], "not counts"), ([5.0], "legacy imatrix")])
def test_bad_imatrix(run_cli, tiny, tmp_path, values, msg):
    p = tmp_path / "i.gguf"
    _imatrix(p, np.array(values))
    r = run_cli("stats", p)
    assert r.rc == 2 and r.err.count("\n") == 1 and msg in r.err, r.err


def test_imatrix_output_needs_a_file_and_the_model(run_cli, tiny, tmp_path):
    r = run_cli("stats", tiny["trace"], "--format", "imatrix")
    assert r.rc == 2 and "give -o FILE.gguf" in r.err and r.err.count("\n") == 1
    r = run_cli("stats", tiny["trace"], "--format", "imatrix", "-o", tmp_path / "i.gguf")
    assert r.rc == 2 and "needs --model" in r.err and not (tmp_path / "i.gguf").exists()


def test_formats_that_need_the_model_say_so(run_cli, tmp_path):
    for name, data in (("a", b"0,1\n0,2\n"), ("b", b"RTRACE01" + struct.pack("<ii", M, 0))):
        p = tmp_path / name
        p.write_bytes(data)
        r = run_cli("stats", p)
        assert r.rc == 2 and "pass the model it was made with (--model" in r.err, r.err
    r = run_cli("convert", tmp_path / "a", tmp_path / "o.bin")
    assert r.rc == 2 and "--model" in r.err


@pytest.mark.parametrize("fmt,name", [("moe-trace-csv", "x.csv"), ("rtrace", "x.rtrace")])
def test_cache_sim_reads_formats_that_need_the_model(run_cli, tiny, tmp_path, fmt, name):
    """moe-trace CSV and RTRACE01 do not say k: cache-sim takes it from --model, with the trace's hit rates."""
    out = tmp_path / name
    assert run_cli("convert", tiny["trace"], out, "--to", fmt).rc == 0
    want = run_cli("cache-sim", tiny["trace"], "--capacity", "4,8", "-f", "csv")
    assert want.rc == 0, want.err
    assert run_cli("cache-sim", out, "--capacity", "4,8", "-f", "csv").rc == 2  # k unknown without --model
    got = run_cli("cache-sim", out, "--model", tiny["model"], "--capacity", "4,8", "-f", "csv")
    assert got.rc == 0, got.err
    cols = ["layer", "policy", "capacity", "accesses", "hits"]
    a = pd.read_csv(io.StringIO(want.out))[cols]
    b = pd.read_csv(io.StringIO(got.out))[cols]
    if fmt == "moe-trace-csv":  # same tokens in the same order: the same hits
        assert a.equals(b)
    else:  # RTRACE01 has no sequences: one stream, so only the request counts are comparable
        assert a["accesses"].sum() == b["accesses"].sum()
