"""Measured I/O from the real llama.cpp: `capture` (in-process) and `run` (the C preload, under a llama-cpp-python
program and under llama-server) write one measurement per ubatch with consistent sums, and a model evicted from
the page cache (posix_fadvise DONTNEED) is seen cold at start and read from disk."""
from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from run_support import evict as drop_from_cache

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [live] extra) is not installed")

from gguf_experts.demo import tinymodel
from gguf_experts.trace.reader import read_trace
from gguf_experts.trace.live.capture import capture
from gguf_experts.trace.format import TraceData
from gguf_experts.trace.iostat import IoCounters, file_resident
from gguf_experts.trace.preload.run import build_preload

pytestmark = pytest.mark.live
GGE = [sys.executable, "-m", "gguf_experts"]
PROMPTS = ["Once upon a time, a small robot wandered into the forest and met an owl. " * 2, "2+2="]

#: an unchanged high-level llama-cpp-python program (as in test_run_live.py)
SCRIPT = textwrap.dedent("""
    import sys
    from llama_cpp import Llama
    llm = Llama(sys.argv[1], n_ctx=512, n_ubatch=16, n_batch=512, verbose=False, seed=1, n_threads=2)
    bias = {i: -100.0 for i in range(3 + 0x80, 3 + 0x100)}
    for prompt in sys.argv[3:]:
        llm.create_completion(prompt, max_tokens=int(sys.argv[2]), temperature=0.0, logit_bias=bias)
""")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.make_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf", seed=1)


def evict(path: Path) -> None:
    """Drop the file from the page cache (clean pages only: fsync first); skip where the file system keeps files
    in memory whatever we advise (tmpfs)."""
    drop_from_cache(path)
    got = file_resident(path)
    assert got is not None
    if got[0] > got[1] // 10:
        pytest.skip(f"{path.parent}: its file system keeps files in memory (tmpfs?); no cold start possible")


def check_ubatches(d: TraceData, first_layer_rows_are_tokens: bool = True) -> None:
    """One measurement per ubatch, linked to its rows: the rows between two measurements carry its sequence and
    phase, and the first MoE layer has one row per token of the ubatch."""
    io = d.io
    assert io is not None and len(io) > 0
    assert (io.read_bytes >= 0).all() and (io.majflt >= 0).all() and (io.wall_ns > 0).all()
    assert io.row[-1] == len(d) and (np.diff(io.row) > 0).all()
    first = int(d.layer.min())
    starts = np.concatenate([[0], io.row[:-1]])
    for s, e, seq, ph, n in zip(starts, io.row, io.seq, io.phase, io.n_tokens):
        rows = slice(int(s), int(e))
        if seq >= 0:
            assert (d.seq[rows] == seq).all()
        if ph < 2:
            assert (d.phase[rows] == ph).all()
        if first_layer_rows_are_tokens:
            assert int((d.layer[rows] == first).sum()) == n
    assert int(io.n_tokens.sum()) == int((d.layer == first).sum())
    st = d.header.meta["io_start"]
    assert st["page_size"] == mmap.PAGESIZE and st["mem_available"] > 0
    assert 0 <= st["model_resident"] <= st["model_size"]


def test_capture_measures_every_ubatch_and_the_sums_hold(tmp_path: Path, model: Path) -> None:
    out = tmp_path / "t.bin"
    c = IoCounters()
    before = c.snapshot()
    res = capture(model, PROMPTS, out, n_predict=6, n_ctx=256, n_ubatch=16, n_threads=2, ignore_eos=True)
    after = c.snapshot()
    c.close()
    d = read_trace(out)
    check_ubatches(d)
    io = d.io
    assert io is not None
    # a ubatch per 16 prompt tokens, then one per generated token, per prompt
    lens = [int(((d.seq == s) & (d.phase == 0) & (d.layer == d.layer.min())).sum()) for s in (0, 1)]
    assert sum(lens) == res.prefill_tokens and int(io.n_tokens.sum()) == res.tokens
    assert len(io) == sum(-(-n // 16) for n in lens) + res.decode_tokens
    assert io.n_tokens[io.phase == 1].tolist() == [1] * res.decode_tokens
    assert d.header.meta["io_start"]["model_size"] == model.stat().st_size
    load = d.header.meta["io_load"]
    assert int(io.read_bytes.sum()) + load["read_bytes"] <= after.read_bytes - before.read_bytes
    assert int(io.majflt.sum()) + load["majflt"] <= after.majflt - before.majflt
    assert int(io.wall_ns.sum()) <= after.ns - before.ns and io.wall_ns.sum() <= res.seconds * 1e9


def test_cold_model_is_seen_cold_and_read_warm_is_not(tmp_path: Path) -> None:
    m = tinymodel.make_tiny_model(tmp_path / "cold.gguf", seed=2)
    size = m.stat().st_size
    evict(m)
    cold, warm = tmp_path / "cold.bin", tmp_path / "warm.bin"
    capture(m, PROMPTS[:1], cold, n_predict=4, n_ctx=256, n_threads=2, ignore_eos=True)
    capture(m, PROMPTS[:1], warm, n_predict=4, n_ctx=256, n_threads=2, ignore_eos=True)
    c, w = read_trace(cold), read_trace(warm)
    assert c.io is not None and w.io is not None
    cs, ws = c.header.meta["io_start"], w.header.meta["io_start"]
    assert cs["model_size"] == ws["model_size"] == size
    assert cs["model_resident"] <= size // 10  # cold: (nearly) nothing of it cached
    assert ws["model_resident"] == size  # the cold run's load brought it all in
    read_cold = c.header.meta["io_load"]["read_bytes"] + int(c.io.read_bytes.sum())
    read_warm = w.header.meta["io_load"]["read_bytes"] + int(w.io.read_bytes.sum())
    assert read_cold >= size * 9 // 10 > size // 10 >= read_warm  # llama.cpp's load read the model from disk


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("scripts") / "complete.py"
    p.write_text(SCRIPT)
    return p


@pytest.mark.parametrize("mode", ["callback", "keepalive"])
def test_run_preload_measures_every_ubatch(tmp_path: Path, model: Path, script: Path, mode: str) -> None:
    """The C tracer: the same structure (one measurement per ubatch, after its records), both modes, cold start."""
    build_preload()
    local = tmp_path / "m.gguf"
    local.write_bytes(model.read_bytes())
    evict(local)
    t = tmp_path / "run.bin"
    r = subprocess.run([*GGE, "run", "--mode", mode, "-o", str(t), "--", sys.executable, str(script), str(local), "5",
                        *PROMPTS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d = read_trace(t)
    assert d.header.version == 2 and not d.recovered
    check_ubatches(d)
    io = d.io
    assert io is not None
    n_prompt = [int(((d.seq == s) & (d.phase == 0) & (d.layer == d.layer.min())).sum()) for s in (0, 1)]
    assert len(io) == sum(-(-n // 16) for n in n_prompt) + int((io.phase == 1).sum())
    assert (io.n_tokens[io.phase == 0] <= 16).all() and (io.n_tokens[io.phase == 1] == 1).all()
    st, load = d.header.meta["io_start"], d.header.meta["io_load"]
    size = local.stat().st_size
    assert st["model_size"] == size and st["model_resident"] <= size // 10
    assert load["read_bytes"] + int(io.read_bytes.sum()) >= size * 9 // 10 and load["wall_ns"] > 0


@pytest.fixture(scope="module")
def server(llama_bin: Path) -> Path:
    build_preload()
    return llama_bin / "llama-server"


def test_llama_server_requests_are_measured(tmp_path: Path, model: Path, server: Path) -> None:
    """Under llama-server: every ubatch measured (prompt and generated tokens), per request."""
    from run_support import free_port, post
    from test_run_server import ServerLog

    port = free_port()
    t = tmp_path / "server.bin"
    proc = subprocess.Popen([*GGE, "run", "-o", str(t), "--", str(server), "-m", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "-c", "512", "-ub", "16", "-t", "2", "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ServerLog(proc).wait_ready(port)  # reads stderr until the program ends (no full pipe)
        for prompt in PROMPTS:
            out = post(port, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0})
            assert out["usage"]["completion_tokens"] == 6
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    d = read_trace(t)
    check_ubatches(d)
    io = d.io
    assert io is not None
    assert sorted(set(io.seq.tolist())) == [0, 1]  # one sequence per request; no ubatch held both
    for s in (0, 1):
        mine = io.seq == s
        assert int(io.n_tokens[mine & (io.phase == 1)].sum()) == 5  # 6 generated, the last one not decoded
        assert int((mine & (io.phase == 0)).sum()) >= 1
    r2 = subprocess.run([*GGE, "stats", str(t), "--by", "io", "-f", "table"], capture_output=True, text=True)
    assert r2.returncode == 0 and "decode" in r2.stdout and "prefill" in r2.stdout


def test_run_without_measuring_writes_the_same_routing(tmp_path: Path, model: Path, script: Path) -> None:
    """GGUF_EXPERTS_MEASURE=0 (the benchmarks' knob): no measurement records, io_start null, same expert rows."""
    build_preload()
    out = {}
    for knob in ("1", "0"):
        t = tmp_path / f"m{knob}.bin"
        env = {**os.environ, "GGUF_EXPERTS_MEASURE": knob}
        r = subprocess.run([*GGE, "run", "-o", str(t), "--", sys.executable, str(script), str(model), "4", PROMPTS[1]],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        out[knob] = read_trace(t)
    on, off = out["1"], out["0"]
    assert on.io is not None and len(on.io) > 0 and off.io is None and off.header.meta["io_start"] is None
    assert np.array_equal(on.experts, off.experts) and np.array_equal(on.pos, off.pos)


def test_report_draws_measured_io_and_says_when_absent(tmp_path: Path, model: Path) -> None:
    import re
    import xml.etree.ElementTree as ET

    from gguf_experts.report import build_report
    from gguf_experts.reporters.html import render_html

    t = tmp_path / "t.bin"
    capture(model, PROMPTS, t, n_predict=6, n_ctx=256, n_ubatch=16, n_threads=2, ignore_eos=True)
    page = render_html(build_report([str(t)], model, cache=False))
    assert "Measured I/O: disk reads and major faults" in page and "Per phase" in page
    svgs = re.findall(r"<svg [^>]*role=\"img\".*?</svg>", page)
    assert len(svgs) == 2  # bytes and faults over time
    for s in svgs:
        root = ET.fromstring(s)  # well-formed
        paths = [e for e in root.iter() if e.tag.endswith("path")]
        assert len(paths) == 1 and paths[0].get("d", "").count("L") >= 2
    d = read_trace(t)
    no_io = TraceData(**{**d.__dict__, "io": None})
    page = render_html(build_report([no_io], model, cache=False))
    assert "no measured I/O in this trace" in page and "<svg" not in page.split("Measured I/O")[1].split("<h2")[0]


def test_llama_server_concurrent_requests_share_ubatches(tmp_path: Path, model: Path, server: Path) -> None:
    """--parallel 2 with two clients at once: ubatches that pack both requests are measured once, as sequence -1
    (phase 2 when they hold prompt and generated rows); the token sums still hold."""
    import threading

    from run_support import free_port, post
    from test_run_server import ServerLog

    port = free_port()
    t = tmp_path / "par.bin"
    proc = subprocess.Popen([*GGE, "run", "-o", str(t), "--", str(server), "-m", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--parallel", "2", "-c", "1024", "-t", "2", "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    errors: list[BaseException] = []
    try:
        ServerLog(proc).wait_ready(port)  # reads stderr until the program ends (no full pipe)
        barrier = threading.Barrier(2)

        def client(prompt: str) -> None:
            try:
                barrier.wait()
                post(port, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0})
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=client, args=(p,)) for p in PROMPTS]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not errors, errors
    d = read_trace(t)
    check_ubatches(d)
    io = d.io
    assert io is not None
    first = int(d.layer.min())
    starts = np.concatenate([[0], io.row[:-1]])
    for s, e, seq, ph in zip(starts, io.row, io.seq, io.phase):
        rows = slice(int(s), int(e))
        assert (seq == -1) == (len(set(d.seq[rows].tolist())) > 1)
        assert (ph == 2) == (len(set(d.phase[rows].tolist())) > 1)
    assert int(io.n_tokens.sum()) == int((d.layer == first).sum()) == 2 * 11 + sum(
        int(((d.seq == q) & (d.phase == 0) & (d.layer == first)).sum()) for q in (0, 1))
