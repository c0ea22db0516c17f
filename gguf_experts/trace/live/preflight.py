"""Run llama.cpp once in a child process before loading it in ours (capture, profile, demo, make-model).

Why: llama.cpp built for CPU features this host does not run dies by SIGILL on the first quantized matmul (AMX
hosts, llama.cpp #28756). In-process, that ends Python before it can say anything: the user sees only "Illegal
instruction". A child that loads a tiny Q8_0 model and decodes a few tokens dies instead, and we name the cause.
The result is remembered per llama-cpp-python build (its libraries' paths, sizes and mtimes), so this costs
about a second once per install, then a few stats.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from ...crash import describe_signal, signal_of_status
from ...errors import LiveUnavailableError
from ...usercache import cache_dir

ENV_CHILD = "GGUF_EXPERTS_PREFLIGHT_CHILD"
ENV_SKIP = "GGUF_EXPERTS_NO_PREFLIGHT"  # for programs that already checked (and for the child itself)


class LlamaCrashError(LiveUnavailableError):
    """llama.cpp died by a signal in the preflight child: loading it here would kill this process."""


def _libraries() -> list[Path]:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return []
    lib = Path(spec.origin).parent / "lib"
    return sorted(p for p in lib.glob("*.so*") if p.is_file()) if lib.is_dir() else []


def build_id(libs: list[Path]) -> str:
    h = hashlib.sha256()
    for p in libs:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _marker(key: str) -> Path:
    return cache_dir() / "preflight" / f"{key}.ok"


def child_command(model: Path) -> list[str]:
    return [sys.executable, "-m", "gguf_experts.trace.live.preflight_child", str(model)]


def check_child(cmd: list[str], timeout: float = 300) -> None:
    """Run ``cmd``; raise LlamaCrashError if a signal ends it. Other failures are left to the real run to
    report in its own words (a preflight must never block a run that would have worked)."""
    env = dict(os.environ, **{ENV_CHILD: "1", ENV_SKIP: "1"})
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return
    sig = signal_of_status(res.returncode)
    if sig is not None:
        raise LlamaCrashError(describe_signal(sig, "llama.cpp (llama-cpp-python, in a test run on a tiny Q8_0 "
                                                   "model)") + "; nothing was run here")


def ensure_runs() -> None:
    """Raise LlamaCrashError when this install of llama.cpp cannot run a quantized model on this CPU."""
    if os.environ.get(ENV_SKIP):
        return
    libs = _libraries()
    if not libs:
        return  # not installed: the import that follows says so
    marker = _marker(build_id(libs))
    if marker.exists():
        return
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # no cache to remember it in: the command itself says what is wrong with the cache directory
    model = marker.with_suffix(f".{os.getpid()}.gguf")
    try:
        check_child(child_command(model))
        marker.touch()
    finally:
        model.unlink(missing_ok=True)
