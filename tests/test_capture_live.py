"""Live capture through the real llama.cpp: what a wrong capture would break.

Ids valid and distinct, exactly the top-k of the router probabilities (observed in the same graph), weights
equal to those probabilities after the architecture's normalisation, rows mapped to the right positions
(prefill == token-by-token decode; the last layer's output-only rows), ubatch splits, trace round-trip,
quantized models, the CLI.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [live] extra) is not installed: "
                    "pip install 'gguf-experts[live]'")

from gguf_experts.demo import tinymodel
from gguf_experts.cli import main
from gguf_experts.heat import join
from gguf_experts.trace.format import PHASE_DECODE, PHASE_PREFILL
from gguf_experts.trace.reader import read_trace
from gguf_experts.trace.live.llama import MemorySink, TracedLlama
from gguf_experts.trace.live.capture import Recorder, capture
from gguf_experts.gguf.fingerprint import model_fingerprint

pytestmark = pytest.mark.live
ARCHES = ("qwen3moe", "gpt-oss")
TEXT = ("def add(a, b):\n    return a + b\n\nQ: What is 12 * 7? A: 84. Once upon a time, a small robot "
        "wandered into the forest and met an owl.")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {a: tinymodel.make_tiny_model(d / f"{a}.gguf", arch=a, seed=1) for a in ARCHES}


def run_extra(path: Path, text: str = TEXT, n_predict: int = 8, n_ubatch: int = 512,
              logits: str = "last") -> tuple[TracedLlama, MemorySink]:
    sink = MemorySink()
    llm = TracedLlama(path, sink, model_fingerprint(path), weights=True, n_ctx=512, n_ubatch=n_ubatch,
                      observe_extra=True, n_threads=2)
    llm.generate(text, n_predict, ignore_eos=True, logits=logits)
    return llm, sink


def by_pos_layer(sink: MemorySink) -> dict[tuple[int, int], np.ndarray]:
    out = {}
    for r in sink.records:
        for i, p in enumerate(r["pos"]):
            out[(int(p), r["layer"])] = r["experts"][i]
    return out


@pytest.mark.parametrize("arch", ARCHES)
def test_ids_are_topk_of_probs_and_weights_normalised(models: dict[str, Path], arch: str) -> None:
    llm, sink = run_extra(models[arch])
    fp = llm.fp
    k, n_exp = fp.n_expert_used, fp.n_expert
    checked = 0
    for ub in llm.extras_log:
        for layer, ids in ub["topk"].items():
            probs = ub["ffn_moe_probs"][layer]
            w = ub["weights"][layer]
            assert ids.shape == (probs.shape[0], k) and w.shape == ids.shape
            assert ids.min() >= 0 and ids.max() < n_exp
            assert (np.sort(ids, axis=1)[:, 1:] != np.sort(ids, axis=1)[:, :-1]).all()  # distinct per token
            picked = np.take_along_axis(probs, ids, axis=1)
            kth = picked.min(axis=1)
            rest = probs.copy()
            np.put_along_axis(rest, ids, -np.inf, axis=1)
            # every unselected expert scores no higher than the weakest selected one: ids = top-k
            assert (rest.max(axis=1) <= kth + 1e-6).all()
            assert (np.diff(picked, axis=1) <= 1e-6).all()  # slot order = descending score
            if arch == "gpt-oss":  # probs are raw logits; weights = softmax over the selected logits
                e = np.exp(picked - picked.max(axis=1, keepdims=True))
                expect = e / e.sum(axis=1, keepdims=True)
            else:  # softmax probs; weights renormalised over the top-k
                assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
                expect = picked / picked.sum(axis=1, keepdims=True)
            np.testing.assert_allclose(w, expect, rtol=1e-5, atol=1e-6)
            checked += ids.shape[0]
    assert checked > 100
    # the written records carry exactly these ids/weights
    rec_w = np.concatenate([r["weights"] for r in sink.records])
    assert np.allclose(rec_w.sum(axis=1), 1.0, atol=1e-5)
    # routing is not degenerate: different tokens pick different experts, every expert gets used
    allx = np.concatenate([r["experts"] for r in sink.records if r["layer"] == 0])
    assert len({tuple(sorted(x)) for x in allx}) > 10
    assert (np.bincount(allx.ravel(), minlength=n_exp) > 0).sum() >= n_exp * 3 // 4
    llm.close()


@pytest.mark.parametrize("arch", ARCHES)
def test_rows_map_to_positions(models: dict[str, Path], arch: str) -> None:
    llm, sink = run_extra(models[arch], n_predict=5)
    n_layer, k = llm.fp.n_layer, llm.fp.n_expert_used
    toks = llm.tokenize(TEXT)
    n = len(toks)
    pre = [r for r in sink.records if r["phase"] == PHASE_PREFILL]
    dec = [r for r in sink.records if r["phase"] == PHASE_DECODE]
    assert sorted({r["layer"] for r in pre}) == list(range(n_layer))
    for r in pre:
        assert r["experts"].shape[1] == k
        if len(r["pos"]) == n:
            assert (r["pos"] == np.arange(n)).all() and (r["tokens"] == np.asarray(toks)).all()
        else:  # last layer after get_rows(inp_out_ids): only the output row, at the last position
            assert r["layer"] == n_layer - 1 and r["pos"].tolist() == [n - 1] and r["tokens"].tolist() == [toks[-1]]
    assert len(dec) == 5 * n_layer
    assert sorted({int(r["pos"][0]) for r in dec}) == list(range(n, n + 5))
    llm.close()


@pytest.mark.parametrize("arch", ARCHES)
def test_prefill_equals_token_by_token(models: dict[str, Path], arch: str) -> None:
    path = models[arch]
    sink = MemorySink()
    with TracedLlama(path, sink, model_fingerprint(path), n_ctx=512, n_threads=2) as llm:
        toks = llm.tokenize(TEXT)
        llm.new_sequence()
        llm.eval(toks, logits="all")          # one ubatch, every row an output
        whole = by_pos_layer(sink)
        sink.records.clear()
        llm.new_sequence()
        for t in toks:                        # token by token, as in decoding
            llm.eval([t], phase=PHASE_DECODE)
        single = by_pos_layer(sink)
        sink.records.clear()
    assert whole.keys() == single.keys() and len(whole) == len(toks) * llm.fp.n_layer
    same = np.mean([set(whole[key]) == set(single[key]) for key in whole])
    assert same >= 0.98, same  # batched vs single-row matmuls may flip a rare near-tie


def test_ubatch_split_keeps_positions(models: dict[str, Path]) -> None:
    path = models["qwen3moe"]
    _, one = run_extra(path, n_predict=0, logits="all")
    _, split = run_extra(path, n_predict=0, n_ubatch=16, logits="all")
    a, b = by_pos_layer(one), by_pos_layer(split)
    assert a.keys() == b.keys()
    assert max(len(r["pos"]) for r in split.records) == 16
    assert np.mean([set(a[key]) == set(b[key]) for key in a]) >= 0.98
    # logits for the last token only: chunks before the last have no output rows, so qwen3moe's last
    # layer routes nothing there; every other layer still covers every position
    _, last = run_extra(path, n_predict=0, n_ubatch=16, logits="last")
    c = by_pos_layer(last)
    n = max(p for p, _ in a) + 1
    assert {key for key in c if key[1] != 3} == {key for key in a if key[1] != 3}
    assert [p for p, layer in c if layer == 3] == [n - 1]


@pytest.mark.parametrize("arch", ARCHES)
def test_trace_round_trip_and_join(tmp_path: Path, models: dict[str, Path], arch: str) -> None:
    path = models[arch]
    out = tmp_path / "t.bin"
    sink = MemorySink()
    with Recorder(out, weights=True) as rec:
        llm = rec.llama(path, n_ctx=256, n_threads=2)
        mem = TracedLlama(path, sink, rec.fingerprint, weights=True, n_ctx=256, n_threads=2)
        for prompt in ("hello there", "2+2="):
            llm.generate(prompt, 6, ignore_eos=True)
            mem.generate(prompt, 6, ignore_eos=True)
        mem.close()
    tr = read_trace(out)
    assert tr.header.fingerprint == model_fingerprint(path)
    assert tr.header.meta["weights"] is True
    assert np.array_equal(tr.experts, np.concatenate([r["experts"] for r in sink.records]))
    assert np.allclose(tr.weights, np.concatenate([r["weights"] for r in sink.records]))
    assert np.array_equal(tr.pos, np.concatenate([r["pos"] for r in sink.records]))
    assert np.array_equal(tr.seq, np.concatenate([np.full(len(r["pos"]), r["seq"]) for r in sink.records]))
    assert set(tr.seq.tolist()) == {0, 1}
    res = join(out, path)
    per_layer = res.layers.set_index("layer")["activations"]
    rows_per_layer = pd.Series(tr.layer).value_counts().sort_index()
    assert (per_layer.loc[rows_per_layer.index] == rows_per_layer * tr.header.fingerprint.n_expert_used).all()


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M", "MXFP4_MOE"])
@pytest.mark.parametrize("arch", ARCHES)
def test_requantized_models_capture(tmp_path: Path, arch: str, quant: str) -> None:
    p = tinymodel.make_tiny_model(tmp_path / "q.gguf", arch=arch, quant=quant)
    res = capture(p, ["The quick brown fox", "x = [i * i for i in range(10)]"], tmp_path / "q.bin", n_predict=4,
                  weights=True, n_ctx=128, n_threads=2, ignore_eos=True)
    tr = read_trace(tmp_path / "q.bin")
    assert res.sequences == 2 and res.decode_tokens == 8 and not res.interrupted
    assert tr.experts.shape[1] == 4 and tr.experts.min() >= 0 and tr.experts.max() < 16
    assert np.allclose(tr.weights.sum(axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_cli_capture(tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str],
                     fmt: str) -> None:
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"prompt": "Say hi. ", "response": "Hi!"}) + "\n\n"
                  + json.dumps({"instruction": "Add", "input": "1 and 2", "output": "3"}) + "\n"
                  + json.dumps({"text": "plain text"}) + "\n")
    out = tmp_path / "t.bin"
    assert main(["capture", str(models["qwen3moe"]), "--jsonl", str(jl), "-o", str(out), "--format", fmt,
                 "--threads", "2"]) == 0
    text = capsys.readouterr().out
    tr = read_trace(out)
    assert set(tr.seq.tolist()) == {0, 1, 2} and (tr.phase == PHASE_PREFILL).all()  # -n defaults to 0
    if fmt == "json":
        doc = json.loads(text)
        assert doc["sequences"] == 3 and doc["decode_tokens"] == 0
    elif fmt == "csv":
        assert pd.read_csv(__import__("io").StringIO(text))["sequences"].tolist() == [3]
    else:
        assert "3 sequences" in text


def test_cli_capture_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.gguf"
    good = tinymodel.make_tiny_model(tmp_path / "m.gguf")
    data = bytearray(good.read_bytes())
    bad.write_bytes(bytes(data[: len(data) // 2]))  # header intact, tensor data cut off
    assert main(["capture", str(bad), "-p", "hi", "-o", str(tmp_path / "x.bin")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.gguf" in err and "not within the file bounds" in err
    assert not (tmp_path / "x.bin").exists()  # a refused model leaves no trace file
    jl = tmp_path / "e.jsonl"
    jl.write_text('{"nothing": 1}\n')
    assert main(["capture", str(good), "--jsonl", str(jl), "-o", str(tmp_path / "y.bin")]) == 2
    assert "e.jsonl:1" in capsys.readouterr().err
    assert main(["capture", str(good), "-p", "x" * 300, "-c", "64", "-o", str(tmp_path / "z.bin")]) == 2
    assert "ctx-size" in capsys.readouterr().err
    assert not (tmp_path / "z.bin").exists()


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_cli_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                  fmt: str) -> None:
    monkeypatch.setenv("GGUF_EXPERTS_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "demo"
    assert main(["demo", "--dir", str(d), "-n", "4", "--format", fmt, "--threads", "2"]) == 0
    text = capsys.readouterr().out
    tr = read_trace(d / "demo.bin")
    assert sorted(set(tr.seq.tolist())) == [0, 1, 2, 3] and tr.weights is not None
    assert (tr.phase == PHASE_DECODE).sum() == 4 * 4 * tr.header.fingerprint.n_layer
    if fmt == "json":
        doc = json.loads(text)
        assert [k["kind"] for k in doc["kinds"]] == ["code", "chat", "math", "story"]
        assert doc["summary"]["tokens"] == sum(k["tokens"] for k in doc["kinds"])
    elif fmt == "csv":
        df = pd.read_csv(__import__("io").StringIO(text))
        assert df["kind"].tolist() == ["code", "chat", "math", "story"] and (df["decode"] == 4).all()
    else:
        assert "bytes per component" in text and "hottest experts" in text and str(d / "demo.bin") in text


def test_ctrl_c_leaves_a_complete_trace(tmp_path: Path, models: dict[str, Path]) -> None:
    import signal
    import subprocess
    import sys
    import time
    import warnings

    out = tmp_path / "t.bin"
    proc = subprocess.Popen([sys.executable, "-m", "gguf_experts", "capture", str(models["qwen3moe"]), "-p", "go",
                             "-n", "200000", "-c", "200100", "--ignore-eos", "--threads", "1", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while time.time() < deadline and (not out.exists() or out.stat().st_size < 20000):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stdout and "Traceback" not in stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torn record would warn (TraceRecoveryWarning)
        tr = read_trace(out)
    n_layer = tr.header.fingerprint.n_layer
    assert len(tr) > 100 and (tr.phase == PHASE_DECODE).sum() % n_layer == 0  # whole ubatches only


def test_node_cache_is_checked(models: dict[str, Path]) -> None:
    from gguf_experts.trace.live.ggml_ctypes import CaptureError

    path = models["qwen3moe"]
    sink = MemorySink()
    with TracedLlama(path, sink, model_fingerprint(path), n_ctx=256, n_threads=1) as llm:
        llm.generate("abc", 3, ignore_eos=True)
        col = llm.collector
        # a stale positive: the cached observed nodes remember another tensor's name (as if the address now
        # held another node); the name re-check at data time catches it and decides again from the name
        for p in col.probes:
            p.key, p.layer = b"ffn_moe_topk-99\0", 99
        n = len(sink.records)
        llm.eval([65], phase=PHASE_DECODE)
        assert col.stale_pointers > 0
        assert [r["layer"] for r in sink.records[n:]] == list(range(llm.fp.n_layer))
        # a stale negative: the decode shape's map says "not observed" for every node -> refused, not
        # silently missing layers
        for key in list(col.live):
            col.live[key] = False
        with pytest.raises(CaptureError, match="graph changed"):
            llm.eval([66], phase=PHASE_DECODE)


def test_recorder_sequences_unique_and_one_model(tmp_path: Path, models: dict[str, Path]) -> None:
    from gguf_experts.errors import InputError

    out = tmp_path / "t.bin"
    with Recorder(out) as rec:
        a = rec.llama(models["qwen3moe"], n_ctx=128, n_threads=1)
        b = rec.llama(models["qwen3moe"], n_ctx=128, n_threads=1)
        a.generate("one", 1)
        b.generate("two", 1)
        a.generate("three", 1)
        with pytest.raises(InputError, match="one model"):
            rec.llama(models["gpt-oss"])
    tr = read_trace(out)
    assert sorted(set(tr.seq.tolist())) == [0, 1, 2] and tr.weights is None


@pytest.mark.parametrize("arch", ARCHES)
def test_weights_mode_reads_the_same_experts(models: dict[str, Path], arch: str) -> None:
    # with weights, a layer's top-k is read together with its gate weights (one graph split per layer):
    # the ids must equal those of a capture that observes the top-k node on its own
    path = models[arch]
    sinks = []
    for weights in (True, False):
        sink = MemorySink()
        with TracedLlama(path, sink, model_fingerprint(path), weights=weights, n_ctx=256, n_threads=1) as llm:
            llm.generate("hello world, how are you", 12, ignore_eos=True)
            llm.generate("second prompt", 6, ignore_eos=True)
            if weights:
                assert any(p.deferred for p in llm.collector.probes)
        sinks.append(sink)
    a, b = (np.concatenate([r["experts"] for r in s.records]) for s in sinks)
    assert a.shape == b.shape and np.array_equal(a, b)


def test_cli_capture_prompts_file(tmp_path: Path, models: dict[str, Path],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    pf = tmp_path / "p.txt"
    pf.write_text("first prompt\n\n   \nsecond prompt\n")
    out = tmp_path / "t.bin"
    assert main(["capture", str(models["gpt-oss"]), "--prompts", str(pf), "-n", "3", "--ignore-eos", "--weights",
                 "-o", str(out), "--format", "json", "-t", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    tr = read_trace(out)
    assert doc["sequences"] == 2 and doc["decode_tokens"] == 6
    assert doc["records"] == (2 + 6) * tr.header.fingerprint.n_layer  # per ubatch and layer
    n_layer = tr.header.fingerprint.n_layer
    assert (tr.phase == PHASE_DECODE).sum() == 6 * n_layer  # gpt-oss routes every row in every layer
    assert (tr.phase == PHASE_PREFILL).sum() == doc["prefill_tokens"] * n_layer
    assert tr.header.meta["weights"] is True and np.allclose(tr.weights.sum(axis=1), 1.0, atol=1e-5)


def test_trace_joins_with_own_quantization_not_other_model(tmp_path: Path, models: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The quantizer reorders tensors and changes types: same model, so a warning; another model: exit 2."""
    f32 = models["qwen3moe"]
    q8 = tinymodel.make_tiny_model(tmp_path / "q8.gguf", arch="qwen3moe", seed=1, quant="Q8_0")
    other = tinymodel.make_tiny_model(tmp_path / "o.gguf", arch="qwen3moe", seed=1, n_layer=3)
    capture(f32, ["hello there"], tmp_path / "t.bin", n_predict=2, n_ctx=128, n_threads=2, ignore_eos=True)
    capsys.readouterr()
    assert main(["join-trace", str(tmp_path / "t.bin"), "--model", str(q8), "--format", "csv"]) == 0
    err = capsys.readouterr().err
    assert "another quantization" in err and len(err.strip().splitlines()) == 1
    assert main(["join-trace", str(tmp_path / "t.bin"), "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "n_layer" in err and len(err.strip().splitlines()) == 1
