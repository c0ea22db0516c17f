"""ctypes glue to libggml-base (from llama-cpp-python): the ground truth for types and for GGUF offsets.

Why: our reader and type table must agree with what llama.cpp itself computes. Signatures follow the
installed include/ggml.h and include/gguf.h (llama-cpp-python 0.3.36).
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from gguf_experts.trace.live.ggml_ctypes import bind


def lib_path() -> Path | None:
    """libggml-base.so of the installed llama_cpp package, or None when llama_cpp is not importable."""
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError):  # not installed, or its libraries do not load
        return None
    libdir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (libdir / name).exists():
            return libdir / name
    return None


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
    path = lib_path()
    if path is None:
        raise RuntimeError("llama_cpp is not installed")
    L = bind(ctypes.CDLL(str(path)), SIGNATURES)
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
