"""Rewrite a real GGUF's metadata (change, retype, duplicate or drop keys) and keep its tensor data, so that
llama.cpp still finds every tensor: the inputs of the metadata-validation tests and the fuzz module."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from gguf_experts.gguf.reader import LazyArray, ValueType, read_header
from gguf_experts.gguf.encode import Encoder

DROP = object()


def _typed(vt: int, v: Any) -> tuple[ValueType, Any]:
    if isinstance(v, LazyArray):
        items = v.load()
        return ValueType.ARRAY, (ValueType(v.element_type), items if isinstance(items, list) else np.asarray(items))
    if vt == ValueType.ARRAY:
        items = list(v)
        et = ValueType.STRING if items and isinstance(items[0], str) else ValueType.INT32
        return ValueType.ARRAY, (et, items)
    return ValueType(vt), v


def rewrite(src: Path, dst: Path, changes: dict[str, Any] | None = None,
            extra: list[tuple[str, ValueType, Any]] | None = None) -> Path:
    """Copy src to dst with metadata ``changes`` ({key: (ValueType, value)} or DROP) and ``extra`` items
    appended as written (a key already present gives a duplicate). Tensor data and relative offsets are
    kept; only the header (and the data section's start) move."""
    h = read_header(src)
    changes = changes or {}
    items: list[tuple[str, tuple[ValueType, Any]]] = []
    for key, v in h.kv.items():
        if key in changes:
            if changes[key] is DROP:
                continue
            items.append((key, changes[key]))
        else:
            items.append((key, _typed(h.kv_types[key], v)))
    items += [(k, v) for k, v in changes.items() if k not in h.kv and v is not DROP]
    items += [(k, (vt, v)) for k, vt, v in (extra or [])]
    e = Encoder(h.byteorder)
    e.parts.append(b"GGUF")
    e.pack("I", h.version)
    e.pack("Q", len(h.tensors))
    e.pack("Q", len(items))
    for key, (vt, v) in items:
        e.string(key)
        e.pack("I", int(vt))
        e.value(vt, v)
    for t in h.tensors:
        e.string(t.name)
        e.pack("I", len(t.ne))
        for d in t.ne:
            e.pack("Q", d)
        e.pack("I", t.type.id)
        e.pack("Q", t.rel_offset)
    head = e.bytes()
    start = -(-len(head) // h.alignment) * h.alignment
    with open(src, "rb") as f:
        f.seek(h.data_offset)
        data = f.read()
    dst.write_bytes(head + b"\0" * (start - len(head)) + data)
    return dst


def u32(v: int) -> tuple[ValueType, int]:
    return ValueType.UINT32, v


def set_u32_in_place(src: Path, dst: Path, key: str, value: int) -> Path:
    """The one-u32 change of the issue: same bytes, one value changed (the header's length is unchanged)."""
    raw = bytearray(src.read_bytes())
    k = key.encode()
    at = raw.find(struct.pack("<Q", len(k)) + k + struct.pack("<I", int(ValueType.UINT32)))
    assert at >= 0, key
    struct.pack_into("<I", raw, at + 8 + len(k) + 4, value)
    dst.write_bytes(bytes(raw))
    return dst
