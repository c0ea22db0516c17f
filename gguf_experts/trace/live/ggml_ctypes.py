"""ctypes glue to llama-cpp-python and libggml-base: loading, the log sink, reading graph tensors.

Why here: ``struct ggml_tensor`` is not exposed by llama-cpp-python, so we read the fields we need at
their (stable since 2025) offsets and copy data with ``ggml_backend_tensor_get`` so that tensors on a GPU
work too. Nothing in this module prints: llama.cpp's log goes into a ring buffer that errors quote.
"""
from __future__ import annotations

import collections
import ctypes
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ...errors import GGUFExpertsError, LiveUnavailableError

INSTALL_HINT = "pip install 'gguf-experts[live]'"


class CaptureError(GGUFExpertsError):
    """llama.cpp refused the model or a decode, or the graph did not look like an MoE graph."""

GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26


class GGMLTensor(ctypes.Structure):
    """The leading fields of ``struct ggml_tensor`` on 64-bit builds (sizeof 336 in 2025-2026)."""

    _fields_ = [
        ("type", ctypes.c_int32),
        ("_pad0", ctypes.c_int32),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int32),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


assert ctypes.sizeof(GGMLTensor) == 336 and GGMLTensor.name.offset == 256
NAME_OFFSET = GGMLTensor.name.offset

_lib_lock = threading.Lock()
_llama_cpp: ModuleType | None = None
_ggml_base: ctypes.CDLL | None = None


def load_llama_cpp() -> ModuleType:
    """Import llama_cpp (the [live] extra) once, install our log sink, init the backend."""
    global _llama_cpp
    with _lib_lock:
        if _llama_cpp is not None:
            return _llama_cpp
        from .preflight import ensure_runs

        ensure_runs()  # a llama.cpp that dies by SIGILL here would take this process with it
        try:
            import llama_cpp
        except ImportError as e:
            raise LiveUnavailableError(
                f"live capture needs llama-cpp-python, which is not importable ({e}); install it with "
                f"{INSTALL_HINT}") from e
        for sym in ("llama_model_load_from_file", "llama_init_from_model", "llama_get_memory",
                    "llama_memory_clear", "ggml_backend_sched_eval_callback", "llama_log_set"):
            if not hasattr(llama_cpp, sym):
                raise LiveUnavailableError(
                    f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} lacks {sym}; upgrade it "
                    f"(>= 0.3.30) with {INSTALL_HINT}")
        _LOG.install(llama_cpp)
        llama_cpp.llama_backend_init()
        _llama_cpp = llama_cpp
        return llama_cpp


Signatures = dict[str, tuple[list[Any], Any]]


def bind(lib: ctypes.CDLL, signatures: Signatures) -> ctypes.CDLL:
    """Declare argument and result types of C functions from a table (name -> (argtypes, restype))."""
    for name, (args, res) in signatures.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = args, res
    return lib


def ggml_base() -> ctypes.CDLL:
    """libggml-base shipped with llama-cpp-python: ggml_backend_tensor_get and ggml_nbytes."""
    global _ggml_base
    if _ggml_base is not None:
        return _ggml_base
    lc = load_llama_cpp()
    libdir = Path(str(lc.__file__)).parent / "lib"
    cands = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("ggml-base.*"))
    last: Exception | None = None
    for c in cands:
        try:
            lib = ctypes.CDLL(str(c))
            break
        except OSError as e:
            last = e
    else:
        try:  # some builds link ggml statically into libllama
            lib = lc._lib
            lib.ggml_backend_tensor_get  # noqa: B018
        except Exception as e:
            raise LiveUnavailableError(f"libggml-base not found next to {lc.__file__} ({last or e}); "
                                       f"reinstall with {INSTALL_HINT}") from e
    bind(lib, {"ggml_backend_tensor_get": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
               "ggml_nbytes": ([ctypes.c_void_p], ctypes.c_size_t)})
    _ggml_base = lib
    return lib


def tensor_name(addr: int) -> bytes:
    """The NUL-terminated name of the tensor at ``addr``."""
    return ctypes.string_at(addr + NAME_OFFSET)


#: the first NAME_KEY_BYTES of a tensor's name field (NUL and what follows included): the key of the
#: per-name decision cache. Every name we observe is shorter, so its key holds its NUL and cannot collide.
NAME_KEY_BYTES = 32


def name_key_reader() -> Any:
    """``addr -> bytes``: NAME_KEY_BYTES of the tensor's name field (only on cache misses and checks)."""
    string_at, off = ctypes.string_at, NAME_OFFSET

    def read(addr: int) -> bytes:
        return string_at(addr + off, NAME_KEY_BYTES)

    return read


_DTYPES = {GGML_TYPE_I32: np.dtype(np.int32), GGML_TYPE_F32: np.dtype(np.float32)}


_NE_NB = ctypes.c_int64 * 8  # ne[4] then nb[4] (size_t, read as int64), at offset 16
_NE_OFFSET = GGMLTensor.ne.offset
assert GGMLTensor.nb.offset == _NE_OFFSET + 32


def read_rows(addr: int, k: int) -> np.ndarray:
    """Copy a graph tensor (any backend) and return it as [n_rows, k], honouring its own ne/nb.

    Works for the strided ``ffn_moe_topk`` view (nb[1] = 4*n_expert) and for [1, k, n] weight tensors.
    Called once per observed node and layer, so it reads the struct with one ctypes access.
    """
    dtype = _DTYPES.get(ctypes.c_int32.from_address(addr).value)
    if dtype is None:
        raise CaptureError(f"graph tensor {tensor_name(addr).decode(errors='replace')!r} has ggml type "
                           f"{ctypes.c_int32.from_address(addr).value}, expected I32 or F32; please report this")
    ne0, ne1, ne2, ne3, nb0, nb1, nb2, nb3 = _NE_NB.from_address(addr + _NE_OFFSET)[:]
    total = ne0 * ne1 * ne2 * ne3
    if total == 0 or k == 0:
        return np.empty((0, k), dtype=dtype)
    # ggml_nbytes: the span from the first to the last element (views included)
    nbytes = dtype.itemsize + (ne0 - 1) * nb0 + (ne1 - 1) * nb1 + (ne2 - 1) * nb2 + (ne3 - 1) * nb3
    buf = np.empty(nbytes // dtype.itemsize, dtype=dtype)
    _tensor_get()(addr, buf.ctypes.data, 0, nbytes)
    if nb0 == dtype.itemsize and nb1 == nb0 * ne0 and nb2 == nb1 * ne1 and nb3 == nb2 * ne2:  # contiguous
        return buf.reshape(total // k, k)
    typed = np.ndarray(shape=(ne3, ne2, ne1, ne0), dtype=dtype, buffer=buf, strides=(nb3, nb2, nb1, nb0))
    return typed.reshape(total // k, k)  # copies a strided view into C order


def _tensor_get() -> Any:
    global _TENSOR_GET
    if _TENSOR_GET is None:
        _TENSOR_GET = ggml_base().ggml_backend_tensor_get
    return _TENSOR_GET


_TENSOR_GET: Any = None


class ThreadPool:
    """A persistent ggml CPU threadpool attached to a llama context.

    Why: without one, ggml creates (and joins) a disposable threadpool for every graph computation, and
    each node the eval callback observes splits the graph: 25 splits per token on a 24-layer model cost
    more than the callback itself. With a pool attached, a split costs a wake-up. The params struct is
    filled by ggml itself (ggml_threadpool_params_init), so its layout is not hard-coded here.
    """

    def __init__(self, llama_cpp: ModuleType, ctx: Any, n_threads: int) -> None:
        self._lc, self._ctx, self._tp = llama_cpp, ctx, None
        libdir = Path(str(llama_cpp.__file__)).parent / "lib"
        cands = sorted(libdir.glob("libggml-cpu.*")) + sorted(libdir.glob("ggml-cpu.*"))
        if not cands:
            return
        cpu = ctypes.CDLL(str(cands[0]))
        base = ggml_base()
        llama = llama_cpp.llama_cpp._lib
        bind(base, {"ggml_threadpool_params_init": ([ctypes.c_void_p, ctypes.c_int], None)})
        bind(cpu, {"ggml_threadpool_new": ([ctypes.c_void_p], ctypes.c_void_p),
                   "ggml_threadpool_free": ([ctypes.c_void_p], None)})
        bind(llama, {"llama_attach_threadpool": ([ctypes.c_void_p] * 3, None),
                     "llama_detach_threadpool": ([ctypes.c_void_p], None)})
        self._free, self._detach = cpu.ggml_threadpool_free, llama.llama_detach_threadpool
        params = ctypes.create_string_buffer(4096)  # larger than struct ggml_threadpool_params (~530 bytes)
        base.ggml_threadpool_params_init(params, int(n_threads))
        tp = cpu.ggml_threadpool_new(params)
        if tp:
            llama.llama_attach_threadpool(ctx, tp, tp)
            self._tp = tp

    def close(self) -> None:
        if self._tp:
            self._detach(self._ctx)
            self._free(self._tp)
            self._tp = None


class _LogRing:
    """llama.cpp/ggml log lines, kept in memory (the library never prints); errors quote the tail."""

    def __init__(self, maxlen: int = 400) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=maxlen)
        self._partial = ""
        self._cb: Any = None
        self.counter = 0

    def install(self, llama_cpp: ModuleType) -> None:
        def cb(level: int, text: bytes, user_data: Any) -> None:
            try:
                s = self._partial + (text or b"").decode("utf-8", "replace")
                *done, self._partial = s.split("\n")
                self.lines.extend(done)
                self.counter += len(done)
            except BaseException:  # noqa: BLE001  never raise into C
                pass

        self._cb = llama_cpp.llama_log_callback(cb)  # keep a reference: C holds the pointer
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))


_LOG = _LogRing()


class LlamaLog:
    """``with LlamaLog() as log: ...`` then ``log.tail()``: the llama.cpp log lines written meanwhile."""

    def __enter__(self) -> LlamaLog:
        self._start = _LOG.counter
        return self

    def __exit__(self, *exc: object) -> None:
        self._end = _LOG.counter

    def lines(self) -> list[str]:
        n = min(getattr(self, "_end", _LOG.counter) - self._start, len(_LOG.lines))
        return list(_LOG.lines)[len(_LOG.lines) - n:] if n > 0 else []

    def tail(self, n: int = 6) -> str:
        """Error and warning lines first (they say why), else the last lines."""
        lines = [ln.strip() for ln in self.lines() if ln.strip()]
        # "error"/"failed" lines say why; the wider words also match metadata dumps ("unknown_token_id")
        worst = [ln for ln in lines if any(w in ln.lower() for w in ("error", "failed"))]
        bad = worst or [ln for ln in lines if any(w in ln.lower() for w in ("missing", "wrong", "invalid",
                                                                             "unknown"))]
        pick = (bad or lines)[-n:]
        return " | ".join(pick) if pick else "(llama.cpp logged nothing)"
