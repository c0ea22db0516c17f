"""A small GGUF writer: v2/v3, both byte orders, any alignment, headers written atomically.

Library code: ``prune`` writes the headers of its output models with it, and the tests and benchmarks build
their fixtures with it. Its API (:func:`write_gguf`, :func:`write_split`, :func:`encode_header`,
:class:`TensorSpec`) is kept stable. Data may be omitted: the file is then extended sparsely (truncate) to
its full length, so a 600 GB DeepSeek-V3-shaped set of shards costs a few MB of disk. gguf-py's GGUFWriter
writes real models too; this one exists because we also need big-endian, v2, odd alignments, sparse files
and the value types exactly as our reader decodes them (one table, gguf_file.SCALAR_FORMATS).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..atomic import atomic_write
from .types import GGMLType, by_name, ggml_type
from .reader import SCALAR_FORMATS, ValueType

Typed = tuple[ValueType, Any]


@dataclass
class TensorSpec:
    name: str
    ne: tuple[int, ...]  # ggml order (reversed numpy shape)
    type: GGMLType
    data: bytes | None = None

    @classmethod
    def make(cls, name: str, ne: Sequence[int], type: int | str | GGMLType, data: bytes | None = None) -> "TensorSpec":
        t = type if isinstance(type, GGMLType) else by_name(type) if isinstance(type, str) else ggml_type(type)
        return cls(name, tuple(int(x) for x in ne), t, data)

    @property
    def nbytes(self) -> int:
        return self.type.nbytes(self.ne)


def _infer(value: Any) -> Typed:
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
    """GGUF value encoding in one byte order (the header writers here and in gguf_stream share it)."""

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
            et = _infer(items[0])[0] if items else ValueType.UINT8
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


def encode_header(kv: dict[str, Any], tensors: Sequence[TensorSpec], alignment: int = 32, version: int = 3,
                  byteorder: str = "<", offsets: Sequence[int] | None = None) -> tuple[bytes, list[int], int]:
    """Header bytes, each tensor's data-relative offset, and the data section's start."""
    e = Encoder(byteorder)
    e.parts.append(b"GGUF")
    e.pack("I", version)
    e.pack("Q", len(tensors))
    e.pack("Q", len(kv))
    for key, value in kv.items():
        vt, v = _infer(value)
        e.string(key)
        e.pack("I", int(vt))
        e.value(vt, v)
    rel = []
    off = 0
    for t in tensors:
        off = -(-off // alignment) * alignment
        rel.append(off)
        off += t.nbytes
    if offsets is not None:
        rel = list(offsets)
    for t, r in zip(tensors, rel):
        e.string(t.name)
        e.pack("I", len(t.ne))
        for d in t.ne:
            e.pack("Q", d)
        e.pack("I", t.type.id)
        e.pack("Q", r)
    head = e.bytes()
    data_start = -(-len(head) // alignment) * alignment
    return head, rel, data_start


def write_gguf(path: str | os.PathLike[str], kv: dict[str, Any], tensors: Sequence[TensorSpec],
               alignment: int = 32, version: int = 3, byteorder: str = "<",
               offsets: Sequence[int] | None = None) -> Path:
    """Write a GGUF file; tensors without data leave holes (sparse). Returns the path."""
    path = Path(path)
    if alignment != 32 and "general.alignment" not in kv:
        kv = {**kv, "general.alignment": (ValueType.UINT32, alignment)}
    head, rel, data_start = encode_header(kv, tensors, alignment, version, byteorder, offsets)
    end = data_start + max((r + t.nbytes for r, t in zip(rel, tensors)), default=0)
    with atomic_write(path, "wb", model=True) as fh:
        fh.write(head)
        fh.write(b"\0" * (data_start - len(head)))
        for t, r in zip(tensors, rel):
            if t.data is not None:
                if len(t.data) != t.nbytes:
                    raise ValueError(f"{t.name}: {len(t.data)} bytes of data, shape needs {t.nbytes}")
                fh.seek(data_start + r)
                fh.write(t.data)
        fh.truncate(end)
    return path


def write_split(directory: str | os.PathLike[str], stem: str, kv: dict[str, Any],
                tensors: Sequence[TensorSpec], n_shards: int, **kw: Any) -> list[Path]:
    """Write a split model as llama-gguf-split does: metadata in shard 1, tensors spread evenly."""
    directory = Path(directory)
    # tensor order stays contiguous per shard, as gguf-split does
    per = -(-len(tensors) // n_shards)
    chunks = [list(tensors[i * per:(i + 1) * per]) for i in range(n_shards)]
    paths = []
    for i, chunk in enumerate(chunks):
        split_kv = {"split.no": (ValueType.UINT16, i), "split.count": (ValueType.UINT16, n_shards),
                    "split.tensors.count": (ValueType.INT32, len(tensors))}
        shard_kv = {**(kv if i == 0 else {"general.architecture": kv.get("general.architecture", "")}),
                    **split_kv}
        p = directory / f"{stem}-{i + 1:05d}-of-{n_shards:05d}.gguf"
        paths.append(write_gguf(p, shard_kv, chunk, **kw))
    return paths

