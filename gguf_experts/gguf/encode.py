"""The one GGUF encoder: values (``Encoder``), metadata entries (``encode_kv``) and the header (``encode_header``)
of every GGUF we write, fixtures (writer.py) and derived models (stream.py, prune) alike. Byte orders both,
v2/v3, any alignment; the value types are our reader's table (reader.SCALAR_FORMATS)."""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .reader import GGUF_MAGIC, SCALAR_FORMATS, ValueType

Typed = tuple[ValueType, Any]


def infer_type(value: Any) -> Typed:
    """The GGUF type of a Python value (fixtures' metadata dicts); ``(ValueType, value)`` passes through."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], ValueType):
        return value
    if isinstance(value, bool):
        return ValueType.BOOL, value
    if isinstance(value, int):
        if value < 0:
            return (ValueType.INT32 if value >= -(1 << 31) else ValueType.INT64), value
        return (ValueType.UINT32 if value < 1 << 32 else ValueType.UINT64), value
    if isinstance(value, float):
        return ValueType.FLOAT32, value
    if isinstance(value, str):
        return ValueType.STRING, value
    if isinstance(value, np.ndarray):
        return ValueType.ARRAY, value
    if isinstance(value, (list, tuple)):
        return ValueType.ARRAY, list(value)
    raise TypeError(f"cannot infer a GGUF type for {type(value).__name__}")


_NP_TO_VT = {"u1": ValueType.UINT8, "i1": ValueType.INT8, "u2": ValueType.UINT16, "i2": ValueType.INT16,
             "u4": ValueType.UINT32, "i4": ValueType.INT32, "f4": ValueType.FLOAT32, "u8": ValueType.UINT64,
             "i8": ValueType.INT64, "f8": ValueType.FLOAT64, "b1": ValueType.BOOL}


class Encoder:
    """GGUF value encoding in one byte order."""

    def __init__(self, bo: str) -> None:
        self.bo = bo
        self.parts: list[bytes] = []

    def pack(self, code: str, v: Any) -> None:
        self.parts.append(struct.pack(self.bo + code, v))

    def string(self, s: str | bytes) -> None:
        raw = s.encode("utf-8") if isinstance(s, str) else s
        self.pack("Q", len(raw))
        self.parts.append(raw)

    def value(self, vt: ValueType, v: Any) -> None:
        if vt in SCALAR_FORMATS:
            self.pack(SCALAR_FORMATS[vt][0], v)
        elif vt == ValueType.STRING:
            self.string(v)
        elif vt == ValueType.ARRAY:
            self.array(v)
        else:
            raise ValueError(f"bad value type {vt}")

    def array(self, v: Any) -> None:
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], ValueType):  # (element type, items)
            et, items = v
        elif isinstance(v, np.ndarray):
            et, items = _NP_TO_VT[v.dtype.str[1:] if v.dtype != bool else "b1"], v
        else:
            items = list(v)
            et = infer_type(items[0])[0] if items else ValueType.UINT8
        self.pack("I", int(et))
        self.pack("Q", len(items))
        if et in SCALAR_FORMATS and not isinstance(items, list):
            self.parts.append(np.asarray(items).astype(self.bo + SCALAR_FORMATS[et][1]).tobytes())
        elif et == ValueType.STRING:
            pack_len = struct.Struct(self.bo + "Q").pack
            enc = [s.encode("utf-8") if isinstance(s, str) else s for s in items]
            self.parts.append(b"".join(pack_len(len(b)) + b for b in enc))
        else:
            for it in items:
                self.value(et, it)

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def encode_kv(key: str, vtype: ValueType, value: Any, byteorder: str = "<",
              element_type: ValueType | None = None) -> bytes:
    """One metadata entry: a scalar or string, or an array of scalars (numpy-converted) or strings."""
    e = Encoder(byteorder)
    e.string(key)
    e.pack("I", int(vtype))
    if vtype == ValueType.ARRAY:
        if element_type is None:
            raise ValueError(f"{key}: an array needs its element type")
        items = list(value)
        if element_type in SCALAR_FORMATS:
            e.array((element_type, np.asarray(items)))
        elif element_type == ValueType.STRING:
            e.array((element_type, [str(s) for s in items]))
        else:
            raise ValueError(f"{key}: arrays of {element_type!r} are not written here")
    elif vtype in SCALAR_FORMATS or vtype == ValueType.STRING:
        e.value(vtype, str(value) if vtype == ValueType.STRING else value)
    else:
        raise ValueError(f"{key}: value type {vtype!r} is not written here")
    return e.bytes()


@dataclass(frozen=True)
class TensorEntry:
    """A tensor info of the output: name, ne (ggml order), ggml type id, data size."""

    name: str
    ne: tuple[int, ...]
    type_id: int
    nbytes: int


def align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def encode_header(kv_entries: Sequence[bytes], tensors: Sequence[TensorEntry], alignment: int = 32,
                  version: int = 3, byteorder: str = "<", offsets: Sequence[int] | None = None
                  ) -> tuple[bytes, list[int], int]:
    """Header bytes, each tensor's data-relative offset (tensor order, each aligned as libggml's loader
    expects, unless ``offsets`` are given: fixtures of broken files) and the data section's start."""
    e = Encoder(byteorder)
    e.parts.append(GGUF_MAGIC)
    e.pack("I", version)
    e.pack("Q", len(tensors))
    e.pack("Q", len(kv_entries))
    e.parts.extend(kv_entries)
    rel: list[int] = []
    off = 0
    for t in tensors:
        off = align(off, alignment)
        rel.append(off)
        off += t.nbytes
    if offsets is not None:
        rel = list(offsets)
    for t, r in zip(tensors, rel):
        e.string(t.name)
        e.pack("I", len(t.ne))
        for d in t.ne:
            e.pack("Q", d)
        e.pack("I", t.type_id)
        e.pack("Q", r)
    head = e.bytes()
    return head, rel, align(len(head), alignment)
