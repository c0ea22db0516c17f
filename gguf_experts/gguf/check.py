"""Prove a byte map sound: no overlaps, nothing past the end of a file, aligned tensors, slices that tile
their tensor, no unexplained gaps, and tensors where llama.cpp's loader expects them.

Inputs are GGUF files (any shard) or byte maps: ours (CSV or JSON) or a third party's CSV with at least
name, offset and size columns. All checks are vectorised over the sorted ranges.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from .reader import GGUF_MAGIC, Model, open_model
from .layout import byte_map

FINDING_COLUMNS = ["kind", "file", "name", "other", "start", "end", "bytes", "detail"]


@dataclass
class FileInfo:
    size: int | None = None
    data_offset: int | None = None
    alignment: int | None = None


@dataclass
class RangeSet:
    """Byte ranges to check, with what is known about their files."""

    source: str
    ranges: pd.DataFrame  # name, base_name, expert_id, file, offset, size
    files: dict[str, FileInfo] = field(default_factory=dict)
    model: Model | None = None


_ALIASES = {"offset_start": "offset", "start": "offset", "size_bytes": "size", "nbytes": "size",
            "bytes": "size", "tensor": "name", "tensor_name": "name", "expert": "expert_id"}


def load_ranges(path: str | os.PathLike[str]) -> RangeSet:
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == GGUF_MAGIC:
        model = open_model(path)
        df = byte_map(model, split_experts=True)
        files = {s.path.name: FileInfo(s.file_size, s.data_offset, s.alignment) for s in model.shards}
        return RangeSet(str(path), df, files, model)
    if not head:
        raise InputError(f"{path}: empty file; expected a GGUF model or a CSV/JSON byte map")
    if head.lstrip()[:1] in (b"{", b"["):
        return _load_json(path)
    return _load_csv(path)


def _load_json(path: Path) -> RangeSet:
    from ..strictio import load_json

    doc = load_json(path, "JSON byte map")
    hint = "expected the output of `gguf-experts dump --format json`"
    rows = doc.get("tensors") if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise InputError(f"{path}: JSON has no 'tensors' list; {hint}")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise InputError(f"{path}: tensors[{i}] is a {type(r).__name__}, not an object with name, offset and "
                             f"size; {hint}")
    df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["name", "offset", "size"])
    files: dict[str, FileInfo] = {}
    if isinstance(doc, dict):
        model = doc.get("model") or {}
        if not isinstance(model, dict):
            raise InputError(f"{path}: 'model' is a {type(model).__name__}, not an object; {hint}")
        listed = model.get("files") or []
        if not isinstance(listed, list) or not all(isinstance(f, dict) for f in listed):
            raise InputError(f"{path}: model.files is not a list of objects; {hint}")
        for i, f in enumerate(listed):
            vals = {}
            for key in ("size", "data_offset", "alignment"):
                v = f.get(key)
                if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 1 << 62
                                      or (key == "alignment" and (v == 0 or v & (v - 1)))):
                    raise InputError(f"{path}: model.files[{i}].{key} = {v!r} is not a "
                                     f"{'power of two' if key == 'alignment' else 'byte count'}; {hint}")
                vals[key] = v
            files[str(f.get("file"))] = FileInfo(vals["size"], vals["data_offset"], vals["alignment"])
    return RangeSet(str(path), _normalise(df, path), files)


def _load_csv(path: Path) -> RangeSet:
    """Every row must have one field per column (pandas would silently shift a row with one extra)."""
    import io

    from ..strictio import check_field_counts, decode_text

    raw = path.read_bytes()
    text = decode_text(raw, str(path), "CSV byte map")
    if not text.strip():
        raise InputError(f"{path}: empty file; expected a GGUF model or a CSV/JSON byte map")
    if '"' in text:  # quoted fields may hold commas: the csv module counts them exactly (slower)
        import csv

        rows = [r for r in csv.reader(text.splitlines())]
        header = [c.strip() for c in rows[0]]
        for i, r in enumerate(rows[1:], 2):
            if r and len(r) != len(header):
                raise InputError(f"{path}: line {i}: malformed CSV ({len(r)} fields, the header has {len(header)}); "
                                 "every row needs one value per column: fix or remove that line")
        df = pd.DataFrame([[v.strip() for v in r] for r in rows[1:] if r], columns=header, dtype=object)
    else:
        header = [c.strip() for c in text.split("\n", 1)[0].split(",")]
        check_field_counts(raw, len(header), str(path))
        df = pd.read_csv(io.StringIO(text), index_col=False, skipinitialspace=True, skip_blank_lines=True)
        df = df.set_axis(header, axis=1)
    rs = RangeSet(str(path), _normalise(df, path))
    for fname in rs.ranges["file"].unique():
        cand = path.parent / str(fname)
        if cand.is_file():
            rs.files[str(fname)] = FileInfo(cand.stat().st_size)
    return rs


def _normalise(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    canon = [_ALIASES.get(str(c).strip().lower(), str(c).strip().lower()) for c in df.columns]
    seen: dict[str, str] = {}
    for c, m in zip(df.columns, canon):
        if m in seen:
            raise InputError(f"{path}: columns {seen[m]!r} and {str(c)!r} both mean {m!r}; keep one of them")
        seen[m] = str(c)
    df = df.set_axis(canon, axis=1)
    missing = [c for c in ("name", "offset", "size") if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(map(str, df.columns))}); "
                         "a byte map needs at least name, offset and size")
    for c in ("offset", "size"):
        v = pd.to_numeric(_numbers(df[c]), errors="coerce")
        wrong = (v.isna() | (v < 0) | (v >= 2**62) | (v % 1 != 0)).to_numpy(dtype=bool)
        if wrong.any():
            bad = int(np.flatnonzero(wrong)[0])
            raise InputError(f"{path}: row {bad + 2}: column {c} = {df[c].iloc[bad]!r} is not a byte count")
        df[c] = v.astype(np.int64)
    if "base_name" not in df.columns:
        df["base_name"] = df["name"].astype(str).str.replace(r"\[\d+\]$", "", regex=True)
    if "expert_id" not in df.columns:
        ext = df["name"].astype(str).str.extract(r"\[(\d+)\]$")[0]
        df["expert_id"] = pd.to_numeric(ext, errors="coerce")
    eid = pd.to_numeric(_numbers(df["expert_id"]), errors="coerce")
    wrong = (eid.notna() & ((eid < 0) | (eid >= 2**31) | (eid % 1 != 0))).to_numpy(dtype=bool)
    if wrong.any():
        bad = int(np.flatnonzero(wrong)[0])
        raise InputError(f"{path}: row {bad + 2}: expert id {df['expert_id'].iloc[bad]!r} is not an expert index")
    df["expert_id"] = eid.astype("Int64")
    if "file" not in df.columns:
        df["file"] = path.stem
    df["file"] = df["file"].astype(str)
    df["name"] = df["name"].astype(str)
    df["base_name"] = df["base_name"].fillna(df["name"]).astype(str)
    return df[["name", "base_name", "expert_id", "file", "offset", "size"]]


def _numbers(col: pd.Series) -> pd.Series:
    """A column pandas may convert to numbers: numeric columns as they are (the C parser made them),
    object columns (JSON values, mixed text) cell by cell through _as_number; booleans are not numbers."""
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        return col
    return col.map(_as_number)


def _as_number(v: Any) -> Any:
    """A cell as pandas may convert it: text or a JSON number; anything else (bool, list, dict) is not one."""
    if v is None:
        return None
    if isinstance(v, (bool, list, dict)):
        return float("nan")
    if isinstance(v, str) and not v.strip():
        return None
    return v


def _finding(kind: str, file: Any, name: Any, other: Any, start: Any, end: Any, detail: Any) -> pd.DataFrame:
    start = np.asarray(start, dtype=np.int64)
    end = np.asarray(end, dtype=np.int64)
    n = len(start)
    return pd.DataFrame({"kind": [kind] * n, "file": file, "name": name, "other": other, "start": start,
                         "end": end, "bytes": end - start, "detail": detail})


def check(rs: RangeSet) -> pd.DataFrame:
    """All findings for one input, as a DataFrame with FINDING_COLUMNS (empty when clean)."""
    out: list[pd.DataFrame] = []
    df = rs.ranges[rs.ranges["size"] > 0]
    for fname, g in df.groupby("file", sort=False):
        g = g.sort_values(["offset", "size"], kind="stable")
        start = g["offset"].to_numpy(np.int64)
        end = start + g["size"].to_numpy(np.int64)
        names = g["name"].to_numpy(object)
        info = rs.files.get(str(fname), FileInfo())
        # overlaps: a range starting before the furthest end seen so far
        if len(g) > 1:
            cummax = np.maximum.accumulate(end)
            holder = _argcummax(end)
            idx = np.flatnonzero(start[1:] < cummax[:-1]) + 1
            if len(idx):
                h = holder[idx - 1]
                ov_end = np.minimum(end[idx], cummax[idx - 1])
                out.append(_finding("overlap", fname, names[idx], names[h], start[idx], ov_end,
                                    [f"{a} overlaps {b} by {e - s} bytes" for a, b, s, e in
                                     zip(names[idx], names[h], start[idx], ov_end)]))
            gap_start = cummax[:-1]
            gap = start[1:] - gap_start
            pad = info.alignment or 32
            gi = np.flatnonzero(gap >= pad)
            if len(gi):
                out.append(_finding("gap", fname, names[gi + 1], names[holder[gi]], gap_start[gi], start[gi + 1],
                                    [f"{int(x)} unexplained bytes before {n} (padding is < {pad})"
                                     for x, n in zip(gap[gi], names[gi + 1])]))
        if info.data_offset is not None and len(g) and start[0] - info.data_offset >= (info.alignment or 32):
            out.append(_finding("gap", fname, names[:1], [""], [info.data_offset], start[:1],
                                [f"{start[0] - info.data_offset} bytes between the data section and the first tensor"]))
        if info.size is not None:
            pi = np.flatnonzero(end > info.size)
            if len(pi):
                s = np.maximum(start[pi], info.size)
                out.append(_finding("past_eof", fname, names[pi], [""] * len(pi), s, end[pi],
                                    [f"{n}: {e - s} bytes missing past the end of the {info.size}-byte file "
                                     "(truncated download?)" for n, s, e in zip(names[pi], s, end[pi])]))
        whole = (g["expert_id"].fillna(0) == 0).to_numpy(dtype=bool)  # tensors and the first slice of each
        align = info.alignment
        if align:
            base = info.data_offset or 0
            mi = np.flatnonzero(whole & ((start - base) % align != 0))
            if len(mi):
                out.append(_finding("misaligned", fname, names[mi], [""] * len(mi), start[mi], end[mi],
                                    [f"offset {s} is not a multiple of the alignment {align}" for s in start[mi]]))
    out += _check_tiling(rs)
    if rs.model is not None:
        out += _check_loader_order(rs.model)
    if not out:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in FINDING_COLUMNS})
    res = pd.concat(out, ignore_index=True)
    res.insert(0, "source", rs.source)
    return res


def _argcummax(a: np.ndarray) -> np.ndarray:
    """Index of the running maximum of a (first index that reached it)."""
    cm = np.maximum.accumulate(a)
    is_new = np.r_[True, cm[1:] > cm[:-1]]
    return np.maximum.accumulate(np.where(is_new, np.arange(len(a)), 0))


def _check_tiling(rs: RangeSet) -> list[pd.DataFrame]:
    df = rs.ranges[rs.ranges["expert_id"].notna()]
    if df.empty:
        return []
    df = df.sort_values(["file", "base_name", "expert_id"], kind="stable")
    base = df["base_name"].to_numpy(object)
    eid = df["expert_id"].to_numpy(np.int64)
    start = df["offset"].to_numpy(np.int64)
    size = df["size"].to_numpy(np.int64)
    names = df["name"].to_numpy(object)
    files = df["file"].to_numpy(object)
    same = np.r_[False, base[1:] == base[:-1]]
    first = ~same
    prev_end = np.r_[0, start[:-1] + size[:-1]]
    prev_size = np.r_[0, size[:-1]]
    prev_eid = np.r_[-1, eid[:-1]]
    bad_first = first & (eid != 0)
    bad = same & ((start != prev_end) | (size != prev_size) | (eid != prev_eid + 1))
    out = []
    idx = np.flatnonzero(bad | bad_first)
    if len(idx):
        details = []
        for i in idx:
            if bad_first[i]:
                details.append(f"slices of {base[i]} start at expert {eid[i]}, not 0")
            elif eid[i] != prev_eid[i] + 1:
                details.append(f"expert {eid[i]} follows expert {prev_eid[i]}: slices missing or repeated")
            elif size[i] != prev_size[i]:
                details.append(f"slice of {size[i]} bytes after one of {prev_size[i]}: experts differ in size")
            else:
                details.append(f"starts at {start[i]}, previous slice ends at {prev_end[i]}")
        out.append(_finding("not_tiled", files[idx], names[idx], base[idx], start[idx], start[idx] + size[idx],
                            details))
    if rs.model is not None:  # slices against the tensor they came from
        tens = {t.name: t for t in rs.model.tensors}
        g = df.groupby("base_name").agg(lo=("offset", "min"), total=("size", "sum"), n=("size", "size"))
        rows = []
        for bname, r in g.iterrows():
            t = tens.get(bname)
            if t is not None and (r["lo"] != t.offset or r["total"] != t.nbytes):
                rows.append((t.file.name, bname, bname, t.offset, t.offset + t.nbytes,
                             f"{r['n']} slices cover {r['total']} bytes from {r['lo']}, "
                             f"tensor is {t.nbytes} bytes at {t.offset}"))
        if rows:
            f, n, o, s, e, d = zip(*rows)
            out.append(_finding("not_tiled", list(f), list(n), list(o), list(s), list(e), list(d)))
    return out


def _check_loader_order(model: Model) -> list[pd.DataFrame]:
    """llama.cpp's loader wants tensor i at align(end of tensor i-1), in tensor-info order."""
    rows = []
    for h in model.shards:
        expected = 0
        for t in h.tensors:
            if t.rel_offset != expected:
                rows.append((h.path.name, t.name, t.offset, t.offset + t.nbytes,
                             f"{t.name} has offset {t.rel_offset}, llama.cpp expects {expected}: it refuses this file"))
            expected = -(-(t.rel_offset + t.nbytes) // h.alignment) * h.alignment
    if not rows:
        return []
    f, n, s, e, d = zip(*rows)
    return [_finding("loader_offset", list(f), list(n), [""] * len(n), list(s), list(e), list(d))]


def not_run(rs: RangeSet) -> str | None:
    """Which checks could not run on a byte map, why, and how to run them (None when all ran)."""
    if rs.model is not None:
        return None
    names = [str(f) for f in rs.ranges["file"].unique()]
    no_size = [f for f in names if rs.files.get(f, FileInfo()).size is None]
    no_align = [f for f in names if rs.files.get(f, FileInfo()).alignment is None]
    parts = []
    if no_size:
        parts.append(f"past_eof (no file size for {', '.join(no_size[:3])}{' ...' if len(no_size) > 3 else ''})")
    if no_align:
        parts.append("misaligned (no alignment; gaps assumed padding below 32 bytes)")
    parts.append("loader_offset (needs the GGUF's tensor-info order)")
    return (f"{rs.source}: not checked: {'; '.join(parts)}; pass the GGUF instead"
            + (", or --file-size N --alignment A" if no_size or no_align else ""))


@dataclass
class CheckResult:
    """Findings over all inputs, and one line per input whose map lacked what some checks need."""

    findings: pd.DataFrame
    not_run: list[str] = field(default_factory=list)


def check_inputs(paths: list[str], file_size: int | None = None, alignment: int | None = None) -> CheckResult:
    """Check each input on its own; ``file_size``/``alignment`` fill in what a byte map does not say
    (file_size only for a map of one file)."""
    if alignment is not None and (alignment <= 0 or alignment & (alignment - 1)):
        raise InputError(f"--alignment {alignment}: must be a power of two (GGUF's default is 32)")
    if file_size is not None and file_size < 0:
        raise InputError(f"--file-size {file_size}: must be >= 0 (the size in bytes of the file the map is of)")
    frames, skipped = [], []
    for p in paths:
        rs = load_ranges(p)
        if rs.model is None:
            names = [str(f) for f in rs.ranges["file"].unique()]
            if file_size is not None and len(names) > 1:
                raise InputError(f"{p}: --file-size applies to a map of one file; this one has {len(names)} "
                                 f"({', '.join(names[:3])}): pass the GGUF instead")
            for f in names:
                info = rs.files.setdefault(f, FileInfo())
                if file_size is not None:
                    info.size = file_size
                if alignment is not None:
                    info.alignment = alignment
        frames.append(check(rs))
        line = not_run(rs)
        if line:
            skipped.append(line)
    frames = [f for f in frames if len(f)]
    if not frames:
        return CheckResult(pd.DataFrame({c: pd.Series(dtype=object) for c in ["source", *FINDING_COLUMNS]}), skipped)
    return CheckResult(pd.concat(frames, ignore_index=True), skipped)


def check_paths(paths: list[str]) -> pd.DataFrame:
    """Findings over several inputs, each checked on its own."""
    return check_inputs(paths).findings
