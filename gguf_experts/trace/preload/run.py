"""``gguf-experts run``: trace an unchanged llama.cpp program through the C preload library.

Three parts: building the library (plain C, shipped as source, compiled on first use with the system ``cc``
into the user cache, keyed by a hash of the source), launching the program with it preloaded (exit status and
signals pass through), and finalising the trace it wrote (the C side cannot hash the model's tensor list, so it
writes the model path and leaves the fingerprint's digests empty; see docs/run.md). Library code: no printing.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...cbuild import compile_shared
from ...errors import GGUFExpertsError, InputError
from ..format import HeaderSpaceError, TraceHeader, encode_header
from ..pending import sequences_path

PRELOAD_DIR = Path(__file__).parent  # ggexp*.h and the ggexp_*.c they declare, next to this module
LIB_NAME = "libggexp_preload.so"
ENV_TRACE, ENV_WEIGHTS, ENV_MODE = "GGUF_EXPERTS_TRACE", "GGUF_EXPERTS_WEIGHTS", "GGUF_EXPERTS_MODE"
#: a prebuilt preload library to use instead of the cached build (e.g. the sanitized one the tests build)
ENV_PRELOAD = "GGUF_EXPERTS_PRELOAD"
MODES = ("callback", "keepalive")
CFLAGS = ("-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-std=gnu11")


class PreloadBuildError(GGUFExpertsError):
    """The preload library could not be built (no C compiler, or it failed)."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gguf-experts"


def preload_sources() -> list[Path]:
    return sorted(PRELOAD_DIR.glob("ggexp_*.c"))


def preload_path() -> Path:
    """Where the library for this source lives: cache/preload-<source hash>/libggexp_preload.so."""
    h = hashlib.sha256(" ".join(CFLAGS).encode())
    for f in [*sorted(PRELOAD_DIR.glob("*.h")), *preload_sources()]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    digest = h.hexdigest()[:16]
    return cache_dir() / f"preload-{digest}" / LIB_NAME


def build_preload(cc: str | None = None) -> Path:
    """The preload library, compiled on first use (a second call finds it), or $GGUF_EXPERTS_PRELOAD when set.
    Raises PreloadBuildError."""
    if sys.platform != "linux":
        raise PreloadBuildError(f"`gguf-experts run` needs Linux (LD_PRELOAD); this is {sys.platform}. "
                                "Use `gguf-experts capture` instead")
    override = os.environ.get(ENV_PRELOAD)
    if override:
        if not os.path.isfile(override):
            raise PreloadBuildError(f"{ENV_PRELOAD}={override}: no such library; unset it to build the tracer")
        return Path(override).absolute()
    return compile_shared(preload_path(), [*CFLAGS, *map(str, preload_sources()), "-ldl", "-lpthread"],
                          PreloadBuildError, f"the tracer for `run` (from {PRELOAD_DIR})",
                          "; `gguf-experts capture` works without one", cc)


# -- finalising the trace ----------------------------------------------------------------------------------
def finalize(trace: str | os.PathLike[str], extra_meta: dict[str, Any] | None = None) -> TraceHeader:
    """Write the model fingerprint and the sequence map into the header of a trace the C tracer wrote.

    In place when the new header fits the space the C side reserved (the usual case), else the file is
    rewritten through a temp file and renamed. The sidecar is removed once its content is in the header.
    """
    from ..reader import read_trace_header

    path = Path(trace)
    header = read_trace_header(path)  # already completed by the reader (complete_header)
    meta = dict(header.meta)
    if meta.get("fingerprint_pending"):
        raise InputError(f"{path}: the model it traced ({meta.get('model_path')}) cannot be read any more; "
                         "the trace keeps working without --model, but join-trace needs the model")
    meta.update(extra_meta or {})
    seq_file = path.with_name(str(meta.pop("sequences_file", ""))) if meta.get("sequences_file") else None
    try:
        raw = encode_header(header.fingerprint, meta, size=header.size, version=header.version)
        with open(path, "r+b") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
    except HeaderSpaceError:  # too many sequences for the reserved space: rewrite the file
        raw = encode_header(header.fingerprint, meta, version=header.version)
        from ...atomic import atomic_path

        with atomic_path(path) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(raw)
            src.seek(header.size)
            shutil.copyfileobj(src, dst, 1 << 20)
    if seq_file is not None and seq_file.name.endswith(".seqs"):
        seq_file.unlink(missing_ok=True)
    return read_trace_header(path)


# -- launching -------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    returncode: int  # the program's exit status (128 + N when a signal N ended it)
    trace: Path | None  # None: run without a trace (paging only)
    written: bool  # the program loaded a MoE model and the trace exists
    header: TraceHeader | None
    signal: int | None = None  # the signal that ended the program, if one did


def preload_env(lib: Path, trace: Path | None, weights: bool, mode: str,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the traced program. Our library goes last in LD_PRELOAD: it interposes dlsym, and
    a preload listed before it keeps its own RTLD_NEXT lookups (see docs/run.md). ``trace`` None: no trace
    (the preload only pages, see trace/paging.py)."""
    env = dict(os.environ if base is None else base)
    pre = env.get("LD_PRELOAD", "").strip()
    env["LD_PRELOAD"] = f"{pre}:{lib}" if pre else str(lib)
    if trace is None:
        env.pop(ENV_TRACE, None)
    else:
        env[ENV_TRACE] = str(trace)
    env[ENV_WEIGHTS] = "1" if weights else "0"
    env[ENV_MODE] = mode
    return env


_FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)  # what a terminal sends its foreground group


def launch(argv: Sequence[str], trace: str | os.PathLike[str] | None, weights: bool = False,
           mode: str = "keepalive", lib: Path | None = None, env: dict[str, str] | None = None,
           extra_meta: dict[str, Any] | None = None, on_start: Callable[[], None] | None = None) -> RunResult:
    """Run ``argv`` with the tracer preloaded; forward SIGINT/SIGTERM/SIGHUP/SIGQUIT; finalise the trace.

    A terminal's Ctrl-C (or hang-up) goes to its whole foreground process group, the program included:
    it is not sent again (llama-server aborts on a second Ctrl-C). Any other signal sent to us (``kill``,
    a supervisor's SIGTERM) is forwarded. So the program sees each signal once.
    """
    if not argv:
        raise InputError("no program given: gguf-experts run [-o trace.bin] -- PROGRAM ARGS...")
    if mode not in MODES:
        raise InputError(f"--mode {mode}: use one of {', '.join(MODES)}")
    program = argv[0]
    exe = shutil.which(program)
    if exe is None:
        raise InputError(f"{program}: no such program (not found on PATH); check the name")
    lib = lib or build_preload()
    out = Path(trace).absolute() if trace is not None else None
    if out is not None:
        if out.is_dir():
            raise InputError(f"{out}: is a directory; give a file name for the trace")
        if not out.parent.is_dir():
            raise InputError(f"{out.parent}: no such directory for the trace")
        for stale in (out, sequences_path(out)):
            stale.unlink(missing_ok=True)  # an old trace must not pass for this run's
    env = preload_env(lib, out, weights, mode, env)
    if on_start is not None:  # every check passed: the caller may say what is about to run
        on_start()
    received: list[int] = []
    # Python handlers (run by the main thread whichever thread the signal hit): record, act in the loop
    old = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in _FORWARD}
    try:
        pid = os.posix_spawn(exe, list(argv), env, setsigdef=_FORWARD)
        status = _wait_forwarding(pid, received)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    rc = os.waitstatus_to_exitcode(status)
    killed_by = -rc if rc < 0 else None
    rc = 128 - rc if rc < 0 else rc
    header = None
    if out is not None and out.exists() and out.stat().st_size > 0:
        header = finalize(out, {"command": list(argv), **(extra_meta or {})})
    return RunResult(rc, out, header is not None, header, killed_by)


def _terminal_sent(sig: int, pid: int) -> bool:
    """Whether a terminal delivered ``sig`` to the program too: it is a terminal signal, we are the
    terminal's foreground process group, and the program is in it."""
    if sig not in _TERMINAL_SIGNALS:
        return False
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        group = os.tcgetpgrp(fd)
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        return group == os.getpgrp() == os.getpgid(pid)
    except ProcessLookupError:
        return False


def _wait_forwarding(pid: int, received: list[int]) -> int:
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return status
        while received:
            sig = received.pop(0)
            if not _terminal_sent(sig, pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        time.sleep(0.02)
