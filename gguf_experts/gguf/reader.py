"""GGUF header reader: v2/v3, both byte orders, shards; big arrays are skipped, never walked into objects.

The file is memory-mapped read-only and parsed with ``struct.unpack_from``; a Qwen3-sized tokenizer (150k
tokens + 150k merges) costs one length read per string and no Python object per element. Every length and
count is checked against the bytes left in the file before it is used, so a corrupt header gives a clear
error instead of a huge allocation or a hang.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import GGUFFormatError, ShardError
from .names import layer_of
from .types import GGMLType, ggml_type

if TYPE_CHECKING:  # numpy is imported where a big array is loaded: `dump` never needs it (start-up)
    import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
SMALL_ARRAY = 64  # arrays up to this many elements are decoded into Python lists
MAX_NESTING = 32  # arrays of arrays deeper than this are corrupt (and would exhaust Python's stack)


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# value type -> (struct code, numpy dtype char); strings and arrays are variable-sized. Public: the
# writer (gguf_writer) encodes with the same table the reader decodes with.
SCALAR_FORMATS: dict[int, tuple[str, str]] = {
    ValueType.UINT8: ("B", "u1"), ValueType.INT8: ("b", "i1"),
    ValueType.UINT16: ("H", "u2"), ValueType.INT16: ("h", "i2"),
    ValueType.UINT32: ("I", "u4"), ValueType.INT32: ("i", "i4"),
    ValueType.FLOAT32: ("f", "f4"), ValueType.BOOL: ("?", "u1"),
    ValueType.UINT64: ("Q", "u8"), ValueType.INT64: ("q", "i8"),
    ValueType.FLOAT64: ("d", "f8"),
}

# Metadata the tool decodes: attribute -> key template ({arch} is general.architecture).
MODEL_KEYS: dict[str, str] = {
    "name": "general.name",
    "file_type": "general.file_type",
    "block_count": "{arch}.block_count",
    "expert_count": "{arch}.expert_count",
    "expert_used_count": "{arch}.expert_used_count",
    "expert_ff_length": "{arch}.expert_feed_forward_length",
    "expert_shared_count": "{arch}.expert_shared_count",
    "leading_dense_block_count": "{arch}.leading_dense_block_count",
    "embedding_length": "{arch}.embedding_length",
}
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class LazyArray:
    """A metadata array too big to decode eagerly; ``load()`` reads it from the file when asked."""

    path: Path
    byteorder: str
    element_type: int
    count: int
    offset: int  # absolute offset of the first element
    nbytes: int

    def load(self) -> np.ndarray | list[Any]:
        import numpy as np

        with open(self.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if self.element_type in SCALAR_FORMATS:
                dt = np.dtype(self.byteorder + SCALAR_FORMATS[self.element_type][1])
                arr = np.frombuffer(mm, dtype=dt, count=self.count, offset=self.offset).copy()
                return arr.astype(bool) if self.element_type == ValueType.BOOL else arr
            p = Parser(mm, self.path, self.byteorder, 2)
            p.off = self.offset
            return [p.value(self.element_type, decode_all=True) for _ in range(self.count)]

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"<array of {self.count} {ValueType(self.element_type).name}, {self.nbytes} bytes>"


@dataclass
class TensorInfo:
    name: str
    ne: tuple[int, ...]
    type: GGMLType
    rel_offset: int
    offset: int
    nbytes: int
    shard: int
    file: Path
    index: int

    @property
    def row_size(self) -> int:
        return self.type.row_size(self.ne[0])


@dataclass
class GGUFHeader:
    """One GGUF file's header."""

    path: Path
    version: int
    byteorder: str  # "<" or ">"
    kv: dict[str, Any]
    kv_types: dict[str, int]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int
    file_size: int
    header_size: int  # bytes up to the end of the tensor infos

    def get(self, key: str, default: Any = None) -> Any:
        return self.kv.get(key, default)


class Parser:
    def __init__(self, buf: Any, path: Path, byteorder: str, version: int) -> None:
        self.buf = buf
        self.path = path
        self.size = len(buf)
        self.bo = byteorder
        self.version = version
        self.off = 0
        self.depth = 0
        self._structs: dict[str, struct.Struct] = {}

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: {what} (at byte {self.off}); the file is corrupt or truncated: "
                               "download or convert it again")

    def _st(self, code: str) -> struct.Struct:
        s = self._structs.get(code)
        if s is None:
            s = self._structs[code] = struct.Struct(self.bo + code)
        return s

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.off + n > self.size:
            raise self.fail(f"truncated header: {what} needs {n} bytes, {self.size - self.off} left")

    def scalar(self, code: str, what: str = "value") -> Any:
        st = self._st(code)
        self.need(st.size, what)
        v = st.unpack_from(self.buf, self.off)[0]
        self.off += st.size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("I", what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", what)

    def string(self, what: str = "string") -> str:
        n = self.u64(f"length of {what}")
        if n > self.size - self.off:
            raise self.fail(f"{what} claims {n} bytes, only {self.size - self.off} left in the file")
        raw = bytes(self.buf[self.off:self.off + n])
        self.off += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        """Walk ``count`` strings by their lengths only (no objects)."""
        unpack = self._st("Q").unpack_from
        buf, off, size = self.buf, self.off, self.size
        for _ in range(count):
            if off + 8 > size:
                self.off = off
                raise self.fail("truncated string array")
            off += 8 + unpack(buf, off)[0]
        if off > size:
            raise self.fail("string array runs past the end of the file")
        self.off = off

    def value(self, vtype: int, decode_all: bool = False, key: str = "value") -> Any:
        if vtype in SCALAR_FORMATS:
            v = self.scalar(SCALAR_FORMATS[vtype][0], key)
            return bool(v) if vtype == ValueType.BOOL else v
        if vtype == ValueType.STRING:
            return self.string(key)
        if vtype == ValueType.ARRAY:
            if self.depth >= MAX_NESTING:
                raise self.fail(f"array {key!r} is nested more than {MAX_NESTING} levels deep")
            self.depth += 1
            try:
                return self._array(decode_all, key)
            finally:
                self.depth -= 1
        raise self.fail(f"unknown metadata value type {vtype} for key {key!r}")

    def _array(self, decode_all: bool, key: str) -> Any:
        """One array value (element type, count, elements); big ones are skipped and returned lazily."""
        etype = self.u32(f"element type of array {key}")
        if etype not in ValueType.__members__.values():
            raise self.fail(f"array {key!r} has unknown element type {etype}")
        count = self.u64(f"length of array {key}")
        left = self.size - self.off
        if etype in SCALAR_FORMATS:
            min_elem = struct.calcsize(SCALAR_FORMATS[etype][0])
        else:
            min_elem = 8 if etype == ValueType.STRING else 12
        if count * min_elem > left:
            raise self.fail(f"array {key!r} claims {count} elements, at least {count * min_elem} bytes, "
                            f"only {left} left in the file")
        start = self.off
        if etype in SCALAR_FORMATS:
            nbytes = count * min_elem
            if decode_all or count <= SMALL_ARRAY:
                out = list(struct.unpack_from(f"{self.bo}{count}{SCALAR_FORMATS[etype][0]}", self.buf, start))
                self.off += nbytes
                return out  # '?' already gives bools
            self.off += nbytes
            return LazyArray(self.path, self.bo, etype, count, start, nbytes)
        if decode_all or count <= SMALL_ARRAY:
            return [self.value(etype, decode_all, key) for _ in range(count)]
        if etype == ValueType.STRING:
            self.skip_strings(count)
        else:  # arrays of arrays: walk them without keeping anything
            for _ in range(count):
                self.value(etype, False, key)
        return LazyArray(self.path, self.bo, etype, count, start, self.off - start)


def _detect(buf: Any, path: Path) -> tuple[str, int]:
    size = len(buf)
    if size == 0:
        raise GGUFFormatError(f"{path}: empty file (0 bytes); "
                              "expected a GGUF model: check the path or download it again")
    if size < 4 or bytes(buf[:4]) != GGUF_MAGIC:
        head = bytes(buf[:4])
        raise GGUFFormatError(f"{path}: not a GGUF file (magic {head!r}, expected b'GGUF'); "
                              "check that this is a .gguf model, not safetensors or a partial download")
    if size < 8:
        raise GGUFFormatError(f"{path}: truncated header ({size} bytes); download the file again")
    le = struct.unpack_from("<I", buf, 4)[0]
    be = struct.unpack_from(">I", buf, 4)[0]
    if le in (2, 3):
        return "<", le
    if be in (2, 3):
        return ">", be
    v = min(le, be)
    if v == 1:
        raise GGUFFormatError(f"{path}: GGUF version 1 is not supported (llama.cpp dropped it in 2023); "
                              "convert the model again with a current llama.cpp")
    raise GGUFFormatError(f"{path}: unsupported GGUF version {v} (this reader knows 2 and 3); "
                          "upgrade gguf-experts or check the file")


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse one GGUF file's header (metadata and tensor infos); the file is only read, never written."""
    path = Path(path)
    with open(path, "rb") as fh:
        file_size = os.fstat(fh.fileno()).st_size
        if file_size == 0:
            _detect(b"", path)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, path, file_size)


def _read_kv(p: Parser, n_kv: int, path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The metadata: key -> value and key -> GGUF value type; a key given twice is refused."""
    kv: dict[str, Any] = {}
    kv_types: dict[str, int] = {}
    for _ in range(n_kv):
        key = p.string("metadata key")
        if key in kv:
            raise GGUFFormatError(f"{path}: metadata key {key!r} appears twice; llama.cpp refuses this file: "
                                  "convert it again")
        vtype = p.u32(f"type of {key!r}")
        kv[key] = p.value(vtype, key=key)
        kv_types[key] = vtype
    return kv, kv_types


def _parse(buf: Any, path: Path, file_size: int) -> GGUFHeader:
    bo, version = _detect(buf, path)
    p = Parser(buf, path, bo, version)
    p.off = 8
    n_tensors = p.u64("tensor count")
    n_kv = p.u64("metadata count")
    # every kv needs >= 8+1+4 bytes, every tensor info >= 8+1+4+8+4+8
    if n_kv * 13 > file_size - p.off:
        raise p.fail(f"metadata count {n_kv} is impossible for a {file_size}-byte file")
    if n_tensors * 33 > file_size - p.off:
        raise p.fail(f"tensor count {n_tensors} is impossible for a {file_size}-byte file")
    kv, kv_types = _read_kv(p, n_kv, path)
    alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"{path}: general.alignment = {alignment!r} is not a power of two; the file is corrupt")
    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = p.string(f"name of tensor {i}")
        n_dims = p.u32(f"n_dims of {name}")
        if n_dims == 0 or n_dims > MAX_DIMS:
            raise GGUFFormatError(f"{path}: tensor {name!r} has {n_dims} dimensions (ggml allows 1..{MAX_DIMS}); "
                                  "the file is corrupt")
        ne = tuple(p.u64(f"shape of {name}") for _ in range(n_dims))
        type_id = p.u32(f"type of {name}")
        rel = p.u64(f"offset of {name}")
        if name in seen:
            raise GGUFFormatError(f"{path}: duplicate tensor name {name!r}; llama.cpp refuses this file: "
                                  "convert it again")
        seen.add(name)
        raw.append((name, ne, type_id, rel))
    header_size = p.off
    data_offset = -(-header_size // alignment) * alignment
    tensors = []
    for i, (name, ne, type_id, rel) in enumerate(raw):
        try:
            t = ggml_type(type_id)
        except GGUFFormatError as e:
            raise type(e)(f"{path}: tensor {name!r}: {e}") from None
        if any(d >= 1 << 62 for d in ne) or ne[0] % t.block_size:
            why = "a dimension is absurdly large" if any(d >= 1 << 62 for d in ne) else \
                f"ne0 = {ne[0]} is not a multiple of {t.name}'s block size {t.block_size}"
            raise GGUFFormatError(f"{path}: tensor {name!r} shape {list(ne)}: {why}; the file is corrupt")
        nbytes = t.nbytes(ne)
        if nbytes > 1 << 60 or rel > 1 << 60:
            raise GGUFFormatError(f"{path}: tensor {name!r} claims {nbytes} bytes at offset {rel}; the file is corrupt")
        tensors.append(TensorInfo(name, ne, t, rel, data_offset + rel, nbytes, 0, path, i))
    return GGUFHeader(path, version, bo, kv, kv_types, tensors, alignment, data_offset, file_size, header_size)


def shard_paths(path: Path) -> list[Path] | None:
    """All shard paths of a split model named like NAME-00002-of-00005.gguf, or None if not split-named."""
    m = SHARD_RE.match(path.name)
    if not m:
        return None
    count = int(m["count"])
    if not 1 <= int(m["no"]) <= count:  # "-00003-of-00002" or "-of-00000": not a shard name
        return None
    return [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


@dataclass
class Model:
    """A model: one GGUF file or all shards of a split one, with the metadata users ask about."""

    shards: list[GGUFHeader]
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def kv(self) -> dict[str, Any]:
        return self.shards[0].kv

    @property
    def path(self) -> Path:
        return self.shards[0].path

    @property
    def architecture(self) -> str:
        return str(self.kv.get("general.architecture", "unknown"))

    @property
    def alignment(self) -> int:
        return self.shards[0].alignment

    def key(self, attr: str, default: Any = None) -> Any:
        return self.kv.get(MODEL_KEYS[attr].format(arch=self.architecture), default)

    @property
    def name(self) -> str:
        return str(self.key("name", self.path.stem))

    @property
    def block_count(self) -> int:
        n = self.key("block_count")
        if n is None:
            layers = [layer_of(t.name) for t in self.tensors]
            n = max((x for x in layers if x is not None), default=-1) + 1
        return int(n)

    @property
    def expert_count(self) -> int:
        return int(self.key("expert_count", 0) or 0)

    @property
    def expert_used_count(self) -> int:
        return int(self.key("expert_used_count", 0) or 0)

    @property
    def expert_ff_length(self) -> int | None:
        v = self.key("expert_ff_length")
        return None if v is None else int(v)

    @property
    def expert_shared_count(self) -> int:
        return int(self.key("expert_shared_count", 0) or 0)

    @property
    def leading_dense_block_count(self) -> int:
        return int(self.key("leading_dense_block_count", 0) or 0)

    @property
    def file_type(self) -> int | None:
        return self.key("file_type")

    @property
    def total_size(self) -> int:
        return sum(s.file_size for s in self.shards)

    def summary(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture, "name": self.name, "n_layer": self.block_count,
            "n_expert": self.expert_count, "n_expert_used": self.expert_used_count,
            "expert_ff_length": self.expert_ff_length, "n_expert_shared": self.expert_shared_count,
            "n_leading_dense": self.leading_dense_block_count, "file_type": self.file_type,
            "files": [{"file": s.path.name, "size": s.file_size, "data_offset": s.data_offset,
                       "alignment": s.alignment, "version": s.version,
                       "byteorder": "little" if s.byteorder == "<" else "big"} for s in self.shards],
        }


class ShardWarning(UserWarning):
    """Split metadata that contradicts the files but that llama.cpp loads anyway (the model is complete)."""


def check_split_keys(headers: list[GGUFHeader], split_named: bool) -> None:
    """Every split.* key of every file against the files present. Errors where llama.cpp refuses the files or
    would load a different set of tensors; a warning where it loads them and only the key is wrong. The rules
    are in README ("Split models")."""
    n, total = len(headers), sum(len(h.tensors) for h in headers)
    arch = headers[0].get("general.architecture")
    for i, h in enumerate(headers):
        no, count = h.get(SPLIT_NO), h.get(SPLIT_COUNT)
        if split_named:
            if count is not None and count != n:
                raise ShardError(f"{h.path}: split.count = {count} but the file names say {n} shards; the shards "
                                 "are from different splits: download them again")
            if n > 1 and i == 0 and count is None:
                raise ShardError(f"{h.path}: the first shard has no split.count; llama.cpp would load it alone and "
                                 f"miss the tensors of the other {n - 1}: split the model again (llama-gguf-split)")
            if n > 1 and no is None:
                raise ShardError(f"{h.path}: shard {i + 1} of {n} has no split.no (llama.cpp refuses it: missing key "
                                 "split.no); split the model again (llama-gguf-split)")
            if no is not None and no != i:
                raise ShardError(f"{h.path}: split.no = {no}, expected {i} from its name; the shards are mixed up")
        elif no not in (None, 0):
            warnings.warn(ShardWarning(f"{h.path}: split.no = {no} in a single file: if it is a shard of a split "
                                       "model, the others are missing (llama.cpp loads it alone)"), stacklevel=3)
    for h in headers:  # after the shards' numbers: a mixed-up shard is named as such first
        tensors = h.get(SPLIT_TENSORS)
        if tensors is not None and tensors != total:
            raise ShardError(f"{h.path}: split.tensors.count = {tensors} but the "
                             + ("shards hold" if split_named else "file holds") + f" {total} tensors; "
                             + ("a shard is from another model or version: download them again" if split_named
                                else "it is one shard of a split model: open it with its other shards"))
    for h in headers[1:]:  # gguf-split writes only the split keys there; a shard that names another model is one
        other = h.get("general.architecture")
        if other is not None and other != arch:
            raise ShardError(f"{h.path}: general.architecture = {other!r} but the first shard's is {arch!r}; "
                             "the shards are from different models")


def open_model(path: str | os.PathLike[str]) -> Model:
    """Open a model from any of its files; a split model's other shards are found and checked."""
    path = Path(path)
    if path.is_dir():
        raise GGUFFormatError(f"{path}: is a directory; pass a .gguf file (any shard of a split model)")
    first = read_header(path)
    paths = shard_paths(path)
    count = first.get(SPLIT_COUNT)
    from .metadata import check_header, check_model

    check_header(first)  # the split keys' types first: the checks below compare their values
    if paths is None:
        if count not in (None, 0, 1):
            raise ShardError(f"{path}: split.count = {count} but the name is not NAME-0000i-of-0000n.gguf; "
                             "rename the shards as llama-gguf-split wrote them")
        headers = [first]
    else:
        if count is not None and count != len(paths):
            raise ShardError(f"{path}: split.count = {count} but the file name says {len(paths)} shards")
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise ShardError(f"{path}: shard {missing[0]} of this split model is missing"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                             + f" in {path.parent}; download all {len(paths)} shards into one folder")
        headers = [first if p == path else read_header(p) for p in paths]
        for h in headers:
            check_header(h)
    check_split_keys(headers, split_named=paths is not None)
    tensors: list[TensorInfo] = []
    seen: dict[str, Path] = {}
    for si, h in enumerate(headers):
        for t in h.tensors:
            if t.name in seen:
                raise ShardError(f"{h.path}: tensor {t.name!r} is also in {seen[t.name].name}; the shards are "
                                 "from different models")
            seen[t.name] = h.path
            t.shard = si
            tensors.append(t)
    model = Model(headers, tensors)
    check_model(model)  # types and ranges of the metadata every command reads, before anything uses it
    return model
