"""`run --paging MODE` around an unchanged llama-server, `capture --paging`, and `pin` (docs/paging.md).

- The trace under every mode equals stock's (paging never changes results).
- The advice lands where it should: after a cold start (the model evicted with posix_fadvise DONTNEED, no load
  pass), the VMAs over the *_exps tensors carry MADV_RANDOM ("rr" in smaps) and the others do not; the experts
  the trace says were selected are resident and the others are not; prefetch reads them ahead (the server's
  major faults drop against random); a low PREFETCH_WHOLE reads whole tensors.
- `pin` locks its ranges (they survive DONTNEED, VmLck counts them) and releases them when killed.
- Bad input: an unknown mode, a model on tmpfs, a program that does not map the model, pin budgets.

The paging model's expert tensors (16 MiB each, 64 experts of 256 KiB) are larger than the device's
read-around on either side of a non-expert tensor (read_ahead_kb, doubled by llama.cpp's FADV_SEQUENTIAL), so
the up_exps tensor, between gate and down, is out of its reach: its residency is the paging's doing alone.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [live] extra) is not installed")

from gguf_experts.demo import tinymodel
from gguf_experts.gguf.reader import open_model
from gguf_experts.gguf.layout import expert_slices
from gguf_experts.trace.reader import read_trace
from gguf_experts.trace.format import TraceData
from gguf_experts.trace.preload.run import build_preload
from run_support import evict, free_port, post, wait_healthy

pytestmark = [pytest.mark.live, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
GGE = [sys.executable, "-m", "gguf_experts"]
PROMPTS = ["Once upon a time, a small robot", "The capital of France is"]
PAGE = mmap.PAGESIZE


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.make_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf", seed=3)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~200 MB: 4 layers x 3 expert tensors of 64 x 256 KiB (F32)."""
    return tinymodel.make_tiny_model(tmp_path_factory.mktemp("models") / "paging.gguf", seed=7, n_layer=4,
                                     n_expert=64, n_expert_used=2, n_embd=128, n_ff_exp=512)


# -- helpers ---------------------------------------------------------------------------------------------------
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def resident(path: Path) -> np.ndarray:
    """mincore over a fresh mapping of the file: 1 per resident page."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    v = np.zeros(-(-size // PAGE), np.uint8)
    try:
        assert _libc.mincore(addr, size, v.ctypes.data) == 0
    finally:
        _libc.munmap(addr, size)
    return v & 1



def slice_residency(model: Path, component: str) -> dict[tuple[int, int], float]:
    """(layer, expert) -> the resident fraction of that expert's slice of ``component`` (whole pages inside it)."""
    r = resident(model)
    s = expert_slices(open_model(model))
    s = s[s["component"] == component]
    out = {}
    for layer, e, off, size in zip(s["layer"], s["expert_id"], s["offset"], s["size"]):
        a, b = -(-int(off) // PAGE), (int(off) + int(size)) // PAGE
        out[(int(layer), int(e))] = float(r[a:b].mean())
    return out



def child_pid(pid: int) -> int | None:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


class Server:
    """llama-server under `gguf-experts run ARGS`, one slot, no warm-up (the warm-up decode is not a request)."""

    def __init__(self, llama_bin: Path, model: Path, run_args: list[str], env: dict[str, str] | None = None,
                 server_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        cmd = [*GGE, "run", *run_args, "--", str(llama_bin / "llama-server"), "-m", str(model), "--host",
               "127.0.0.1", "--port", str(self.port), "--parallel", "1", "-c", "512", "-t", "2", "--no-webui",
               "--no-warmup", *server_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.stderr = ""
        if not wait_healthy(self.proc, self.port):
            if self.proc.poll() is not None:
                raise AssertionError(f"exited early: {self.proc.stderr.read() if self.proc.stderr else ''}")
            self.stop()
            raise AssertionError("llama-server did not become healthy")
        pid = child_pid(self.proc.pid)
        assert pid is not None
        self.pid = pid

    def complete(self, prompt: str, n: int = 8) -> None:
        r = post(self.port, "/completion", {"prompt": prompt, "n_predict": n, "temperature": 0,
                                            "cache_prompt": False})
        assert r["tokens_predicted"] == n

    def majflt(self) -> int:
        return int(Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[9])

    def smaps(self) -> str:
        return Path(f"/proc/{self.pid}/smaps").read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.stderr = self.proc.stderr.read() if self.proc.stderr else ""
        return rc


def rows(d: TraceData) -> np.ndarray:
    """Every row as (seq, pos, layer, phase, token, experts...), in a canonical order."""
    a = np.column_stack([d.seq, d.pos, d.layer, d.phase, d.token, d.experts]).astype(np.int64)
    return a[np.lexsort(a[:, :3].T[::-1])]


def serve_trace(llama_bin: Path, model: Path, trace: Path, mode: str, env: dict[str, str] | None = None,
                ) -> tuple[str, dict[str, Any]]:
    srv = Server(llama_bin, model, ["--paging", mode, "-o", str(trace)], env)
    info: dict[str, Any] = {}
    try:
        for p in PROMPTS:
            srv.complete(p)
        info["majflt"] = srv.majflt()
        info["smaps"] = srv.smaps()
    finally:
        rc = srv.stop()
    assert rc == 0, srv.stderr[-3000:]
    return srv.stderr, info


# -- the trace is the same under every mode ------------------------------------------------------------------
@pytest.fixture(scope="module")
def stock_trace(tmp_path_factory: pytest.TempPathFactory, big: Path, llama_bin: Path) -> Path:
    build_preload()
    t = tmp_path_factory.mktemp("stock") / "stock.bin"
    serve_trace(llama_bin, big, t, "stock")
    return t


@pytest.mark.parametrize("mode", ["random", "prefetch"])
@pytest.mark.parametrize("trace_mode", ["keepalive", "callback"])
def test_trace_equals_stock(tmp_path: Path, tiny: Path, llama_bin: Path, mode: str, trace_mode: str) -> None:
    env = {"GGUF_EXPERTS_PAGING_LOAD": "skip"}
    base = tmp_path / "stock.bin"
    srv_args = ["--mode", trace_mode]
    for m, t in (("stock", base), (mode, tmp_path / f"{mode}.bin")):
        srv = Server(llama_bin, tiny, [*srv_args, "--paging", m, "-o", str(t)], env)
        try:
            for p in PROMPTS:
                srv.complete(p)
        finally:
            assert srv.stop() == 0, srv.stderr[-2000:]
        if m != "stock":
            assert f"gguf-experts: paging {mode} (asked; GGUF_EXPERTS_PAGING_LOAD=skip, no load pass)" in srv.stderr
    a, b = read_trace(base), read_trace(tmp_path / f"{mode}.bin")
    assert len(a) > 0 and len(a.header.meta["sequences"]) == len(PROMPTS)
    assert np.array_equal(rows(a), rows(b))
    assert b.header.meta["paging"] == mode and a.header.meta["paging"] == "stock"


def test_capture_paging_trace_equals_stock(tmp_path: Path, big: Path) -> None:
    """capture --paging re-runs itself under the preload (paging only); its trace is stock's, and the cold
    start reads only the experts it used (no load pass)."""
    out = {}
    for mode in ("stock", "prefetch"):
        evict(big)
        r = subprocess.run([*GGE, "capture", str(big), "-p", PROMPTS[0], "-n", "4", "-o", str(tmp_path / f"{mode}.bin"),
                            "--paging", mode], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "GGUF_EXPERTS_PAGING_LOAD": "skip"})
        assert r.returncode == 0, r.stderr[-2000:]
        out[mode] = slice_residency(big, "ffn_up_exps")
    assert "gguf-experts: paging prefetch (asked; GGUF_EXPERTS_PAGING_LOAD=skip)" in r.stderr
    a, b = read_trace(tmp_path / "stock.bin"), read_trace(tmp_path / "prefetch.bin")
    assert np.array_equal(rows(a), rows(b))
    used = {(int(l_), int(e)) for l_, ex in zip(b.layer, b.experts) for e in ex}
    assert min(out["stock"].values()) == 1.0  # stock's MAP_POPULATE read the whole model
    assert all(out["prefetch"][k] == 1.0 for k in used)
    assert all(v == 0.0 for k, v in out["prefetch"].items() if k not in used)


# -- the advice lands where it should ------------------------------------------------------------------------
def rr_ranges(smaps: str, model: Path) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """File byte ranges of the model's VMAs with and without MADV_RANDOM ("rr" in VmFlags)."""
    real = str(model.resolve())
    rr: list[tuple[int, int]] = []
    other: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None
    for line in smaps.splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
            cur = None
            if len(parts) >= 6 and parts[5] == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                off = int(parts[2], 16)
                cur = (off, off + hi - lo)
        elif parts and parts[0] == "VmFlags:" and cur is not None:
            (rr if "rr" in parts[1:] else other).append(cur)
    return rr, other


def covered(ranges: list[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(a <= lo and hi <= b for a, b in ranges)


@pytest.mark.parametrize("mode", ["random", "prefetch"])
def test_cold_start_advice_and_residency(tmp_path: Path, big: Path, llama_bin: Path, stock_trace: Path,
                                         mode: str) -> None:
    evict(big)
    assert resident(big).sum() == 0
    trace = tmp_path / f"{mode}.bin"
    env = {"GGUF_EXPERTS_PAGING_LOAD": "skip", "GGUF_EXPERTS_PREFETCH_ASYNC": "0"}
    stderr, info = serve_trace(llama_bin, big, trace, mode, env)
    d = read_trace(trace)
    assert np.array_equal(rows(d), rows(read_trace(stock_trace)))
    # MADV_RANDOM on exactly the expert tensors
    rr, other = rr_ranges(info["smaps"], big)
    model = open_model(big)
    for t in model.tensors:
        if "_exps" in t.name:
            assert covered(rr, t.offset, t.offset + t.nbytes), t.name
        elif t.nbytes >= 4 * PAGE:
            inner = (-(-t.offset // PAGE) * PAGE + PAGE, (t.offset + t.nbytes) // PAGE * PAGE - PAGE)
            assert not covered(rr, *inner) and covered(other, *inner), t.name
    # residency: the selected experts' up_exps slices, and nothing else of up_exps
    res = slice_residency(big, "ffn_up_exps")
    used = {(int(l_), int(e)) for l_, ex in zip(d.layer, d.experts) for e in ex}
    assert 0 < len(used) < len(res) // 2
    assert all(res[k] == 1.0 for k in used), [(k, res[k]) for k in used if res[k] < 1]
    # llama-server's start-up check decodes [0, 0] (common's partial-removal probe), untraced by design: its
    # experts (2 tokens x k=2 per layer at most) are the only others allowed
    extra = [k for k, v in res.items() if v and k not in used]
    assert len(extra) <= 2 * 2 * 4 and all(res[k] == 1.0 for k in extra), extra
    # major faults: the up_exps slices alone (gate's head and down's tail may come in with the read-around of
    # the layer's non-expert tensors)
    pages_used = len(used) * (256 << 10) // PAGE
    if mode == "random":  # every page of a selected slice faulted in alone
        assert info["majflt"] >= pages_used, info["majflt"]
    else:  # read ahead before the matmul touched them
        assert info["majflt"] < pages_used // 4, info["majflt"]


@pytest.mark.parametrize("ahead", ["0", "1"])
def test_prefetch_whole_reads_whole_tensors(tmp_path: Path, big: Path, llama_bin: Path, stock_trace: Path,
                                            ahead: str) -> None:
    evict(big)
    env = {"GGUF_EXPERTS_PAGING_LOAD": "skip", "GGUF_EXPERTS_PREFETCH_WHOLE": "0.01",
           "GGUF_EXPERTS_PREFETCH_AHEAD": ahead}
    serve_trace(llama_bin, big, tmp_path / "w.bin", "prefetch", env)
    res = slice_residency(big, "ffn_up_exps")
    assert min(res.values()) == 1.0
    assert np.array_equal(rows(read_trace(tmp_path / "w.bin")), rows(read_trace(stock_trace)))


def test_choose_mode(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gguf_experts.paging.modes import choose_mode, resolve

    size = tiny.stat().st_size
    assert choose_mode(None, 10 << 30).mode == "stock"
    fits = choose_mode(tiny, size + (1 << 30), reserve=1 << 30)
    assert fits.mode == "stock" and fits.load == "keep" and "fits in MemAvailable" in fits.reason
    big = choose_mode(tiny, size + (1 << 30) - 1, reserve=1 << 30)  # the mode: forecast's (tested below)
    assert big.load == "skip" and "does not fit" in big.reason and "forecast recommends" in big.reason
    monkeypatch.delenv("GGUF_EXPERTS_PAGING_LOAD", raising=False)
    assert resolve("random", tiny, available=1, reserve=0).load == "skip"
    assert resolve("random", tiny, available=10 << 30, reserve=0).load == "keep"


def test_stock_keeps_the_load_pass(tmp_path: Path, big: Path, llama_bin: Path) -> None:
    """stock (and auto for a model that fits) changes nothing: MAP_POPULATE reads the model at load."""
    evict(big)
    stderr, info = serve_trace(llama_bin, big, tmp_path / "a.bin", "auto")
    assert "gguf-experts: paging stock (auto: the model (0.2 GiB) fits in MemAvailable" in stderr
    assert resident(big).mean() > 0.99
    assert not rr_ranges(info["smaps"], big)[0]


# -- pin -----------------------------------------------------------------------------------------------------------
@pytest.fixture()
def pin_list(tmp_path: Path) -> Path:
    p = tmp_path / "pins.csv"
    p.write_text("layer,expert,count\n1,5,10\n3,60,9\n0,0,1\n")
    return p


def vmlck_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck")


def start_pin(args: list[str], tmp_path: Path) -> subprocess.Popen[str]:
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([*GGE, "pin", *args, "--ready-file", str(ready), "--format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_pin_locks_and_releases(tmp_path: Path, big: Path, pin_list: Path, how: signal.Signals) -> None:
    evict(big)
    proc = start_pin([str(big), "--budget", "2M", "--pins", str(pin_list)], tmp_path)
    try:
        pinned = [(1, 5), (3, 60)]  # 2 x 3 x 256 KiB fit in 2 MiB; the third does not
        assert 2 * 3 * 256 <= vmlck_kb(proc.pid) <= 2 * 3 * (256 + 4)  # each slice's pages (unaligned: one more)
        for comp in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            evict(big)  # locked pages stay
            res = slice_residency(big, comp)
            assert all(res[k] == 1.0 for k in pinned) and res[(0, 0)] == 0.0
    finally:
        proc.send_signal(how)
        rc = proc.wait(timeout=30)
    assert rc == (0 if how == signal.SIGTERM else -signal.SIGKILL)
    out = json.loads(proc.stdout.read() if proc.stdout else "")
    assert out["experts"] == 2 and out["bytes"] == 2 * 3 * (256 << 10) and out["pid"] == proc.pid
    evict(big)
    assert resident(big).sum() == 0  # nothing left locked


def test_pin_from_trace(tmp_path: Path, big: Path, stock_trace: Path) -> None:
    proc = start_pin([str(big), "--budget", "4M", "--trace", str(stock_trace)], tmp_path)
    try:
        assert 0 < vmlck_kb(proc.pid) <= 4096
        d = read_trace(stock_trace)
        counts = np.bincount(np.repeat(d.layer, d.experts.shape[1]) * 64 + d.experts.reshape(-1), minlength=256)
        top = int(np.argmax(counts))
        evict(big)
        assert slice_residency(big, "ffn_up_exps")[(top // 64, top % 64)] == 1.0  # the hottest is pinned
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


# -- bad input -------------------------------------------------------------------------------------------------
def test_unknown_mode_is_one_line(tmp_path: Path) -> None:
    for cmd in (["run", "--paging", "fast", "--", "true"], ["capture", str(tmp_path / "m.gguf"), "-p", "x", "-o",
                                                            str(tmp_path / "t.bin"), "--paging", "fast"]):
        r = subprocess.run([*GGE, *cmd], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "--paging fast: unknown mode; use one of stock, random, prefetch, auto" in r.stderr


def _drop_ipc_lock() -> None:
    """(preexec) Drop CAP_IPC_LOCK from the bounding set: the exec'd pin has it no more, RLIMIT_MEMLOCK applies."""
    if ctypes.CDLL("libc.so.6", use_errno=True).prctl(24, 14, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_IPC_LOCK
        raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


def test_pin_budget_above_memlock_is_refused(tmp_path: Path, big: Path, pin_list: Path) -> None:
    from gguf_experts.paging.pin import has_ipc_lock

    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    if soft == resource.RLIM_INFINITY:
        pytest.skip("RLIMIT_MEMLOCK is unlimited here")
    pre = _drop_ipc_lock if has_ipc_lock() else None  # a privileged test runner: run pin without the privilege
    r = subprocess.run([*GGE, "pin", str(big), "--budget", str(soft + PAGE), "--pins", str(pin_list)],
                       capture_output=True, text=True, timeout=60, preexec_fn=pre)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "RLIMIT_MEMLOCK" in r.stderr and "ulimit -l" in r.stderr


def test_pin_above_memlock_with_cap_ipc_lock(tmp_path: Path, big: Path) -> None:
    """With CAP_IPC_LOCK the kernel does not apply RLIMIT_MEMLOCK: pin locks more than `ulimit -l`."""
    from gguf_experts.paging.pin import has_ipc_lock

    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    if not has_ipc_lock() or soft == resource.RLIM_INFINITY or soft > 64 << 20:
        pytest.skip("needs CAP_IPC_LOCK and a small RLIMIT_MEMLOCK")
    pins = tmp_path / "many.csv"
    pins.write_text("layer,expert\n" + "".join(f"{layer},{e}\n" for layer in range(4) for e in range(64)))
    budget = soft + (4 << 20)
    proc = start_pin([str(big), "--budget", str(budget), "--pins", str(pins)], tmp_path)
    try:
        assert soft // 1024 < vmlck_kb(proc.pid) <= budget // 1024 + 64
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def _raise_memlock() -> None:
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))


def test_pin_budget_above_free_memory_is_refused(tmp_path: Path, big: Path, pin_list: Path) -> None:
    from gguf_experts.paging.pin import PinLimitError, check_budget
    from gguf_experts.paging.modes import mem_available

    with pytest.raises(PinLimitError, match=r"above the free memory \(MemAvailable 0.00 GiB\)"):
        check_budget(PAGE, 1024)
    from gguf_experts.paging.pin import has_ipc_lock

    avail = mem_available()
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    if avail is None or (not has_ipc_lock() and hard != resource.RLIM_INFINITY and hard <= avail):
        pytest.skip("the hard RLIMIT_MEMLOCK is below MemAvailable: the CLI refuses on the rlimit first")
    r = subprocess.run([*GGE, "pin", str(big), "--budget", str(avail + (1 << 30)), "--pins", str(pin_list)],
                       capture_output=True, text=True, timeout=60, preexec_fn=_raise_memlock)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "MemAvailable" in r.stderr


@pytest.fixture()
def shm_model(tiny: Path) -> Iterator[Path]:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    p = Path("/dev/shm") / f"ggexp-test-{os.getpid()}.gguf"
    p.write_bytes(tiny.read_bytes())
    try:
        yield p
    finally:
        p.unlink(missing_ok=True)


def test_model_on_tmpfs_falls_back_to_stock(tmp_path: Path, shm_model: Path, llama_bin: Path) -> None:
    stderr, _ = serve_trace(llama_bin, shm_model, tmp_path / "t.bin", "prefetch")
    lines = [x for x in stderr.splitlines() if "cannot apply" in x]
    assert lines == [f"gguf-experts: warning: --paging prefetch cannot apply: {shm_model} is on tmpfs (already in "
                     "memory); running as stock"], stderr[-2000:]
    assert read_trace(tmp_path / "t.bin").header.meta["paging"] == "stock"


def test_program_that_does_not_map_the_model(tmp_path: Path, tiny: Path, llama_bin: Path) -> None:
    srv = Server(llama_bin, tiny, ["--paging", "prefetch", "-o", str(tmp_path / "t.bin")],
                 {"GGUF_EXPERTS_PAGING_LOAD": "skip"}, server_args=("--load-mode", "none"))
    try:
        srv.complete(PROMPTS[0])
    finally:
        assert srv.stop() == 0
    lines = [x for x in srv.stderr.splitlines() if "cannot apply" in x]
    assert lines == ["gguf-experts: warning: --paging prefetch cannot apply: the program does not memory-map the "
                     "model (--load-mode none, --no-mmap?); running as stock"], srv.stderr[-2000:]
    assert len(read_trace(tmp_path / "t.bin")) > 0


RELOAD = """
import sys, numpy as np, llama_cpp
out = []
for path in sys.argv[1:]:
    llm = llama_cpp.Llama(path, n_ctx=128, n_threads=2, verbose=False, logits_all=False)
    llm.eval(llm.tokenize(b"Once upon a time"))
    # the context's own last logits (llm.scores is only filled for every row with logits_all=True: reading a row
    # of it here read stale memory, which differed between runs of one mode)
    last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    out.append(np.ctypeslib.as_array(last, shape=(llm.n_vocab(),)).tolist())
    llm.close()
print(repr(out))
"""


def test_models_loaded_one_after_another(tmp_path: Path, big: Path, tiny: Path) -> None:
    """A llama-cpp-python program that frees a model and loads others (the same addresses may come back): under
    prefetch with no trace, the logits are stock's, and each model is paged (learned afresh after munmap)."""
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    outs = {}
    for mode in ("stock", "prefetch"):
        evict(big)
        r = subprocess.run([*GGE, "run", "--paging", mode, "--no-trace", "--", sys.executable, str(script), str(big),
                            str(tiny), str(big)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "GGUF_EXPERTS_PAGING_LOAD": "skip"})
        assert r.returncode == 0, r.stderr[-2000:]
        outs[mode] = r.stdout
        if mode == "prefetch":
            res = slice_residency(big, "ffn_up_exps")
            assert 0 < sum(v == 1.0 for v in res.values()) < len(res) // 2  # only what the prompt selected
    assert outs["stock"] == outs["prefetch"] and outs["stock"].startswith("[[")


def test_auto_without_a_model_on_the_command_line(tmp_path: Path, tiny: Path) -> None:
    """A program that names its model itself: the preload decides when the model is mapped, in one line."""
    script = tmp_path / "reload.py"
    # (verbose: llama-cpp-python points stderr at /dev/null while it loads a model quietly)
    script.write_text(RELOAD.replace("sys.argv[1:]", repr([str(tiny)])).replace("verbose=False", "verbose=True"))
    r = subprocess.run([*GGE, "run", "--no-trace", "--", sys.executable, str(script)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("gguf-experts: paging")]
    assert lines == ["gguf-experts: paging stock (GGUF_EXPERTS_PAGING=auto: the model fits in memory)"], r.stderr


def test_auto_takes_the_mode_forecast_recommends(big: Path) -> None:
    """auto on a model that does not fit: the forecast (a synthetic request of the model's shape, or a trace of
    the workload) picks the mode with the best forecast decode speed; with no possible forecast (a budget below
    what llama.cpp itself needs) it says so and takes prefetch."""
    from gguf_experts.paging.forecast import forecast, synthetic_trace
    from gguf_experts.paging.modes import choose_mode

    size = big.stat().st_size
    avail = size - (8 << 20)
    choice = choose_mode(big, avail, reserve=0)
    table = forecast(synthetic_trace(big), str(big), [avail])
    best = table.sort_values("decode_tok_s", ascending=False).iloc[0]["advice"]
    assert choice.mode == best and "forecast recommends" in choice.reason and choice.load == "skip"
    low = choose_mode(big, 100 << 20, reserve=0)
    assert low.mode == "prefetch" and "no forecast" in low.reason
