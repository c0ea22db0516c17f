"""`capture` records through the C keep-alive tracer of `run`, loaded in-process (trace/live/native.py): its CPU
trace equals the callback's and `run`'s, byte for byte; -ngl without GPU offload is refused; a gpt-oss-shaped MXFP4
model from scripts/make_big_model.py loads and passes the self-check on both paths. Real llama-cpp-python."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [live] extra) is not installed")

from gguf_experts.demo import tinymodel
from gguf_experts.trace.reader import read_trace

pytestmark = pytest.mark.live
GGE = [sys.executable, "-m", "gguf_experts"]
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
PROMPT = "Once upon a time, a small robot wandered into the forest"
FIELDS = ("seq", "phase", "pos", "token", "layer", "experts", "weights")


def gge(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GGE, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    out = {a: tinymodel.make_tiny_model(d / f"{a}.gguf", arch=a, seed=1) for a in ("qwen3moe", "gpt-oss")}
    mx = d / "gptoss-mxfp4.gguf"
    subprocess.run([sys.executable, str(SCRIPTS / "make_big_model.py"), str(mx), "--arch", "gpt-oss", "--quant",
                    "MXFP4", "--layers", "3", "--experts", "8", "--top-k", "2", "--embd", "256", "--ff", "64",
                    "--heads", "4", "--heads-kv", "2", "--head-dim", "64"], check=True, capture_output=True)
    out["mxfp4"] = mx
    return out


def same(a: object, b: object) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None and y is None) or np.array_equal(x, y), f


@pytest.mark.parametrize("arch", ["qwen3moe", "gpt-oss", "mxfp4"])
@pytest.mark.parametrize("weights", [False, True])
def test_capture_keepalive_equals_callback_and_run(tmp_path: Path, models: dict[str, Path], arch: str,
                                                   weights: bool) -> None:
    """Several prompts, prefill in 16-token ubatches (the strided top-k view, copied as k ids per row): the default
    (keep-alive) capture, the callback capture and `run` (keep-alive, preloaded into the callback capture) agree."""
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT}\ndef add(a, b):\n    return a + b and a - b\n")
    w = ["--weights"] if weights else []
    common = [models[arch], "--prompts", prompts, "-n", "6", "--ignore-eos", "--ubatch-size", "16", *w,
              "--no-progress", "-f", "csv", "-t", "1"]
    ka, cb, rn = tmp_path / "ka.bin", tmp_path / "cb.bin", tmp_path / "run.bin"
    r = gge("capture", *common, "-o", ka)
    assert r.returncode == 0, r.stderr
    r = gge("run", "-o", rn, *w, "--", *GGE, "capture", *common, "--mode", "callback", "-o", cb)
    assert r.returncode == 0, r.stderr
    a, b, c = read_trace(ka), read_trace(cb), read_trace(rn)
    assert len(a) > 0 and a.header.meta["tool"] == "gguf-experts capture" and a.header.meta["mode"] == "keepalive"
    assert not a.header.meta.get("fingerprint_pending") and a.header.fingerprint == b.header.fingerprint
    assert sorted(set(a.seq.tolist())) == [0, 1, 2] and set(a.phase.tolist()) == {0, 1}
    same(a, b)
    same(a, c)
    if weights:
        assert a.weights is not None and np.isfinite(a.weights).all()


def test_llama_server_trace_equals_keepalive_capture(tmp_path: Path, models: dict[str, Path], llama_bin: Path) -> None:
    """An unchanged llama-server under `run` (keep-alive), one client, two completions: every row equals `capture`'s
    keep-alive replay of the same tokens (prefix reuse included), experts and weights."""
    from run_support import capture_requests, free_port, post, rows_of, sequence_tokens, wait_healthy

    port, trace = free_port(), tmp_path / "server.bin"
    proc = subprocess.Popen([*GGE, "run", "--weights", "-o", str(trace), "--", str(llama_bin / "llama-server"), "-m",
                             str(models["qwen3moe"]), "--host", "127.0.0.1", "--port", str(port), "--parallel", "1",
                             "-c", "512", "-t", "2", "--no-webui"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert wait_healthy(proc, port), "llama-server did not come up"
        for prompt in (PROMPT, PROMPT + " and found"):
            r = post(port, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
            assert r["usage"]["completion_tokens"] == 8
        proc.terminate()
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    d = read_trace(trace)
    seqs = sequence_tokens(d)
    assert len(seqs) == 2 and d.weights is not None
    caps = capture_requests(models["qwen3moe"], [seqs[s] for s in sorted(seqs)], weights=True, native=True)
    for s, cap in zip(sorted(seqs), caps):
        ran = rows_of(d, s)
        assert ran and ran == cap, s


def test_selfcheck_mxfp4_gpt_oss_both_paths(tmp_path: Path, models: dict[str, Path]) -> None:
    """ids = the top-k of the same run's router output, for the callback and the keep-alive path, 0 violations."""
    p = tmp_path / "p.txt"
    p.write_text(f"{PROMPT}\n" + " ".join(f"def f{i}(x): return x * {i}" for i in range(6)) + "\n")
    r = subprocess.run([sys.executable, str(SCRIPTS / "gpu_selfcheck.py"), str(models["mxfp4"]), "--prompts", str(p),
                        "-n", "6", "--ngl", "0", "0", "--modes", "callback", "keepalive"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "keepalive" in r.stdout and ": 0 (worst" in r.stdout and "SELF-CONSISTENT" in r.stdout


def test_mxfp4_model_holds_mxfp4_experts(models: dict[str, Path]) -> None:
    from gguf_experts.gguf.reader import open_model

    types = {t.name: t.type.name for t in open_model(models["mxfp4"]).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "MXFP4" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert "blk.0.attn_sinks.weight" in types and "blk.0.ffn_up_exps.bias" in types


def test_gpu_layers_without_gpu_offload_is_one_line(tmp_path: Path, models: dict[str, Path]) -> None:
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build offloads to a GPU")
    r = gge("capture", models["qwen3moe"], "-p", "hi", "-n", "2", "-ngl", "8", "-o", tmp_path / "t.bin",
            "--no-progress")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no GPU offload" in r.stderr and not (tmp_path / "t.bin").exists()


@pytest.mark.parametrize("arch", ["qwen3moe", "gpt-oss"])
@pytest.mark.parametrize("weights", [False, True])
def test_device_slots_merge_the_copies_and_change_no_record(tmp_path: Path, models: dict[str, Path], arch: str,
                                                            weights: bool) -> None:
    """The kept argsorts and weight stages placed side by side in one buffer of ours (place_slots; on a GPU by
    default, here in host memory through GGUF_EXPERTS_SLOTS=host): the records are those of the flags alone, and a
    ubatch's ids (and weights) come in at most two copies (the strided top-ks as one 2-D copy; the last layer's
    output rows and the weights as one range), where the flags alone made one per layer."""
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT}\n{PROMPT} and then it rained\n")
    w = ["--weights"] if weights else []
    traces = {}
    for slots in ("host", "0"):
        out = tmp_path / f"s{slots}.bin"
        r = subprocess.run([*GGE, "capture", models[arch], "--prompts", prompts, "-n", "4", "--ignore-eos", *w,
                            "--no-progress", "-t", "1", "-o", out], capture_output=True, text=True, timeout=300,
                           env={**__import__("os").environ, "GGUF_EXPERTS_SLOTS": slots})
        assert r.returncode == 0, r.stderr
        traces[slots] = read_trace(out)
    a, b = traces["host"], traces["0"]
    assert len(a) > 0
    same(a, b)
    ca, cb = a.header.meta["keepalive_copies"], b.header.meta["keepalive_copies"]
    assert ca["ubatches"] == cb["ubatches"] > 0
    assert ca["copies"] <= 2 * ca["ubatches"], ca
    assert cb["copies"] > ca["copies"], (ca, cb)  # the tiny models' layers, apart under the flags


def test_more_schedulers_than_the_table_holds(tmp_path: Path, models: dict[str, Path]) -> None:
    """One process that makes and frees more llama.cpp contexts than the tracer's table of schedulers holds (64):
    a freed scheduler's entry is reused, so the last in-process capture still records (it wrote no rows before)."""
    from gguf_experts.trace.live.capture import capture

    first = capture(models["qwen3moe"], [PROMPT], tmp_path / "t.bin", n_predict=2, n_ctx=128).records
    rows = len(read_trace(tmp_path / "t.bin"))
    assert first > 0 and rows > 0
    for _ in range(66):
        res = capture(models["qwen3moe"], [PROMPT], tmp_path / "t.bin", n_predict=2, n_ctx=128)
        assert res.records == first
    assert len(read_trace(tmp_path / "t.bin")) == rows
