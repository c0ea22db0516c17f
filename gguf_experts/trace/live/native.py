"""The C tracer of `gguf-experts run` (trace/preload), loaded into this process: `capture`'s keep-alive mode.

Why: one implementation of what is recorded and how (keep-alive: the top-k and weight nodes kept alive as graph
outputs and read once per ubatch after the compute, no graph splits, the backend fusing as untraced), so capture
costs what run costs. The library is dlopen()ed and rewrites the GOT slots of the loaded llama.cpp libraries for
the scheduler functions it wraps (ggexp_inproc.c); while no trace is open they only forward. It writes trace.bin
itself; ``finish`` folds the fingerprint and the sequence map into the header (preload/run.py's ``finalize``).
One in-process trace at a time (the C state is per process). Library code: no printing.
"""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Any

from ...errors import GGUFExpertsError, InputError
from ..preload.run import ENV_TRACE, build_preload, finalize
from .ggml_ctypes import CaptureError

MODES = ("keepalive", "callback")
_lock = threading.Lock()
_busy = False
_lib: ctypes.CDLL | None = None

_BEGIN_ERRORS = {
    -1: "this process is already traced by `gguf-experts run` (GGUF_EXPERTS_TRACE is set)",
    -2: "this platform's loader cannot be hooked in-process (x86-64 and aarch64 Linux only)",
    -3: "no loaded library calls llama.cpp's scheduler through its PLT (a static llama.cpp build?)",
    -4: "the trace path is too long, or llama-cpp-python's library directory cannot be resolved",
}


def traced_by_run() -> bool:
    """Whether this process runs under `gguf-experts run` (the preload traces it already): capture then uses the
    callback (which `run` chains), never a second keep-alive tracer on the same graphs."""
    return bool(os.environ.get(ENV_TRACE))


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(str(build_preload()), mode=os.RTLD_LAZY | os.RTLD_LOCAL)
        lib.ggexp_inproc_begin.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_char_p]
        lib.ggexp_inproc_begin.restype = ctypes.c_int
        lib.ggexp_inproc_end.restype = ctypes.c_long
        lib.ggexp_inproc_records.restype = ctypes.c_long
        lib.ggexp_inproc_phase.argtypes = [ctypes.c_int]
        lib.ggexp_inproc_phase.restype = None
        _lib = lib
    return _lib


def _libdir(lc: Any) -> bytes:
    """The directory of llama-cpp-python's libllama: only its libraries are hooked (another ggml copy in the
    process, from another binding, keeps its own calls). Empty (hook every library) when it cannot be told."""
    try:
        return os.path.dirname(os.path.realpath(lc.llama_cpp._lib._name)).encode()
    except (AttributeError, TypeError, OSError):
        return b""


class NativeTrace:
    """One trace file written by the in-process C tracer, from ``begin`` (before the model is loaded: the tracer
    binds the model when llama.cpp opens its GGUF) to ``finish`` (after every context is freed)."""

    def __init__(self, path: str | os.PathLike[str], weights: bool, lc: Any) -> None:
        global _busy
        self.path = Path(path).absolute()
        self.weights = weights
        if traced_by_run():
            raise InputError("capture --mode keepalive under `gguf-experts run`: the process is traced already; "
                             "use --mode callback (run chains it)")
        with _lock:
            if _busy:
                raise InputError("another in-process keep-alive trace is open in this process; close it first, "
                                 "or use --mode callback")
            _busy = True
        try:
            self.lib = _library()
            self.path.unlink(missing_ok=True)  # an old trace must not pass for this one's
            from ..pending import sequences_path

            sequences_path(self.path).unlink(missing_ok=True)
            rc = self.lib.ggexp_inproc_begin(str(self.path).encode(), int(weights), 1, _libdir(lc))
            if rc != 0:
                raise CaptureError(f"the in-process tracer could not start: {_BEGIN_ERRORS.get(rc, rc)}; "
                                   "use capture --mode callback")
            decode = self.lib.llama_decode  # our wrapper: it sees the batch (sequence ids, outputs)
            decode.argtypes = [ctypes.c_void_p, lc.llama_batch]
            decode.restype = ctypes.c_int32
            self.decode = decode
        except BaseException:
            with _lock:
                _busy = False
            raise
        self._open = True

    def phase(self, phase: int) -> None:
        """The phase of the rows of the next llama_decode (the C side would otherwise infer it, as under run)."""
        self.lib.ggexp_inproc_phase(int(phase))

    def records(self) -> int:
        return int(self.lib.ggexp_inproc_records())

    def finish(self, extra_meta: dict[str, Any] | None = None) -> bool:
        """Close the trace (every context must be freed already) and finalise its header; False when the tracer
        wrote nothing (no ubatch was traced)."""
        global _busy
        if not self._open:
            return False
        self._open = False
        try:
            self.lib.ggexp_inproc_end()
            self.lib.ggexp_inproc_phase(-1)
        finally:
            with _lock:
                _busy = False
        if not (self.path.exists() and self.path.stat().st_size > 0):
            return False
        try:
            finalize(self.path, extra_meta)
        except GGUFExpertsError:
            raise
        return True

    def abandon(self) -> None:
        """Stop without finalising (the caller removes the file)."""
        global _busy
        if self._open:
            self._open = False
            try:
                self.lib.ggexp_inproc_end()
            finally:
                with _lock:
                    _busy = False
