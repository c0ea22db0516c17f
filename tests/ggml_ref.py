"""ctypes glue to libggml-base (from llama-cpp-python): the ground truth for types and for GGUF offsets.

Why: our reader and type table must agree with what llama.cpp itself computes. Signatures follow the
installed include/ggml.h and include/gguf.h (llama-cpp-python 0.3.36).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from gguf_experts.trace.live.ggml_ctypes import bind


class OracleMissing(RuntimeError):
    """llama_cpp is installed but its libggml-base cannot be found or loaded: the oracle must not go quiet."""


def _mapped(name: str) -> list[Path]:
    """The files named lib<name>.so* mapped into this process (Linux), as the dynamic loader resolved them."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    return sorted({Path(p) for line in lines if (p := line.split(maxsplit=5)[-1]).startswith("/")
                   and Path(p).name.startswith(f"lib{name}.so")})


@functools.lru_cache(maxsize=1)
def lib_path() -> Path:
    """libggml-base of the installed llama_cpp, found where llama-cpp-python itself loads its libraries from:
    ``llama_cpp.llama_cpp._base_path`` ($LLAMA_CPP_LIB_PATH or the package's lib/), through its own
    ``_ctypes_extensions.load_shared_library``; on Linux it must be the very file libllama pulled in.
    Raises OracleMissing (never returns None): a missing oracle is a failure, not a skip."""
    try:
        import llama_cpp.llama_cpp as llama_lib
        from llama_cpp._ctypes_extensions import load_shared_library
    except (ImportError, OSError, RuntimeError) as e:
        raise OracleMissing(f"llama_cpp does not import ({e}); install the [live] extra "
                            "(python gguf_experts/native_build.py install)") from e
    base = Path(llama_lib._base_path)
    try:
        handle = load_shared_library("ggml-base", base)
    except (OSError, RuntimeError) as e:  # FileNotFoundError is an OSError
        raise OracleMissing(f"libggml-base not found or not loadable in {base}, where llama_cpp loads libllama "
                            f"from: {e}") from e
    path = Path(handle._name).resolve()
    mapped = _mapped("ggml-base")
    if sys.platform.startswith("linux") and not any(path.samefile(m) for m in mapped):
        raise OracleMissing(f"{path} is not the libggml-base libllama loaded ({[str(m) for m in mapped]})")
    return path


def installed() -> bool:
    """Whether the oracle applies: llama_cpp is installed (then lib_path() must succeed, or it raises). Without
    llama_cpp the oracle is off, except under GGUF_EXPERTS_REQUIRE_ALL=1 (CI), where that raises too."""
    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("GGUF_EXPERTS_REQUIRE_ALL", "") not in ("", "0"):
            raise OracleMissing("llama_cpp is not installed, and GGUF_EXPERTS_REQUIRE_ALL=1 requires the libggml "
                                "oracle")
        return False
    lib_path()
    return True


class GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


# name -> (argtypes, restype), from include/ggml.h and include/gguf.h
_P, _I = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {
    "ggml_type_size": ([ctypes.c_int], ctypes.c_size_t),
    "ggml_blck_size": ([ctypes.c_int], ctypes.c_int64),
    "ggml_type_name": ([ctypes.c_int], ctypes.c_char_p),
    "gguf_init_from_file": ([ctypes.c_char_p, GGUFInitParams], _P),
    "gguf_free": ([_P], None),
    "gguf_get_version": ([_P], ctypes.c_uint32),
    "gguf_get_alignment": ([_P], ctypes.c_size_t),
    "gguf_get_data_offset": ([_P], ctypes.c_size_t),
    "gguf_get_n_kv": ([_P], _I),
    "gguf_get_n_tensors": ([_P], _I),
    "gguf_find_tensor": ([_P, ctypes.c_char_p], _I),
    "gguf_get_tensor_name": ([_P, _I], ctypes.c_char_p),
    "gguf_get_tensor_offset": ([_P, _I], ctypes.c_size_t),
    "gguf_get_tensor_size": ([_P, _I], ctypes.c_size_t),
    "gguf_get_tensor_type": ([_P, _I], ctypes.c_int),
}

_LIB: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is not None:
        return _LIB
    L = bind(ctypes.CDLL(str(lib_path())), SIGNATURES)
    _LIB = L
    return L


def type_traits(type_id: int) -> tuple[str, int, int]:
    """(name, block size, type size) as libggml reports them."""
    L = lib()
    name = L.ggml_type_name(type_id)
    return (name.decode() if name else ""), int(L.ggml_blck_size(type_id)), int(L.ggml_type_size(type_id))


@dataclass(frozen=True)
class RefTensor:
    name: str
    type: int
    rel_offset: int
    size: int


@dataclass(frozen=True)
class RefHeader:
    version: int
    alignment: int
    data_offset: int
    n_kv: int
    tensors: list[RefTensor]


def read_ref(path: str | os.PathLike[str]) -> RefHeader | None:
    """libggml's view of a GGUF header (no_alloc, no ggml context), or None when libggml refuses the file."""
    L = lib()
    ctx = L.gguf_init_from_file(os.fsencode(path), GGUFInitParams(True, None))
    if not ctx:
        return None
    try:
        tensors = []
        for i in range(L.gguf_get_n_tensors(ctx)):
            name = L.gguf_get_tensor_name(ctx, i).decode("utf-8", "replace")
            assert L.gguf_find_tensor(ctx, name.encode()) == i
            tensors.append(RefTensor(name, L.gguf_get_tensor_type(ctx, i), L.gguf_get_tensor_offset(ctx, i),
                                     L.gguf_get_tensor_size(ctx, i)))
        return RefHeader(L.gguf_get_version(ctx), L.gguf_get_alignment(ctx), L.gguf_get_data_offset(ctx),
                         L.gguf_get_n_kv(ctx), tensors)
    finally:
        L.gguf_free(ctx)


def assert_matches_ggml(header: object) -> None:
    """Assert that libggml reads a little-endian file exactly as our GGUFHeader says: data offset,
    alignment, and every tensor's name, type, data-relative offset and size. Skips nothing silently:
    callers decide when libggml applies (little-endian only)."""
    from gguf_experts.gguf.reader import GGUFHeader

    assert isinstance(header, GGUFHeader)
    assert header.byteorder == "<", "libggml does not read big-endian GGUF"
    ref = read_ref(header.path)
    assert ref is not None, f"libggml refused {header.path}"
    assert ref.version == header.version
    assert ref.alignment == header.alignment
    assert ref.n_kv == len(header.kv)
    if header.tensors:
        assert ref.data_offset == header.data_offset
    ours = [(t.name, t.type.id, t.rel_offset, t.nbytes) for t in header.tensors]
    theirs = [(r.name, r.type, r.rel_offset, r.size) for r in ref.tensors]
    assert ours == theirs
