#!/usr/bin/env python
"""Validation harness for paging (issues 18 and 19): a MoE model larger than the page cache, served by stock
llama-server under `gguf-experts run [--paging MODE]`, at several page-cache budgets; measured disk bytes per
token and tokens/s beside `forecast`'s, with the ratio. Not in CI: the full matrix takes hours.

What it does, per configuration (routing shape x budget x mode), one after the other:
- model: scripts/make_big_model.py (Qwen3-30B-A3B shape, Q8_0, 29.6 GiB), in two routing shapes, cached under
  ~/.cache/gguf-experts/big/: `concentrated` (the default model) and `token-dependent` (--token-dependent: the
  token stays in the hidden state, flat router). `fits` is the concentrated shape with fewer layers (--fits-layers),
  a model that fits in RAM (the "nobody else pays" goal).
- cold start: the model's pages are dropped from the page cache with posix_fadvise(DONTNEED) on that one file
  (nothing system-wide), so every configuration starts alike; its residency is recorded.
- budget: an anonymous-memory "balloon" child process maps MAP_ANONYMOUS memory and touches one byte per page until
  MemAvailable is down to the budget (there is no swap: the kernel cannot take it back). It dies with this process
  (PR_SET_PDEATHSIG), is stopped after each configuration (try/finally, SIGINT/SIGTERM handlers) and keeps a safety
  floor: when MemAvailable falls below --floor (3 GiB; other processes run on this machine) it releases memory,
  and the configuration is marked "drifted". Once the server has loaded, it holds MemAvailable at that level
  (gives memory back when other processes take some, takes it again when they free it; --no-track: fixed size),
  so the server's page cache stays put on a shared machine. MemAvailable is sampled every second; its range
  is recorded. No cgroups, no drop_caches, no sysfs writes.
- server: `gguf-experts run -o trace.bin [--paging MODE] -- llama-server -m M -t 2 -c 2048 --parallel 1`; the
  prompts of scripts/data/paging_prompts.jsonl (code and prose, about 120 tokens each) go to /completion with
  temperature 1, a fixed seed, cache_prompt false, ignore_eos, streamed. Per request: the llama-server process's
  own /proc/PID/io read_bytes and /proc/PID/stat majflt (its pid: the wrapper's child, not the wrapper), sampled
  before the request, at the first streamed token (end of prefill) and at the end; the server's timings
  (prompt_n, prompt_ms, predicted_n, predicted_per_token_ms).
- routing check, from the trace: experts never selected per layer within a request (the concentrated shape leaves
  most unused: 82-108 of 128 in a 145-token request of a 48-layer model; token-dependent a handful: median 6),
  and whether the trace equals stock's (paging must not change results).
- forecast: `gguf_experts.paging.forecast.forecast` (issue 18), imported lazily, on the configuration's trace at
  its MemAvailable and mode, with the disk measured once (O_DIRECT, or --disk) and the compute time per token of
  the same shape's least-reading configuration; `recommend` per shape and budget. Without it the forecast columns
  stay empty and the output says so.
- timing caveat: llama.cpp's threads spin at barriers; on a busy 2-core machine -t 2 collapses (a cached 8-layer
  model decoded at 1.7 s/token with -t 2 and 0.23 s/token with -t 1 at load average 8). The load average and
  the server's CPU seconds per wall second are recorded per configuration; bytes do not depend on it.

Outputs (in --out DIR, default ~/.cache/gguf-experts/bench-paging): results.jsonl (one raw record per configuration,
appended as each finishes: an interrupted matrix keeps what it measured), requests.csv (one row per request),
paging.csv and paging.md (one row per configuration, measured and forecast side by side, and the goals of issue 19).
--results-md FILE also writes the markdown there (docs/paging-results.md). --report-only re-renders (and
re-forecasts) from results.jsonl without measuring.

    python scripts/bench_paging.py [--shape concentrated,token-dependent] [--budgets 6,9,13,none]
        [--modes stock,random,prefetch] [--configs SHAPE:BUDGET:MODE,...] [--requests 3] [--n-predict 8]
        [--seed 42] [--out DIR] [--gguf-experts "PYTHON -m gguf_experts"]
        [--results-md docs/paging-results.md] [--report-only] [--layers 48] [--model-dir DIR]
    # with another checkout's gguf-experts (e.g. a branch with `run --paging`; cwd must not be a checkout):
    python scripts/bench_paging.py --gguf-experts "env PYTHONPATH=/path/to/tree /path/to/python -m gguf_experts"
    # forecast columns from a tree that has gguf_experts.paging.forecast, without measuring again:
    cd /tmp && PYTHONPATH=/path/to/tree python /path/to/scripts/bench_paging.py --report-only [--out DIR]
    # quick check on a small model that does not fit a small budget:
    python scripts/bench_paging.py --layers 8 --configs concentrated:4:stock,concentrated:4:prefetch --requests 2 \
        --n-predict 4 --out /tmp/bp-small
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import csv
import io
import json
import mmap
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "scripts" / "data" / "paging_prompts.jsonl"
GiB = 1 << 30
PAGE = mmap.PAGESIZE
SHAPES = ("concentrated", "token-dependent", "fits")
MODES = ("stock", "random", "prefetch")
#: variants of a mode: (the --paging mode, extra environment of the server); the forecast models the base mode
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    **{m: (m, {}) for m in MODES},
    "prefetch-ahead": ("prefetch", {"GGUF_EXPERTS_PREFETCH_AHEAD": "1"}),  # next layer whole after a whole layer
    "prefetch-nowhole": ("prefetch", {"GGUF_EXPERTS_PREFETCH_WHOLE": "2"}),  # never whole tensors
}


def variant(mode: str) -> tuple[str, dict[str, str], float | None]:
    """A mode's base paging mode, the preload's environment, and the GiB that `gguf-experts pin` holds locked
    (`MODE+pinN`: pin N GiB of the hottest experts before the server starts, inside the same budget)."""
    name, _, pin = mode.partition("+pin")
    base, env = VARIANTS[name]
    return base, env, float(pin) if pin else None


PR_SET_PDEATHSIG = 1
CHUNK = 256 << 20  # the balloon grows and shrinks in 256 MiB mappings
DISK_RESERVE = 4_000_000_000  # a model is not made when it would leave less free disk than this
TRACK_SLACK = 384 << 20  # how far MemAvailable may wander from the held level before the balloon moves


# ---------------------------------------------------------------------------------------------- system readings
def mem_available() -> int:
    """MemAvailable in bytes (the kernel's estimate of what can be allocated without swapping)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


MEMINFO_FIELDS = ("MemFree", "Active(file)", "Inactive(file)", "Mapped", "SReclaimable")


def meminfo() -> dict[str, int]:
    """The /proc/meminfo fields that say how much of MemAvailable is other processes' page cache (bytes):
    MemAvailable counts every file page as available, but pages that other processes keep using stay resident
    and share the LRU with the model (the forecast's budget is only what the model's pages can take)."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in MEMINFO_FIELDS:
                out[key] = int(line.split()[1]) * 1024
    return out


def proc_io(pid: int) -> tuple[int, int]:
    """(read_bytes, majflt) of one process: bytes it made the block layer read (readahead included), and its
    major faults (field 12 of /proc/PID/stat, counted after the command name, which may hold spaces)."""
    rb = 0
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                rb = int(line.split()[1])
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return rb, int(rest[9])  # rest[0] is field 3 (state): field 12 is rest[9]


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used: with wall time, whether a step waited on the disk or
    on other processes (the machine is shared: -t 2 threads on 2 cores compete with everything else)."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def model_resident(path: Path) -> int:
    """Bytes of the file resident in the page cache (mincore over a fresh read-only mapping)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return -1
        try:
            vec = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return -1
            import numpy as np
            return int((np.ctypeslib.as_array(vec) & 1).sum()) * PAGE
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    """Drop this one file's clean pages from the page cache (posix_fadvise DONTNEED: nothing system-wide)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages (a model just written) cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_ahead_kb(path: Path) -> int | None:
    """read_ahead_kb of the block device holding path (its whole disk for a partition); None if unknown."""
    dev = os.stat(path).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for q in (base / "queue" / "read_ahead_kb", base / ".." / "queue" / "read_ahead_kb"):
        try:
            return int(q.read_text())
        except OSError:
            continue
    return None


def set_pdeathsig(sig: int) -> None:
    """Ask the kernel to send sig to this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


# ---------------------------------------------------------------------------------------------------- balloon
def balloon_child(target: int, floor: int, parent: int) -> int:
    """The balloon process: grow in CHUNK mappings (one byte written per page) while MemAvailable stays at or
    above target after the next chunk, then sleep, giving memory back whenever MemAvailable < floor.
    On SIGUSR1 (sent once the server has loaded) it starts to hold MemAvailable at its level of that moment:
    it gives memory back when others take some, and takes it again when they give it back (steps of CHUNK,
    TRACK_SLACK of slack), so the server's page cache stays the same while other processes come and go.
    Reports on stdout, one line each: `ready BYTES AVAIL`, `released BYTES AVAIL` (below the floor: the budget
    drifted), `track BYTES AVAIL` (hold level set), `adjust SIGNED_BYTES AVAIL` (tracking)."""
    set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl
        return 1
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    hold: list[int] = []  # the MemAvailable level to hold, once asked
    signal.signal(signal.SIGUSR1, lambda *_: hold.append(mem_available()))
    held: list[mmap.mmap] = []
    ones = b"\x01" * (CHUNK // PAGE)

    def grow() -> None:
        m = mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m[::PAGE] = ones  # touch one byte per page: the kernel must back every page
        held.append(m)

    while mem_available() - CHUNK >= max(target, floor):
        grow()
    print(f"ready {len(held) * CHUNK} {mem_available()}", flush=True)
    reported = 0
    while True:
        time.sleep(0.25)
        avail = mem_available()
        if avail < floor and held:
            want = floor - avail + GiB  # back above the floor with a margin
            freed = 0
            while held and freed < want:
                held.pop().close()
                freed += CHUNK
            print(f"released {freed} {mem_available()}", flush=True)
            hold.clear()  # no tracking after a drift: the floor wins
            continue
        if not hold:
            continue
        level = max(hold[-1], floor + GiB)
        if reported != level:
            reported = level
            print(f"track {len(held) * CHUNK} {level}", flush=True)
        if avail < level - TRACK_SLACK and held:
            n = min(len(held), -(-(level - avail) // CHUNK))
            for _ in range(n):
                held.pop().close()
            print(f"adjust {-n * CHUNK} {mem_available()}", flush=True)
        elif avail > level + TRACK_SLACK and avail - CHUNK >= floor + GiB:
            grow()
            print(f"adjust {CHUNK} {mem_available()}", flush=True)


class Balloon:
    """The parent's handle on the balloon child: start it, read its reports, always stop it."""

    def __init__(self, budget: int, floor: int) -> None:
        self.budget, self.floor = budget, floor
        self.proc: subprocess.Popen[str] | None = None
        self.size = 0
        self.released = 0
        self.ready = threading.Event()
        self.avail_ready = 0
        self.hold_level = 0
        self.adjusted: list[int] = []

    def track(self) -> None:
        """Hold MemAvailable at its present level from now on (the server has loaded: its own memory is in)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)

    def start(self, timeout: float = 300) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--balloon-child",
                                      str(self.budget), str(self.floor), str(os.getpid())],
                                     stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        threading.Thread(target=self._reader, daemon=True).start()
        if not self.ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"the balloon was not ready after {timeout:.0f} s")
        if self.proc.poll() is not None:
            raise RuntimeError(f"the balloon exited with status {self.proc.returncode}")

    def _reader(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            word, n, avail = line.split()
            if word == "ready":
                self.size, self.avail_ready = int(n), int(avail)
                self.ready.set()
            elif word == "track":
                self.hold_level = int(avail)
            elif word == "adjust":
                self.adjusted.append(int(n))
            elif word == "released":
                self.released += int(n)
                log(f"  balloon released {int(n) / GiB:.2f} GiB: MemAvailable fell below the floor "
                    f"({int(avail) / GiB:.2f} GiB now); the budget drifted")
        self.ready.set()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class MemSampler:
    """MemAvailable once a second in a thread, for the range a configuration really ran at."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(mem_available())
            self._stop.wait(1.0)

    def __enter__(self) -> MemSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


# ----------------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_pid(parent: int, name: str, timeout: float = 60) -> int:
    """The pid of parent's child process called name (llama-server under the `gguf-experts run` wrapper)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            comm = st[st.index("(") + 1:st.rindex(")")]
            ppid = int(st.rsplit(")", 1)[1].split()[1])
            if ppid == parent and comm == name[:15]:
                return int(d)
        time.sleep(0.05)
    raise RuntimeError(f"no {name} child of pid {parent} after {timeout:.0f} s")


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 5) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass
class Server:
    """`gguf-experts run -o TRACE [--paging MODE] -- llama-server ...`, with the server's own pid."""

    llama_server: Path
    model: Path
    trace: Path
    mode: str
    gx: list[str]
    log_path: Path
    threads: int = 2
    ctx: int = 2048
    port: int = field(default_factory=free_port)
    paging_flag: bool = True
    extra: list[str] = field(default_factory=list)
    wrapper: subprocess.Popen[bytes] | None = None
    pid: int = 0

    def argv(self) -> list[str]:
        # run's own default is `auto` once --paging exists: stock must be asked for by name
        base, env, _ = variant(self.mode)
        paging = ["--paging", base] if self.paging_flag else []
        envs = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
        return [*envs, *self.gx, "run", "-o", str(self.trace), *paging, "--", str(self.llama_server),
                "-m", str(self.model), "-t", str(self.threads), "-c", str(self.ctx), "--parallel", "1",
                "--host", "127.0.0.1", "--port", str(self.port), *self.extra]

    def start(self, timeout: float) -> None:
        logf = open(self.log_path, "wb")
        # the wrapper gets SIGTERM if we die (it forwards it to the server, which stops cleanly)
        # cwd: not a checkout, so that `python -m gguf_experts` imports the tree that --gguf-experts names
        self.wrapper = subprocess.Popen(self.argv(), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        preexec_fn=lambda: set_pdeathsig(signal.SIGTERM), cwd=self.log_path.parent)
        logf.close()
        self.pid = child_pid(self.wrapper.pid, "llama-server", timeout=300)  # run may compile its preload first
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.wrapper.poll() is not None:
                raise RuntimeError(f"llama-server exited with status {self.wrapper.returncode} while loading; "
                                   f"log: {self.log_path}")
            try:
                if http_json(f"http://127.0.0.1:{self.port}/health").get("status") == "ok":
                    return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"llama-server not ready after {timeout:.0f} s; log: {self.log_path}")

    def stop(self) -> int | None:
        if self.wrapper is None:
            return None
        if self.wrapper.poll() is None:
            self.wrapper.send_signal(signal.SIGTERM)  # forwarded to the server; the wrapper finalises the trace
            try:
                self.wrapper.wait(120)
            except subprocess.TimeoutExpired:
                if self.pid:
                    try:
                        os.kill(self.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.wrapper.kill()
                self.wrapper.wait()
        rc = self.wrapper.returncode
        self.wrapper = None
        return rc

    def tokenize(self, text: str) -> int:
        return len(http_json(f"http://127.0.0.1:{self.port}/tokenize", {"content": text, "add_special": True})
                   ["tokens"])

    def complete(self, prompt: str, n_predict: int, seed: int, timeout: float) -> dict[str, Any]:
        """One streamed /completion; /proc readings of the server before, at the first token, and after."""
        body = {"prompt": prompt, "n_predict": n_predict, "temperature": 1.0, "seed": seed, "cache_prompt": False,
                "ignore_eos": True, "stream": True}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        io0, c0 = proc_io(self.pid), proc_cpu(self.pid)
        t0 = time.perf_counter()
        io1: tuple[int, int] | None = None
        t1 = c1 = 0.0
        stamps: list[float] = []
        text: list[str] = []
        final: dict[str, Any] = {}
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                now = time.perf_counter()
                if io1 is None:
                    io1, t1, c1 = proc_io(self.pid), now, proc_cpu(self.pid)
                stamps.append(now)
                text.append(msg.get("content", ""))
                if msg.get("stop"):
                    final = msg
                    break
        io2, c2 = proc_io(self.pid), proc_cpu(self.pid)
        t2 = time.perf_counter()
        if io1 is None:
            raise RuntimeError("the server streamed nothing")
        tm = final.get("timings", {})
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return {"prompt_n": tm.get("prompt_n"), "prompt_ms": tm.get("prompt_ms"),
                "predicted_n": tm.get("predicted_n"), "predicted_ms": tm.get("predicted_ms"),
                "predicted_per_token_ms": tm.get("predicted_per_token_ms"),
                "prefill_read": io1[0] - io0[0], "prefill_majflt": io1[1] - io0[1],
                "decode_read": io2[0] - io1[0], "decode_majflt": io2[1] - io1[1],
                "wall_first_token_s": t1 - t0, "wall_total_s": t2 - t0, "prefill_cpu_s": c1 - c0,
                "decode_cpu_s": c2 - c1, "loadavg": loadavg(),
                "stream_gap_median_ms": 1000 * statistics.median(gaps) if gaps else None,
                "text": "".join(text)}


# ----------------------------------------------------------------------------------------------------- models
def model_path(model_dir: Path, shape: str, layers: int, fits_layers: int) -> Path:
    n = fits_layers if shape == "fits" else layers
    kind = "concentrated" if shape == "fits" else shape
    return model_dir / f"qwen3moe-{n}x128top8-Q8_0-{kind}.gguf"


def ensure_model(path: Path, shape: str, layers: int) -> Path:
    """The cached model, or make it (to NAME.part, renamed when complete: a half-written file is never reused)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    need = layers * 663_000_000 + 100_000_000  # 48 layers: 31.8 GB
    free = os.statvfs(path.parent).f_bavail * os.statvfs(path.parent).f_frsize
    if free < need + DISK_RESERVE:
        raise RuntimeError(f"making {path.name} needs {need / 1e9:.1f} GB and {free / 1e9:.1f} GB are free "
                           f"(keeping {DISK_RESERVE / 1e9:.0f} GB for others); remove a cached model from "
                           f"{path.parent}")
    part = path.with_name(path.name + ".part")
    argv = ["nice", "-n", "10", "ionice", "-c3", sys.executable, str(ROOT / "scripts" / "make_big_model.py"),
            str(part), "--layers", str(layers)] + (["--token-dependent"] if shape == "token-dependent" else [])
    log(f"making {path.name} (scripts/make_big_model.py)")
    try:
        subprocess.run(argv, check=True)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.rename(path)
    return path


def llama_server_path(given: str | None) -> Path:
    if given:
        return Path(given)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build_llama_tools.sh")], capture_output=True, text=True,
                         env={**os.environ, "PY": sys.executable})
    if out.returncode != 0:
        sys.exit(f"bench_paging: building llama.cpp's tools failed: {out.stderr.strip()[-500:]}")
    return Path(out.stdout.strip().splitlines()[-1]) / "llama-server"


def run_supports_paging(gx: list[str], cwd: Path) -> bool:
    out = subprocess.run([*gx, "run", "--help"], capture_output=True, text=True, cwd=cwd)
    return "--paging" in out.stdout


def gx_tree(gx: list[str], cwd: Path) -> str:
    """Which gguf_experts package the wrapper imports (a checkout given with PYTHONPATH, or this one)."""
    out = subprocess.run([*gx[:-2], "-c", "import gguf_experts; print(gguf_experts.__file__)"]
                         if gx[-2:] == ["-m", "gguf_experts"] else ["true"], capture_output=True, text=True, cwd=cwd)
    return out.stdout.strip()


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class Config:
    shape: str
    budget: float | None  # GiB of MemAvailable left, None: no balloon
    mode: str

    @property
    def label(self) -> str:
        return f"{self.shape} {budget_label(self.budget)} {self.mode}"

    @property
    def key(self) -> str:
        return f"{self.shape}-{budget_label(self.budget)}-{self.mode}"


def budget_label(b: float | None) -> str:
    return "none" if b is None else f"{b:g}G"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stop_balloon(balloon: Balloon, rec: dict[str, Any]) -> None:
    """Stop the balloon, first noting what it did (drift below the floor, tracking moves)."""
    try:
        rec["balloon_released"] = balloon.released
        rec["balloon_hold_level"] = balloon.hold_level
        rec["balloon_adjust_up"] = sum(x for x in balloon.adjusted if x > 0)
        rec["balloon_adjust_down"] = -sum(x for x in balloon.adjusted if x < 0)
    finally:
        balloon.stop()


def run_config(cfg: Config, a: argparse.Namespace, model: Path, server_bin: Path, prompts: list[dict[str, Any]],
               outdir: Path) -> dict[str, Any]:
    """Measure one configuration from a cold start; the balloon and the server are always stopped."""
    rec: dict[str, Any] = {"shape": cfg.shape, "budget": budget_label(cfg.budget), "mode": cfg.mode,
                           "model": str(model), "model_size": model.stat().st_size, "n_predict": a.n_predict,
                           "seed": a.seed, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "read_ahead_kb": read_ahead_kb(model), "threads": a.threads, "ctx": a.ctx}
    evict(model)
    rec["resident_at_start"] = model_resident(model)
    rec["mem_available_before_balloon"] = mem_available()
    balloon = None
    pin: subprocess.Popen[bytes] | None = None
    server = Server(server_bin, model, outdir / f"{cfg.key}.trace.bin", cfg.mode, a.gx,
                    outdir / f"{cfg.key}.server.log", a.threads, a.ctx, paging_flag=a.paging_flag,
                    extra=shlex.split(a.server_args))
    rec["command"] = server.argv()
    rec["gguf_experts"] = a.gx_tree
    with MemSampler() as mem:
        try:
            if cfg.budget is not None:
                balloon = Balloon(int(cfg.budget * GiB), int(a.floor * GiB))
                balloon.start()
                rec["balloon_bytes"] = balloon.size
            pin_gib = variant(cfg.mode)[2]
            if pin_gib is not None:
                pin = start_pin(a, cfg, model, pin_gib, outdir, rec)
            rec["mem_available_at_start"] = mem_available()
            rec["meminfo_at_start"] = meminfo()  # other files' page cache beside the (evicted) model
            log(f"  MemAvailable {rec['mem_available_at_start'] / GiB:.2f} GiB"
                + (f" (balloon {balloon.size / GiB:.2f} GiB)" if balloon else " (no balloon)")
                + f"; model resident {rec['resident_at_start'] / GiB:.2f} GiB; starting the server")
            n_samples0 = len(mem.samples)
            t0 = time.perf_counter()
            server.start(a.load_timeout)
            rec["load_s"] = time.perf_counter() - t0
            if balloon is not None and a.track:
                balloon.track()
            rec["meminfo_after_load"] = meminfo()
            rec["load_read"], rec["load_majflt"] = proc_io(server.pid)
            log(f"  loaded in {rec['load_s']:.1f} s, read {rec['load_read'] / 1e9:.1f} GB, "
                f"{rec['load_majflt']} major faults")
            reqs: list[dict[str, Any]] = []
            rec["requests"] = reqs
            for i in range(a.requests):
                p = prompts[i % len(prompts)]
                try:
                    r = server.complete(p["prompt"], a.n_predict, a.seed + i, a.request_timeout)
                except Exception as e:  # keep the requests measured so far
                    if not reqs:
                        raise
                    rec["partial_error"] = f"request {i}: {type(e).__name__}: {e}"
                    log(f"  request {i} failed ({rec['partial_error']}); keeping {len(reqs)}")
                    break
                r.update({"request": i, "prompt_id": p["id"], "kind": p["kind"],
                          "mem_available": mem.samples[-1] if mem.samples else None})
                reqs.append(r)
                log(f"  request {i}: prefill {r['prompt_n']} tokens {r['prompt_ms'] / 1000:.1f} s, "
                    f"{r['prefill_read'] / 1e9:.2f} GB; decode {r['predicted_per_token_ms'] / 1000:.3f} s/token, "
                    f"{r['decode_read'] / 1e9:.2f} GB; {r['prefill_majflt'] + r['decode_majflt']} major faults")
            run_samples = mem.samples[n_samples0:] or mem.samples
            rec["mem_available_min"], rec["mem_available_max"] = min(run_samples), max(run_samples)
            rec["mem_available_median"] = int(statistics.median(run_samples))
        finally:
            try:
                rec["server_status"] = server.stop()
            finally:
                try:
                    if pin is not None:
                        rec["pin_status"] = stop_process(pin)
                finally:
                    if balloon is not None:
                        stop_balloon(balloon, rec)
    rec["drifted"] = bool(rec.get("balloon_released"))
    rec["trace"] = str(server.trace)
    try:
        rec.update(trace_summary(server.trace))
    except Exception as e:  # the measurements stand without it
        rec["trace_error"] = f"{type(e).__name__}: {e}"
    rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return rec


def pin_trace(a: argparse.Namespace, shape: str, outdir: Path) -> Path:
    """The trace that a shape's pins are learnt from: --pin-trace's, else this output's first stock trace."""
    given = dict(item.split("=", 1) for item in (a.pin_trace or "").split(",") if "=" in item)
    if shape in given:
        return Path(given[shape])
    found = sorted(outdir.glob(f"{shape}-*-stock.trace.bin"))
    if not found:
        raise RuntimeError(f"no trace to learn {shape}'s pins from: measure {shape}:...:stock first or give "
                           f"--pin-trace {shape}=TRACE")
    return found[0]


def start_pin(a: argparse.Namespace, cfg: Config, model: Path, gib: float, outdir: Path,
              rec: dict[str, Any]) -> subprocess.Popen[bytes]:
    """Start `gguf-experts pin` (after the balloon, so the budget holds pinned and cached pages alike) and wait
    until it has locked everything; what it locked goes to the record."""
    trace = pin_trace(a, cfg.shape, outdir)
    ready = outdir / f"{cfg.key}.pin.ready"
    ready.unlink(missing_ok=True)
    out = outdir / f"{cfg.key}.pin.json"
    argv = [*a.gx, "pin", str(model), "--budget", f"{gib:g}G", "--trace", str(trace), "--ready-file", str(ready),
            "--format", "json"]
    rec["pin_command"] = argv
    rec["pin_trace"] = str(trace)
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=lambda: set_pdeathsig(signal.SIGTERM), cwd=outdir)
    end = time.monotonic() + 600
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"pin exited with status {proc.returncode} before locking; output: {out}")
        if time.monotonic() > end:
            stop_process(proc)
            raise RuntimeError(f"pin not ready after 600 s; output: {out}")
        time.sleep(0.2)
    rec["pin_s"] = time.perf_counter() - t0
    rec["pin_locked_bytes"] = int(Path("/proc/" + str(proc.pid) + "/status").read_text().split("VmLck:")[1]
                                  .split()[0]) * 1024
    log(f"  pin: {rec['pin_locked_bytes'] / GiB:.2f} GiB locked in {rec['pin_s']:.1f} s (learnt from {trace.name}); "
        f"MemAvailable now {mem_available() / GiB:.2f} GiB")
    return proc


def stop_process(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, then SIGKILL after 60 s; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def trace_summary(path: Path) -> dict[str, Any]:
    """What the trace says about the routing shape: rows, and experts never selected per layer within one request
    (median, min, max over layers and requests: the default model leaves 60-106 of 128 unused, the token-dependent
    one a handful); and a digest of (token, experts) rows, equal across modes when paging changes nothing."""
    import hashlib

    import numpy as np

    from gguf_experts.trace.reader import read_trace
    t = read_trace(path)
    if len(t) == 0:
        return {"trace_rows": 0}
    n_exp = int(t.header.fingerprint.n_expert)
    n_layer = int(t.layer.max()) + 1
    seqs, seq_idx = np.unique(t.seq, return_inverse=True)
    cell = (seq_idx[:, None] * n_layer + t.layer[:, None]) * n_exp + t.experts
    used = np.bincount(cell.ravel(), minlength=len(seqs) * n_layer * n_exp).reshape(len(seqs), n_layer, n_exp) > 0
    layers_seen = np.bincount(seq_idx * n_layer + t.layer, minlength=len(seqs) * n_layer).reshape(len(seqs), -1) > 0
    unused = (n_exp - used.sum(axis=2))[layers_seen]
    digest = hashlib.sha1(t.token.tobytes() + t.experts.tobytes()).hexdigest()[:12]
    out: dict[str, Any] = {"trace_rows": len(t), "unused_experts_median": float(np.median(unused)),
                           "unused_experts_min": int(unused.min()), "unused_experts_max": int(unused.max()),
                           "trace_digest": digest}
    io = getattr(t, "io", None)  # trace version 2 (issue 18 item 1): the tracer's own per-ubatch measurements
    if io is not None and len(io):
        for ph, name in ((0, "prefill"), (1, "decode")):
            m = (np.asarray(io.phase) == ph) & (np.asarray(io.read_bytes) >= 0)
            out[f"trace_{name}_read"] = int(np.asarray(io.read_bytes)[m].sum())
            out[f"trace_{name}_tokens"] = int(np.asarray(io.n_tokens)[m].sum())
            out[f"trace_{name}_wall_s"] = float(np.asarray(io.wall_ns)[m].clip(min=0).sum()) / 1e9
    return out


# --------------------------------------------------------------------------------------------------- forecast
def load_forecast() -> tuple[Any, str]:
    """`gguf_experts.paging.forecast` (issue 18), or None and why: imported lazily, so the harness measures
    before it lands (then `--report-only` fills the forecast columns in)."""
    import importlib
    try:
        return importlib.import_module("gguf_experts.paging.forecast"), ""
    except ImportError as e:
        return None, f"gguf_experts.paging.forecast is not importable here ({e})"


def measured_frame(rec: dict[str, Any]) -> Any:
    """The requests of one configuration as forecast()'s measured table (one prefill and one decode row per
    request: phase, n_tokens, read_bytes, majflt, wall_ns), from which it takes the compute time per token."""
    import pandas as pd
    rows = []
    for r in rec.get("requests") or []:
        rows.append((0, r["prompt_n"], r["prefill_read"], r["prefill_majflt"], int(r["prompt_ms"] * 1e6)))
        rows.append((1, max(r["predicted_n"] - 1, 0), r["decode_read"], r["decode_majflt"],
                     int(r["predicted_ms"] * 1e6)))
    return pd.DataFrame(rows, columns=["phase", "n_tokens", "read_bytes", "majflt", "wall_ns"])


def compute_reference(records: list[dict[str, Any]], rec: dict[str, Any]) -> dict[str, Any]:
    """The configuration whose timings give the compute time per token for rec's forecast: the same shape's
    with the fewest bytes read per token (no balloon, ideally): its wall time is compute, not disk."""
    same = [r for r in records if r["shape"] == rec["shape"] and r.get("requests")]

    def read_per_token(r: dict[str, Any]) -> float:
        q = r["requests"]
        return sum(x["prefill_read"] + x["decode_read"] for x in q) / max(sum(x["prompt_n"] + x["predicted_n"]
                                                                             for x in q), 1)
    return min(same, key=read_per_token) if same else rec


def disk_model(fc: Any, records: list[dict[str, Any]], given: str | None) -> Any:
    """The disk model for every forecast: --disk MBPS,IOPS, or measured once (O_DIRECT reads of a model)."""
    import importlib
    disk = importlib.import_module("gguf_experts.paging.disk")
    if given:
        mbps, iops = (float(x) for x in given.split(","))
        return disk.DiskModel(mbps, iops, "given")
    return disk.measure_disk(records[0]["model"])


def fill_traces(records: list[dict[str, Any]]) -> None:
    """Read again the traces that this process could not read when they were written (a newer trace version
    written by another tree's `run`): --report-only under that tree fills the routing and trace columns in."""
    for rec in records:
        if rec.get("trace") and ("trace_rows" not in rec or rec.get("trace_error")) and Path(rec["trace"]).exists():
            try:
                rec.update(trace_summary(Path(rec["trace"])))
                rec.pop("trace_error", None)
            except Exception as e:
                rec["trace_error"] = f"{type(e).__name__}: {e}"


def startup_of(rec: dict[str, Any]) -> bool | str:
    """The start-up decodes the server ran: with --no-warmup only llama-server's partial-removal check."""
    return "check" if "--no-warmup" in (rec.get("command") or []) else True


def fill_forecast(records: list[dict[str, Any]], disk_given: str | None = None) -> str:
    """Forecast every measured configuration at its own RAM (MemAvailable at its start, after the balloon) and
    mode, and per (shape, budget) the mode forecast recommends; a note says what was done or why not."""
    fc, why = load_forecast()
    done = [r for r in records if r.get("requests")]
    if fc is None or not done:
        return f"Forecast columns empty: {why or 'nothing measured'}."
    disk = disk_model(fc, done, disk_given)
    notes = []
    for rec in done:
        ref = compute_reference(done, rec)
        rec["compute_from"] = f"{ref['shape']} {ref['budget']} {ref['mode']}"
        try:
            df = fc.forecast(rec["trace"], rec["model"], budgets=[int(rec["mem_available_at_start"])],
                             advice=(variant(rec["mode"])[0],), readahead_kb=int(rec.get("read_ahead_kb") or 8192),
                             ctx_size=int(rec.get("ctx") or 2048), disk=disk, measured=measured_frame(ref),
                             warmup=startup_of(rec))
            row = df.iloc[0]
            rec["forecast"] = {"prefill_bytes_per_token": float(row["prefill_read_per_token"]),
                               "decode_bytes_per_token": float(row["decode_read_per_token"]),
                               "prefill_tokens_per_s": float(row["prefill_tok_s"]),
                               "decode_tokens_per_s": float(row["decode_tok_s"]),
                               "load_read_bytes": float(row["load_read_bytes"])}
        except Exception as e:  # an API change must not lose the measurements
            notes.append(f"{rec['shape']} {rec['budget']} {rec['mode']}: {type(e).__name__}: {e}")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in done:
        groups.setdefault((rec["shape"], rec["budget"]), []).append(rec)
    for (shape, budget), recs in groups.items():
        if len(recs) < 2:
            continue
        try:
            ram = int(statistics.median(r["mem_available_at_start"] for r in recs))
            df = fc.forecast(recs[0]["trace"], recs[0]["model"], budgets=[ram], advice=tuple(MODES),
                             readahead_kb=int(recs[0].get("read_ahead_kb") or 8192),
                             ctx_size=int(recs[0].get("ctx") or 2048), disk=disk,
                             measured=measured_frame(compute_reference(done, recs[0])), warmup=startup_of(recs[0]))
            best = str(fc.recommend(df)["advice"].iloc[0])
            for r in recs:
                r["forecast_recommends"] = best
        except Exception as e:
            notes.append(f"{shape} {budget} recommendation: {type(e).__name__}: {e}")
    return (f"Forecast: gguf_experts.paging.forecast at each configuration's MemAvailable and mode; disk "
            f"{disk.seq_mbps:.0f} MB/s sequential, {disk.iops:.0f} IOPS at 4 KiB ({disk.source}); compute time per "
            "token from the same shape's configuration that read the least (column `compute from`)."
            + ("" if not notes else " Failed: " + "; ".join(notes)))


# ------------------------------------------------------------------------------------------------------ output
def summarise(rec: dict[str, Any]) -> dict[str, Any]:
    """One table row: totals over the requests (bytes per token = bytes / tokens; tokens/s = tokens / time)."""
    reqs = rec.get("requests") or []
    row: dict[str, Any] = {"shape": rec["shape"], "budget": rec["budget"], "mode": rec["mode"],
                           "partial": rec.get("partial_error"),
                           "mem_avail_GiB": round(rec.get("mem_available_at_start", 0) / GiB, 2),
                           "mem_avail_range_GiB": (f"{rec['mem_available_min'] / GiB:.1f}-"
                                                   f"{rec['mem_available_max'] / GiB:.1f}"
                                                   if rec.get("mem_available_min") else None),
                           "requests": len(reqs), "drifted": rec.get("drifted", False)}
    if not reqs:
        row["error"] = rec.get("error", "no requests")
        return row
    pn = sum(r["prompt_n"] for r in reqs)
    p_ms = sum(r["prompt_ms"] for r in reqs)
    # decode steps: the first token comes from the prompt's logits (the server's predicted_per_token_ms is
    # predicted_ms / (predicted_n - 1) too)
    dn = sum(max(r["predicted_n"] - 1, 0) for r in reqs)
    d_ms = sum(r["predicted_ms"] for r in reqs)
    row.update({
        "load_s": round(rec["load_s"], 1), "load_GB": round(rec["load_read"] / 1e9, 2),
        "prefill_tokens": pn, "decode_tokens": dn,
        "prefill_MB_per_token": round(sum(r["prefill_read"] for r in reqs) / max(pn, 1) / 1e6, 2),
        "decode_MB_per_token": round(sum(r["decode_read"] for r in reqs) / max(dn, 1) / 1e6, 2),
        "prefill_tok_s": round(1000 * pn / p_ms, 3) if p_ms else None,
        "decode_tok_s": round(1000 * dn / d_ms, 3) if d_ms else None,
        "GB_per_request": round(sum(r["prefill_read"] + r["decode_read"] for r in reqs) / len(reqs) / 1e9, 2),
        "majflt_per_request": round(sum(r["prefill_majflt"] + r["decode_majflt"] for r in reqs) / len(reqs)),
        "cpu_per_wall": round(sum(r["prefill_cpu_s"] + r["decode_cpu_s"] for r in reqs)
                              / max(sum(r["wall_total_s"] for r in reqs), 1e-9), 2),
        "loadavg": round(statistics.mean(r["loadavg"] for r in reqs), 1),
        "prefill_s": "/".join(f"{r['prompt_ms'] / 1000:.1f}" for r in reqs),
        "decode_s_per_token": "/".join(f"{r['predicted_per_token_ms'] / 1000:.3f}" for r in reqs),
    })
    if rec.get("trace_rows"):
        row["unused_experts"] = (f"{rec['unused_experts_median']:g} ({rec['unused_experts_min']}-"
                                 f"{rec['unused_experts_max']})")
        row["trace_digest"] = rec.get("trace_digest")
    row["n_predict"] = rec.get("n_predict")
    row["compute_from"] = rec.get("compute_from")
    row["fc_recommends"] = rec.get("forecast_recommends")
    if rec.get("balloon_hold_level"):
        row["balloon_moved_GiB"] = (f"+{rec.get('balloon_adjust_up', 0) / GiB:.1f}/"
                                    f"-{rec.get('balloon_adjust_down', 0) / GiB:.1f}")
    # the measured bytes per token: the tracer's per-ubatch /proc/self/io deltas where the trace carries them
    # (exact per phase); else the server's /proc/PID/io sampled at the first streamed token, which arrives late on
    # a busy machine (part of the first decode step's reads land in prefill; per request totals agree)
    for name in ("prefill", "decode"):
        row[f"proc_{name}_MB_per_token"] = row[f"{name}_MB_per_token"]
        if rec.get(f"trace_{name}_tokens"):
            row[f"{name}_MB_per_token"] = round(rec[f"trace_{name}_read"] / rec[f"trace_{name}_tokens"] / 1e6, 2)
            row["bytes_from"] = "trace"
        else:
            row["bytes_from"] = "/proc split"
    fc = rec.get("forecast") or {}
    for k, m in (("prefill_bytes_per_token", "prefill_MB_per_token"),
                 ("decode_bytes_per_token", "decode_MB_per_token")):
        v = fc.get(k)
        row["fc_" + m] = round(v / 1e6, 2) if v is not None else None
        row["ratio_" + m] = round(v / 1e6 / row[m], 2) if v is not None and row[m] else None
    if fc.get("load_read_bytes") is not None:
        row["fc_load_GB"] = round(fc["load_read_bytes"] / 1e9, 2)
    for k in ("prefill_tok_s", "decode_tok_s"):
        v = fc.get(k.replace("tok_s", "tokens_per_s"))
        row["fc_" + k] = round(v, 3) if v is not None else None
        row["ratio_" + k] = round(v / row[k], 2) if v is not None and row[k] else None
    return row


COLUMNS = [("shape", "shape"), ("budget", "budget"), ("mode", "mode"), ("mem_avail_GiB", "MemAvail GiB"),
           ("mem_avail_range_GiB", "during run"),
           ("prefill_MB_per_token", "prefill MB/tok"), ("fc_prefill_MB_per_token", "fc"),
           ("ratio_prefill_MB_per_token", "fc/meas"), ("proc_prefill_MB_per_token", "/proc split"),
           ("decode_MB_per_token", "decode MB/tok"), ("fc_decode_MB_per_token", "fc"),
           ("ratio_decode_MB_per_token", "fc/meas"), ("proc_decode_MB_per_token", "/proc split"),
           ("prefill_tok_s", "prefill tok/s"), ("fc_prefill_tok_s", "fc"), ("ratio_prefill_tok_s", "fc/meas"),
           ("decode_tok_s", "decode tok/s"), ("fc_decode_tok_s", "fc"), ("ratio_decode_tok_s", "fc/meas"),
           ("prefill_s", "prefill s (per request)"), ("decode_s_per_token", "decode s/tok (per request)"),
           ("GB_per_request", "GB/request"), ("majflt_per_request", "majflt/request"), ("load_s", "load s"),
           ("load_GB", "load GB"), ("fc_load_GB", "fc"), ("unused_experts", "unused experts/layer/request"),
           ("trace_eq_stock", "trace = stock's"), ("fc_recommends", "fc recommends"),
           ("compute_from", "compute from"), ("cpu_per_wall", "server CPU s / wall s"),
           ("loadavg", "load avg"), ("balloon_moved_GiB", "balloon moved GiB"), ("drifted", "drifted")]


def fmt(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    out = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['shape']} | {r['budget']} | {r['mode']} | failed: {r['error']} |")
            continue
        out.append("| " + " | ".join(fmt(r.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(out)


def find(rows: list[dict[str, Any]], shape: str, budget: str, mode: str) -> dict[str, Any] | None:
    for r in rows:
        if r["shape"] == shape and r["budget"] == budget and r["mode"] == mode and "error" not in r:
            return r
    return None


def within(lo: float, hi: float) -> Callable[[float], bool]:
    return lambda x: lo <= x <= hi


def goals(rows: list[dict[str, Any]], budget: str = "9G", low: str = "6G") -> list[str]:
    """Issue 19's goals as ratios of rows measured in this run; n/a where a row is missing."""
    out = ["| goal | measured | target | met |", "|---|---|---|---|"]

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, k: str) -> float | None:
        return a[k] / b[k] if a and b and a.get(k) and b.get(k) else None

    def add(goal: str, v: float | None, target: str, ok: Callable[[float], bool]) -> None:
        out.append(f"| {goal} | {'n/a' if v is None else f'{v:.2f}'} | {target} | "
                   f"{'n/a' if v is None else ('yes' if ok(v) else 'NO')} |")

    c = "concentrated"
    pf, st, free = find(rows, c, budget, "prefetch"), find(rows, c, budget, "stock"), find(rows, c, "none", "stock")
    add(f"concentrated {budget}: prefetch decode tok/s / stock's", ratio(pf, st, "decode_tok_s"), ">= 20",
        within(20, float('inf')))
    add(f"concentrated {budget}: no-balloon stock decode tok/s / prefetch's", ratio(free, pf, "decode_tok_s"),
        "<= 1.5", within(0, 1.5))
    add(f"concentrated {budget}: prefetch prefill tok/s / stock's", ratio(pf, st, "prefill_tok_s"), ">= 2",
        within(2, float('inf')))
    t = "token-dependent"
    pf, st = find(rows, t, budget, "prefetch"), find(rows, t, budget, "stock")
    add(f"token-dependent {budget}: prefetch decode tok/s / stock's", ratio(pf, st, "decode_tok_s"), ">= 8",
        within(8, float('inf')))
    add(f"token-dependent {budget}: forecast bound decode tok/s / prefetch's",
        pf["fc_decode_tok_s"] / pf["decode_tok_s"] if pf and pf.get("fc_decode_tok_s") else None, "<= 1.25",
        within(0, 1.25))
    add(f"token-dependent {budget}: prefetch prefill tok/s / stock's", ratio(pf, st, "prefill_tok_s"), ">= 1.1",
        within(1.1, float('inf')))
    add(f"token-dependent {budget}: forecast bound prefill tok/s / prefetch's",
        pf["fc_prefill_tok_s"] / pf["prefill_tok_s"] if pf and pf.get("fc_prefill_tok_s") else None, "<= 1.25",
        within(0, 1.25))
    for s in (c, t):
        pf = find(rows, s, low, "prefetch")
        add(f"{s} {low}: forecast bound decode tok/s / prefetch's",
            pf["fc_decode_tok_s"] / pf["decode_tok_s"] if pf and pf.get("fc_decode_tok_s") else None, "<= 1.5",
            within(0, 1.5))
    st = find(rows, "fits", "none", "stock")
    for m in ("random", "prefetch"):
        r = find(rows, "fits", "none", m)
        for k in ("prefill_tok_s", "decode_tok_s"):
            add(f"fits in RAM: {m} {k.replace('_', ' ')} / stock's", ratio(r, st, k), "0.98-1.02 (or faster)",
                within(0.98, float('inf')))
    for shape, budget in dict.fromkeys((r["shape"], r["budget"]) for r in rows if "error" not in r):
        group = [r for r in rows if r["shape"] == shape and r["budget"] == budget and "error" not in r
                 and r.get("decode_tok_s") and r["mode"] in MODES]
        rec = next((r["fc_recommends"] for r in group if r.get("fc_recommends")), None)
        if len(group) > 1 and rec:
            best = max(group, key=lambda r: (r["decode_tok_s"], r.get("prefill_tok_s") or 0))
            out.append(f"| {shape} {budget}: forecast recommends the mode that measured fastest (decode) | "
                       f"{rec} (measured best: {best['mode']}) | same | {'yes' if rec == best['mode'] else 'NO'} |")
    for r in rows:
        if "error" in r:
            continue
        for k, lo, hi in (("ratio_decode_MB_per_token", 0.75, 1.33), ("ratio_prefill_MB_per_token", 0.5, 2.0)):
            v = r.get(k)
            if v is not None:
                add(f"{r['shape']} {r['budget']} {r['mode']}: forecast/measured {k[6:].replace('_', ' ')}", v,
                    f"{lo}-{hi}", within(lo, hi))
    return out


def render(records: list[dict[str, Any]], outdir: Path, results_md: Path | None, command: str, note: str) -> str:
    rows = [summarise(r) for r in records]
    for r in rows:  # paging must not change results: the trace equals stock's (same shape, requests, tokens)
        ref = [q for q in rows if q["mode"] == "stock" and q["shape"] == r["shape"] and q.get("trace_digest")
               and q["requests"] == r["requests"] and q.get("n_predict") == r.get("n_predict")]
        if r.get("trace_digest") and ref:
            r["trace_eq_stock"] = any(q["trace_digest"] == r["trace_digest"] for q in ref)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    (outdir / "paging.csv").write_text(buf.getvalue())
    rkeys = ["shape", "budget", "mode", "request", "prompt_id", "kind", "prompt_n", "prompt_ms", "predicted_n",
             "predicted_per_token_ms", "prefill_read", "prefill_majflt", "decode_read", "decode_majflt",
             "wall_first_token_s", "wall_total_s", "prefill_cpu_s", "decode_cpu_s", "loadavg",
             "stream_gap_median_ms", "mem_available"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=rkeys, extrasaction="ignore")
    w.writeheader()
    for rec in records:
        for q in rec.get("requests") or []:
            w.writerow({**q, "shape": rec["shape"], "budget": rec["budget"], "mode": rec["mode"]})
    (outdir / "requests.csv").write_text(buf.getvalue())
    first = records[0] if records else {}
    md = "\n".join([
        "# Paging: measured against forecast (scripts/bench_paging.py)", "",
        f"Rerun: `{command}`", "",
        f"Machine: {os.cpu_count()} cores, {total_ram() / GiB:.1f} GiB RAM, read_ahead_kb "
        f"{first.get('read_ahead_kb')}; llama-server -t {first.get('threads')} -c {first.get('ctx')} --parallel 1, "
        f"n_predict {first.get('n_predict')}, temperature 1, seed {first.get('seed')}, cache_prompt false. "
        "Budget: MemAvailable left by the balloon at the start of the configuration (MemAvail column). "
        "Bytes per token: the tracer's per-ubatch read_bytes deltas (/proc/self/io of the llama-server process, "
        "trace version 2), summed by phase over the requests and divided by the phase's tokens (decode: one "
        "token per step, generated tokens - 1 per request); the `/proc split` columns are the harness's own "
        "reading of /proc/PID/io at the first streamed token, which arrives late on a busy machine. "
        "GB/request and load GB: /proc/PID/io. tok/s: the server's timings. fc: forecast; fc/meas: forecast / "
        "measured.", "",
        note, "",
        markdown_table(rows), "",
        "## Goals (issue 19, item 3; forecast bounds of issue 18)", "",
        *goals(rows), ""])
    (outdir / "paging.md").write_text(md)
    if results_md is not None:
        results_md.write_text(md)
    return md


def total_ram() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def configs(a: argparse.Namespace) -> Iterator[Config]:
    """The matrix in order (shape, then budget, then mode), or --configs as given."""
    if a.configs:
        for item in a.configs.split(","):
            shape, budget, mode = item.strip().split(":")
            yield Config(shape, parse_budgets(budget)[0], mode)
        return
    for s in a.shape:
        for b in a.budgets:
            for m in a.modes:
                yield Config(s, b, m)


def parse_budgets(text: str) -> list[float | None]:
    return [None if t.strip() in ("none", "") else float(t.rstrip("Gg")) for t in text.split(",")]


def measure(a: argparse.Namespace, results: Path) -> None:
    """Measure the chosen configurations in order, appending each record to results as it finishes."""
    outdir = results.parent
    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    server_bin = llama_server_path(a.llama_server)
    paging_ok = a.paging_flag = run_supports_paging(a.gx, outdir)
    a.gx_tree = gx_tree(a.gx, outdir)
    log(f"gguf-experts: {a.gx_tree}" + ("" if paging_ok else " (no run --paging)"))
    todo = list(configs(a))
    if not paging_ok and any(variant(c.mode)[0] != "stock" for c in todo):
        log("this `gguf-experts run` has no --paging yet: only stock runs (give --gguf-experts of a checkout with it)")
        todo = [c for c in todo if variant(c.mode)[0] == "stock"]
    log(f"{len(todo)} configurations: " + ", ".join(c.label for c in todo))
    durations: list[float] = []
    t_start = time.monotonic()
    try:
        for i, cfg in enumerate(todo):
            eta = (statistics.mean(durations) if durations else a.requests * 60 + 180) * (len(todo) - i)
            log(f"[{i + 1}/{len(todo)}] {cfg.label}: elapsed {(time.monotonic() - t_start) / 60:.1f} min, "
                f"ETA {eta / 60:.0f} min for the rest")
            t0 = time.monotonic()
            try:
                model = ensure_model(model_path(Path(a.model_dir), cfg.shape, a.layers, a.fits_layers), cfg.shape,
                                     a.fits_layers if cfg.shape == "fits" else a.layers)
                rec = run_config(cfg, a, model, server_bin, prompts, outdir)
            except Exception as e:  # one failed configuration (a crash, a timeout) must not stop the matrix
                log(f"  failed: {type(e).__name__}: {e}")
                rec = {"shape": cfg.shape, "budget": budget_label(cfg.budget), "mode": cfg.mode, "error": str(e)}
            durations.append(time.monotonic() - t0)
            with open(results, "a") as f:
                f.write(json.dumps(rec) + "\n")
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); the balloon and the server were stopped; rendering what was measured")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="concentrated,token-dependent",
                    help=f"routing shapes, comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--budgets", default="6,9,13,none",
                    help="GiB of MemAvailable to leave, comma-separated; none: no balloon")
    ap.add_argument("--modes", default="stock,random,prefetch",
                    help=f"paging modes of {', '.join(VARIANTS)} (variants: the base mode with an environment "
                         "variable of the preload set); MODE+pinN also runs `gguf-experts pin MODEL --budget NG` "
                         "inside the same budget, before the server starts")
    ap.add_argument("--pin-trace", default=None, metavar="SHAPE=TRACE,...",
                    help="the trace each shape's pins are learnt from (default: the first SHAPE-*-stock.trace.bin "
                         "in --out)")
    ap.add_argument("--configs", default=None,
                    help="an explicit ordered list instead of the matrix: SHAPE:BUDGET:MODE,... "
                         "(e.g. concentrated:9:stock,concentrated:9:prefetch,token-dependent:none:stock)")
    ap.add_argument("--requests", type=int, default=3, help="requests per configuration (prompts in file order)")
    ap.add_argument("--n-predict", type=int, default=8, help="tokens generated per request")
    ap.add_argument("--seed", type=int, default=42, help="sampling seed of the first request (+1 per request)")
    ap.add_argument("--layers", type=int, default=48, help="layers of the big models (48: 29.6 GiB)")
    ap.add_argument("--fits-layers", type=int, default=4, help="layers of the `fits` model (4: 2.5 GiB)")
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache" / "gguf-experts" / "big"))
    ap.add_argument("--out", default=str(Path.home() / ".cache" / "gguf-experts" / "bench-paging"))
    ap.add_argument("--results-md", default=None, help="also write the markdown here (docs/paging-results.md)")
    ap.add_argument("--floor", type=float, default=3.0, help="GiB of MemAvailable the balloon never goes below")
    ap.add_argument("--no-track", dest="track", action="store_false",
                    help="keep the balloon's size fixed after the load (default: hold MemAvailable at its level "
                         "after the load, giving memory back when other processes take some and taking it again)")
    ap.add_argument("--disk", default=None, metavar="MBPS,IOPS",
                    help="the forecast's disk model (default: measured once with O_DIRECT reads of the model)")
    ap.add_argument("--server-args", default="", help="more llama-server arguments (default: none, stock)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--llama-server", default=None, help="llama-server binary (default: build_llama_tools.sh's)")
    ap.add_argument("--gguf-experts", default=f"{sys.executable} -m gguf_experts",
                    help="the gguf-experts command whose `run` serves (e.g. another checkout's, for --paging)")
    ap.add_argument("--load-timeout", type=float, default=1200)
    ap.add_argument("--request-timeout", type=float, default=1800)
    ap.add_argument("--report-only", action="store_true", help="render (and forecast) results.jsonl; measure nothing")
    ap.add_argument("--rerun", default=None, help="the command to print as the one that reruns the measurements "
                                                  "(with --report-only: the measuring command)")
    ap.add_argument("--fresh", action="store_true", help="start a new results.jsonl instead of appending")
    ap.add_argument("--balloon-child", nargs=3, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.balloon_child:
        return balloon_child(*a.balloon_child)
    a.shape = [s.strip() for s in a.shape.split(",")]
    a.modes = [m.strip() for m in a.modes.split(",")]
    a.budgets = parse_budgets(a.budgets)
    a.gx = a.gguf_experts.split()
    try:
        todo = list(configs(a))
    except ValueError:
        ap.error(f"--configs {a.configs}: give SHAPE:BUDGET:MODE items, e.g. concentrated:9:stock")
    for c in todo:
        if c.shape not in SHAPES:
            ap.error(f"shape {c.shape}: use {', '.join(SHAPES)}")
        try:
            variant(c.mode)
        except (KeyError, ValueError):
            ap.error(f"mode {c.mode}: use {', '.join(VARIANTS)}, optionally with +pinN (N GiB locked by `pin`)")
        if c.budget is not None and c.budget < a.floor + 1:
            ap.error(f"budget {c.budget:g}: below the safety floor ({a.floor:g} GiB) plus 1 GiB for the server")
    outdir = Path(a.out).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    results = outdir / "results.jsonl"
    command = a.rerun or ("python scripts/bench_paging.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    results_md = Path(a.results_md) if a.results_md else None
    if a.report_only:
        records = read_records(results)
        fill_traces(records)
        note = fill_forecast(records, a.disk)
        print(render(records, outdir, results_md, command, note))
        return 0
    if a.fresh:
        results.unlink(missing_ok=True)

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    measure(a, results)
    records = read_records(results)
    note = fill_forecast(records, a.disk)
    print(render(records, outdir, results_md, command, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
