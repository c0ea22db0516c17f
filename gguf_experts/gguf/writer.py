"""A small GGUF writer: v2/v3, both byte orders, any alignment, headers written atomically.

The tests and benchmarks build their fixtures with it (imatrix files too); ``prune`` writes its output models
through stream.py; both encode through encode.py, the one GGUF encoder. Its API (:func:`write_gguf`,
:func:`write_split`, :func:`encode_header`, :class:`TensorSpec`) is kept stable. Data may be omitted: the
file is then extended sparsely (truncate) to its full length, so a 600 GB DeepSeek-V3-shaped set of shards
costs a few MB of disk. gguf-py's GGUFWriter writes real models too; this one exists because we also need
big-endian, v2, odd alignments, sparse files and the value types exactly as our reader decodes them (one
table, reader.SCALAR_FORMATS).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


from ..atomic import atomic_write
from .encode import Encoder, TensorEntry, infer_type
from .encode import encode_header as encode_entries
from .reader import ValueType
from .types import GGMLType, by_name, ggml_type


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

    @property
    def entry(self) -> TensorEntry:
        return TensorEntry(self.name, self.ne, self.type.id, self.nbytes)


def encode_header(kv: dict[str, Any], tensors: Sequence[TensorSpec], alignment: int = 32, version: int = 3,
                  byteorder: str = "<", offsets: Sequence[int] | None = None) -> tuple[bytes, list[int], int]:
    """A fixture's header (metadata as a dict, types inferred): gguf/encode.encode_header on its entries."""
    entries = []
    for key, value in kv.items():
        e = Encoder(byteorder)
        vt, v = infer_type(value)
        e.string(key)
        e.pack("I", int(vt))
        e.value(vt, v)
        entries.append(e.bytes())
    return encode_entries(entries, [t.entry for t in tensors], alignment, version, byteorder, offsets)


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

