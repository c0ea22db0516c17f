"""`gguf-experts run`: the C preload tracer in real, unchanged llama.cpp programs (llama-cpp-python apps here;
llama-server in test_run_server.py). Every check compares with the in-process Python recorder."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [live] extra) is not installed")

from gguf_experts.demo import tinymodel
from gguf_experts.trace.reader import read_trace, read_trace_header
from gguf_experts.trace.preload.run import build_preload, sequences_path

from run_support import capture_requests, compare, rows_of, sequence_tokens
from waits import read_until, wait_pid

pytestmark = pytest.mark.live
GGE = [sys.executable, "-m", "gguf_experts"]
PROMPT = "Once upon a time, a small robot wandered into the forest"

#: a high-level llama-cpp-python program, unchanged by us: Llama(...).create_completion
COMPLETION_SCRIPT = textwrap.dedent("""
    import sys
    from llama_cpp import Llama
    # flash attention on, as the in-process capture has it (llama.cpp's default): the same numerics
    llm = Llama(sys.argv[1], n_ctx=512, verbose=False, seed=1, n_threads=2, flash_attn=True)
    # the tiny model's vocabulary is bytes: keep the greedy text ASCII so that max_tokens is honoured
    bias = {i: -100.0 for i in range(3 + 0x80, 3 + 0x100)}
    for prompt in sys.argv[3:]:
        out = llm.create_completion(prompt, max_tokens=int(sys.argv[2]), temperature=0.0, logit_bias=bias)
        print(repr(out["choices"][0]["text"]), flush=True)
""")


@pytest.fixture(scope="module")
def lib() -> Path:
    return build_preload()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {a: tinymodel.make_tiny_model(d / f"{a}.gguf", arch=a, seed=1) for a in ("qwen3moe", "gpt-oss")}


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("scripts") / "complete.py"
    p.write_text(COMPLETION_SCRIPT)
    return p


def gge(*args: object, env: dict[str, str] | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GGE, *map(str, args)], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_print_preload_builds_once_into_the_cache(lib: Path) -> None:
    r = gge("run", "--print-preload")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == lib and lib.is_file()
    # plain C: no C++ runtime, no libpython
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, timeout=60).stdout
    assert "libstdc++" not in needed and "libpython" not in needed


def test_missing_compiler_is_one_line_and_capture_still_works(tmp_path: Path, models: dict[str, Path]) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "CC": "no-such-cc"}
    r = gge("run", "-o", tmp_path / "t.bin", "--", "true", env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no C compiler" in lines[0] and "capture" in lines[0], r.stderr
    c = gge("capture", models["qwen3moe"], "-p", "hi", "-n", "2", "-o", tmp_path / "c.bin", "--no-progress", env=env)
    assert c.returncode == 0, c.stderr


def test_unknown_program_is_refused(tmp_path: Path, lib: Path) -> None:
    r = gge("run", "-o", tmp_path / "t.bin", "--", "no-such-program-xyz")
    assert r.returncode == 2 and "no such program" in r.stderr and "Traceback" not in r.stderr


def expert_bytes(raw: bytes) -> bytes:
    """The expert records of a trace body, byte for byte, without its measurement records (timings differ)."""
    out, o = [], 0
    while o < len(raw):
        if raw[o:o + 4] == b"GEXM":
            o += 48
            continue
        n = int.from_bytes(raw[o + 4:o + 8], "little")
        out.append(raw[o:o + n])
        o += n
    return b"".join(out)


@pytest.mark.parametrize("arch", ["qwen3moe", "gpt-oss"])
@pytest.mark.parametrize("weights", [False, True])
def test_program_with_its_own_callback_is_chained_and_traces_agree(tmp_path: Path, models: dict[str, Path],
                                                                    lib: Path, arch: str, weights: bool) -> None:
    """`gguf-experts capture` sets its own eval callback: under `run` both are called, and both traces hold
    the same rows, byte for byte (same record layout, CRCs included)."""
    run_t, cap_t = tmp_path / "run.bin", tmp_path / "cap.bin"
    w = ["--weights"] if weights else []
    r = gge("run", "-o", run_t, *w, "--", *GGE, "capture", models[arch], "-p", PROMPT, "-n", "10",
            "--ubatch-size", "16", *w, "-o", cap_t, "--no-progress", "-f", "csv")
    assert r.returncode == 0, r.stderr
    a, b = read_trace(run_t), read_trace(cap_t)
    assert len(a) > 0 and a.header.fingerprint == b.header.fingerprint
    for f in ("seq", "phase", "pos", "token", "layer", "experts"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    if weights:
        assert a.weights is not None and b.weights is not None and np.array_equal(a.weights, b.weights)
    else:
        assert a.weights is None
    ra, rb = run_t.read_bytes(), cap_t.read_bytes()
    assert (expert_bytes(ra[read_trace_header(run_t).size:]) == expert_bytes(rb[read_trace_header(cap_t).size:])
            != b"")
    assert a.io is not None and b.io is not None  # one measurement per ubatch in both, at the same places
    for f in ("seq", "phase", "n_tokens", "row"):
        assert np.array_equal(getattr(a.io, f), getattr(b.io, f)), f
    assert not sequences_path(run_t).exists()  # folded into the header at exit
    assert a.header.meta["sequences"] == [[0, 0, 0, 0, 0]]


def test_keepalive_mode_gives_the_same_trace(tmp_path: Path, models: dict[str, Path], script: Path,
                                             lib: Path) -> None:
    traces = {}
    for mode in ("callback", "keepalive"):
        for weights in (False, True):
            t = tmp_path / f"{mode}{weights}.bin"
            r = gge("run", "--mode", mode, *(["--weights"] if weights else []), "-o", t, "--",
                    sys.executable, script, models["qwen3moe"], 8, PROMPT, "The capital of France")
            assert r.returncode == 0, r.stderr
            traces[mode, weights] = read_trace(t)
            assert traces[mode, weights].header.meta["mode"] == mode
    for weights in (False, True):
        a, b = traces["callback", weights], traces["keepalive", weights]
        assert len(a) > 0
        for f in ("seq", "phase", "pos", "token", "layer", "experts", "weights"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None and y is None) or np.array_equal(x, y), (f, weights)


def test_keepalive_reads_gpt_oss_softmax_weights(tmp_path: Path, models: dict[str, Path], script: Path,
                                                 lib: Path) -> None:
    """gpt-oss's applied weights (`ffn_moe_weights_softmax`) are a reshape VIEW of an unnamed softmax: keep-alive
    must keep the view's source alive, or it reads reused memory (it once recorded pre-softmax values)."""
    traces = {}
    for mode in ("callback", "keepalive"):
        t = tmp_path / f"{mode}.bin"
        r = gge("run", "--mode", mode, "--weights", "-o", t, "--", sys.executable, script, models["gpt-oss"], 6,
                PROMPT)
        assert r.returncode == 0, r.stderr
        traces[mode] = read_trace(t)
    a, b = traces["callback"], traces["keepalive"]
    assert len(a) > 0 and a.weights is not None and b.weights is not None
    assert np.array_equal(a.experts, b.experts) and np.array_equal(a.weights, b.weights)
    assert np.allclose(b.weights.sum(axis=1), 1.0, atol=1e-5)  # a softmax over the k selected logits


def test_high_level_llama_script_equals_in_process_capture(tmp_path: Path, models: dict[str, Path],
                                                           script: Path, lib: Path) -> None:
    t = tmp_path / "t.bin"
    prompts = [PROMPT, "Once upon a time, there was a", "def add(a, b):\n    return a + b"]
    r = gge("run", "-o", t, "--", sys.executable, script, models["qwen3moe"], 12, *prompts)
    assert r.returncode == 0, r.stderr
    d = read_trace(t)
    meta = d.header.meta
    assert meta["tool"] == "gguf-experts run" and not meta["fingerprint_pending"]
    assert meta["command"][0] == sys.executable and meta["model_path"] == str(models["qwen3moe"].resolve())
    seqs = sequence_tokens(d)
    assert sorted(seqs) == [0, 1, 2]  # one trace sequence per request
    assert [row[3] for row in meta["sequences"]] == [0, 1, 2]  # the request index of llama sequence 0
    assert meta["sequences"][1][4] > 0  # llama-cpp-python reused the common prefix "Once upon a time, "
    caps = capture_requests(models["qwen3moe"], [seqs[s] for s in sorted(seqs)])
    for s, cap in zip(sorted(seqs), caps):
        toks, n_prompt, _ = seqs[s]
        assert len(toks) - n_prompt == 11  # 12 tokens generated: 11 decoded
        res = compare(rows_of(d, s), cap)
        assert res["rows"] > 0 and not res["missing"] and not res["differ"], (s, res)


THREADS_SCRIPT = textwrap.dedent("""
    import sys, threading
    from llama_cpp import Llama
    bias = {i: -100.0 for i in range(3 + 0x80, 3 + 0x100)}
    def work(prompts):
        llm = Llama(sys.argv[1], n_ctx=512, verbose=False, seed=1, n_threads=1, flash_attn=True)
        for p in prompts:
            llm.create_completion(p, max_tokens=10, temperature=0.0, logit_bias=bias)
    ts = [threading.Thread(target=work, args=(ps,)) for ps in (sys.argv[2:4], sys.argv[4:6])]
    for t in ts: t.start()
    for t in ts: t.join()
""")


def test_two_contexts_in_two_threads(tmp_path: Path, models: dict[str, Path], lib: Path) -> None:
    """Two Llama instances of the same model decoding at the same time in two threads (llama-cpp-python
    releases the GIL in llama_decode): both are traced, as separate contexts, and every request's rows equal
    the in-process capture."""
    s = tmp_path / "threads.py"
    s.write_text(THREADS_SCRIPT)
    t = tmp_path / "t.bin"
    prompts = [PROMPT, "The quick brown fox jumps", "def add(a, b):", "Once upon a time, there was a"]
    r = gge("run", "-o", t, "--", sys.executable, s, models["qwen3moe"], *prompts)
    assert r.returncode == 0, r.stderr
    assert "not tracing" not in r.stderr
    d = read_trace(t)
    table = d.header.meta["sequences"]
    assert len(table) == 4 and {row[1] for row in table} == {0, 1}
    seqs = sequence_tokens(d)
    for ctx in (0, 1):
        order = [row[0] for row in table if row[1] == ctx]
        caps = capture_requests(models["qwen3moe"], [seqs[q] for q in order])
        for q, cap in zip(order, caps):
            res = compare(rows_of(d, q), cap)
            assert res["rows"] > 0 and not res["missing"] and not res["differ"], (q, res)


def test_env_form_reader_fills_the_fingerprint_and_finalize(tmp_path: Path, models: dict[str, Path],
                                                            script: Path, lib: Path) -> None:
    t = tmp_path / "env.bin"
    env = {**os.environ, "GGUF_EXPERTS_TRACE": str(t), "LD_PRELOAD": str(lib)}
    r = subprocess.run([sys.executable, script, models["qwen3moe"], "6", PROMPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sequences_path(t).exists()
    h = read_trace_header(t)  # the reader fills what the C side could not
    assert h.meta["fingerprint_pending"] is False and h.meta["sequences"] == [[0, 0, 0, 0, 0]]
    j = gge("join-trace", t, "--model", models["qwen3moe"], "-f", "csv")
    assert j.returncode == 0 and "activations" in j.stdout, j.stderr
    before = read_trace(t)
    f = gge("run", "--finalize", t)
    assert f.returncode == 0, f.stderr
    assert not sequences_path(t).exists()
    after = read_trace(t)
    assert after.header.fingerprint == before.header.fingerprint and np.array_equal(after.experts, before.experts)
    # another model is refused: the fingerprint is real
    j2 = gge("join-trace", t, "--model", models["gpt-oss"])
    assert j2.returncode == 2 and "architecture" in j2.stderr


#: the same program, streaming: one line per generated token, flushed (the readiness signal of the kill test)
STREAM_SCRIPT = textwrap.dedent("""
    import sys
    from llama_cpp import Llama
    llm = Llama(sys.argv[1], n_ctx=512, verbose=False, seed=1, n_threads=2, flash_attn=True)
    bias = {i: -100.0 for i in range(3 + 0x80, 3 + 0x100)}
    for part in llm.create_completion(sys.argv[3], max_tokens=int(sys.argv[2]), temperature=0.0,
                                      logit_bias=bias, stream=True):
        print("token", flush=True)
""")


def test_kill_9_keeps_every_complete_ubatch(tmp_path: Path, models: dict[str, Path], lib: Path) -> None:
    """kill -9 once the program has streamed 40 tokens (each one's ubatch was written before it was sampled):
    the trace holds whole ubatches only."""
    t = tmp_path / "k.bin"
    s = tmp_path / "stream.py"
    s.write_text(STREAM_SCRIPT)
    env = {**os.environ, "GGUF_EXPERTS_TRACE": str(t), "LD_PRELOAD": str(lib)}
    p = subprocess.Popen([sys.executable, s, models["qwen3moe"], "400", PROMPT], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert p.stdout is not None
        read_until(p.stdout.fileno(), lambda out: out.count(b"token\n") >= 40, timeout=120)
    finally:
        p.kill()
        p.wait(timeout=60)
    d = read_trace(t)
    n_layer = d.header.fingerprint.n_layer
    per_layer = np.bincount(d.layer, minlength=n_layer)
    assert per_layer[0] > 20
    # whole ubatches only: every layer has the rows of every decode step written
    dec = d.phase == 1
    assert len(set(np.bincount(d.layer[dec], minlength=n_layer).tolist())) == 1


SIGNAL_SCRIPT = textwrap.dedent("""
    import os, select, signal, sys
    # each delivered SIGTERM/SIGINT writes one byte into the wakeup pipe: count deliveries without polling
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: None)
    print("ready", flush=True)
    got = b""
    if select.select([r], [], [], 60)[0]:
        got += os.read(r, 16)
        if select.select([r], [], [], 0.3)[0]:  # a duplicate would arrive now
            got += os.read(r, 16)
    sys.exit(10 + len(got))
""")


def test_exit_status_and_sigterm_pass_through(tmp_path: Path, lib: Path) -> None:
    r = gge("run", "-o", tmp_path / "t.bin", "--", sys.executable, "-c", "import sys; sys.exit(3)")
    assert r.returncode == 3 and "no trace written" in r.stderr
    s = tmp_path / "sig.py"
    s.write_text(SIGNAL_SCRIPT)
    p = subprocess.Popen([*GGE, "run", "-o", tmp_path / "t.bin", "--", sys.executable, s],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert p.stdout is not None
    read_until(p.stdout.fileno(), lambda out: b"ready\n" in out, timeout=60)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 11  # exactly one signal reached the program
    # a program killed by a signal: 128 + N, as a shell reports it
    r = gge("run", "-o", tmp_path / "t.bin", "--", sys.executable, "-c", "import os; os.kill(os.getpid(), 9)")
    assert r.returncode == 128 + 9


def test_ctrl_c_in_a_terminal_reaches_the_program_once(tmp_path: Path, lib: Path) -> None:
    """Under a real pty the terminal's SIGINT goes to the whole foreground group: it must not be forwarded
    a second time (llama-server aborts on a second Ctrl-C)."""
    import pty

    s = tmp_path / "sig.py"
    s.write_text(SIGNAL_SCRIPT)
    pid, fd = pty.fork()
    if pid == 0:  # the child: a new session whose controlling terminal is the pty
        os.execv(sys.executable, [*GGE, "run", "-o", str(tmp_path / "t.bin"), "--", sys.executable, str(s)])
    read_until(fd, lambda out: b"ready" in out, timeout=60)
    os.write(fd, b"\x03")  # Ctrl-C, through the terminal's line discipline
    status = wait_pid(pid, timeout=60)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 11
