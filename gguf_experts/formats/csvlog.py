"""Traces to and from CSV: the plain expert log other llama.cpp tracers write, and a detailed form.

Plain log: ``# token_id,layer_id,expert_0,...,expert_{k-1}`` then one row per (token, layer) in capture
order, token_id = position in its sequence. It has no sequence, phase, vocabulary id or weights, so
going back infers sequences (per layer, a position that does not increase starts a new sequence),
marks every row decode (phase unknown) and stores token id -1.
Detailed: ``seq,phase,pos,token,layer,expert_0..,weight_0..`` (weights only when recorded): lossless.
"""
from __future__ import annotations

import os
from typing import IO, Any, Iterable, Iterator

import numpy as np
import pandas as pd

from ..errors import InputError
from ..strictio import check_field_counts, decode_text
from ..trace.format import PHASE_DECODE, TraceData, encode_header
from ..gguf.fingerprint import ModelFingerprint
from ..trace.writer import encode_records

PLAIN_PREFIX = "# token_id,layer_id"
DETAIL_FIXED = ["seq", "phase", "pos", "token", "layer"]


def plain_header(k: int) -> str:
    return PLAIN_PREFIX + "".join(f",expert_{i}" for i in range(k)) + "\n"


def detail_header(k: int, weights: bool) -> str:
    cols = DETAIL_FIXED + [f"expert_{i}" for i in range(k)] + ([f"weight_{i}" for i in range(k)] if weights else [])
    return ",".join(cols) + "\n"


def _frame_csv(df: pd.DataFrame, fh: IO[str]) -> None:
    df.to_csv(fh, header=False, index=False, lineterminator="\n", na_rep="nan")


def write_csv_chunks(chunks: Iterable[TraceData], fh: IO[str], detail: bool, k: int,
                     weights: bool) -> int:
    """Write the header line and every chunk's rows; returns the number of rows written."""
    fh.write(detail_header(k, weights) if detail else plain_header(k))
    rows = 0
    for c in chunks:
        if not len(c):
            continue
        if not detail:
            _frame_csv(pd.DataFrame(np.column_stack([c.pos, c.layer, c.experts])), fh)
        else:
            df = pd.DataFrame(np.column_stack([c.seq, c.phase, c.pos, c.token, c.layer, c.experts]),
                              columns=DETAIL_FIXED + [f"expert_{i}" for i in range(k)])
            if weights:
                w = c.weights if c.weights is not None else np.full((len(c), k), np.nan, np.float32)
                for i in range(k):
                    df[f"weight_{i}"] = w[:, i]
            _frame_csv(df, fh)
        rows += len(c)
    return rows


def _line_of(path: str, row: int) -> int:
    """1-based line number of data row ``row`` (after the header line; blank lines are skipped)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        seen = -1
        for no, line in enumerate(f, 1):
            if no == 1 or not line.strip():
                continue
            seen += 1
            if seen == row:
                return no
    return row + 2


I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1
_SCAN_BLOCK = 1 << 24


def _prescan(path: str, n_fields: int) -> None:
    """Before pandas reads the log: UTF-8, no NUL bytes, and no line with more than n_fields fields (pandas
    would read a row with one field more by using its first field as the index: every column shifted).
    Streams the file in blocks cut at line ends, vectorised: memory is bounded by the block size."""
    line0 = 1  # line number of the block's first line
    rest = b""
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_SCAN_BLOCK)
            data = rest + block
            if not block:
                cut = len(data)
            else:
                cut = data.rfind(b"\n") + 1
            body, rest = data[:cut], data[cut:]
            if body:
                decode_text(body, f"{path} (from line {line0})", "CSV expert log")
                # fewer fields: pandas names the missing column
                line0 += check_field_counts(body, n_fields, path, first_line=line0, allow_fewer=True)
            if not block:
                return


def _diagnose(path: str, names: list[str], int_cols: list[str], cause: Exception) -> InputError:
    """Find the first bad line of a CSV the fast integer parser refused (only on that error path)."""
    try:
        df = pd.read_csv(path, header=None, names=names, skiprows=1, dtype=str, keep_default_na=False,
                         na_values=[""], engine="c")
    except pd.errors.ParserError as e:
        return InputError(f"{path}: malformed CSV ({str(e).strip()}); every row needs {len(names)} fields")
    for c in names:
        vals = pd.to_numeric(df[c], errors="coerce")
        bad = vals.isna().to_numpy()
        if c not in int_cols:
            bad = bad & (df[c].fillna("").str.strip().str.lower() != "nan").to_numpy()
        else:
            v0 = vals.fillna(0)
            bad = bad | (v0 != np.floor(v0)).to_numpy() | (v0.abs() > I32_MAX + 1).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            kind = "a 32-bit integer" if c in int_cols else "a number"
            return InputError(f"{path}: line {_line_of(path, i)}: column {c} = {df[c].iloc[i]!r} is not {kind}; "
                              "fix or remove that line")
    return InputError(f"{path}: unreadable CSV ({cause}); check the file")


class _SeqState:
    """Sequence inference carried across chunks: per layer, the last position and sequence seen."""

    def __init__(self, n_layer: int) -> None:
        self.last_pos = np.zeros(n_layer, np.int64)
        self.seq = np.zeros(n_layer, np.int64)
        self.seen = np.zeros(n_layer, bool)

    def infer(self, pos: np.ndarray, layer: np.ndarray) -> np.ndarray:
        """Per layer, a position that does not increase starts a new sequence."""
        n = len(pos)
        if n == 0:
            return np.zeros(0, np.int64)
        order = np.argsort(layer, kind="stable")
        p, lay = pos[order], layer[order]
        start = np.r_[True, lay[1:] != lay[:-1]]
        prev = np.r_[0, p[:-1]]
        prev[start] = self.last_pos[lay[start]]
        new = p <= prev
        new[start] &= self.seen[lay[start]]
        c = np.cumsum(new)
        local = c - np.maximum.accumulate(np.where(start, c - new, 0))
        seq_sorted = self.seq[lay] + local
        ends = np.flatnonzero(np.r_[start[1:], True])
        self.last_pos[lay[ends]] = p[ends]
        self.seq[lay[ends]] = seq_sorted[ends]
        self.seen[lay[ends]] = True
        seq = np.empty(n, np.int64)
        seq[order] = seq_sorted
        return seq


def infer_sequences(pos: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """Sequence index per row of a whole plain log (see _SeqState)."""
    n_layer = int(layer.max()) + 1 if len(layer) else 0
    return _SeqState(n_layer).infer(np.asarray(pos, np.int64), np.asarray(layer, np.int64))


def _layout(path: str, first: str, k: int) -> tuple[bool, list[str], bool]:
    """(plain?, column names, weights?) from the header line."""
    experts = [f"expert_{i}" for i in range(k)]
    if first.startswith(PLAIN_PREFIX):
        got = [c.strip() for c in first[1:].split(",")]
        listed = all(c.startswith("expert_") and c[7:].isdigit() for c in got[2:])
        if listed and got != ["token_id", "layer_id"] + experts:
            raise InputError(f"{path}: line 1: header has {len(got) - 2} expert columns, the model uses "
                             f"{k} experts per token (n_expert_used); this log is from another model")
        # headers such as '# token_id,layer_id,expert_0,...,expert_k' do not list the columns: the rows
        # must then have 2 + n_expert_used fields (checked while reading)
        return True, ["pos", "layer"] + experts, False
    if first.startswith("seq,"):
        got = [c.strip() for c in first.split(",")]
        base = DETAIL_FIXED + experts
        if got == base:
            return False, base, False
        if got == base + [f"weight_{i}" for i in range(k)]:
            return False, got, True
        raise InputError(f"{path}: line 1: expected columns {','.join(base)}[,weight_0..]; got {first!r} "
                         f"(the model uses {k} experts per token)")
    raise InputError(f"{path}: line 1: not an expert log (expected '{PLAIN_PREFIX},expert_0,...' or "
                     "'seq,phase,pos,token,layer,...'); pass a CSV written by a tracer or `convert`")


def read_csv_log(path: str | os.PathLike[str], fp: ModelFingerprint,
                 chunk_rows: int = 1 << 20) -> Iterator[dict[str, Any]]:
    """Parse a plain or detailed CSV log chunk by chunk into row-aligned arrays (TraceData's names).

    Integers are parsed by pandas' C parser; only when it refuses a chunk is the file read as text to
    name the bad line. Memory is bounded by ``chunk_rows``.
    """
    path = str(path)
    with open(path, "rb") as fb:
        first = decode_text(fb.readline(), f"{path}", "CSV expert log").strip()
    k = fp.n_expert_used
    plain, names, has_w = _layout(path, first, k)
    _prescan(path, len(names))
    int_cols = [c for c in names if not c.startswith("weight_")]
    dtypes = {c: (np.int64 if c in int_cols else np.float32) for c in names}
    state = _SeqState(fp.n_layer)
    done = 0
    try:
        with np.errstate(invalid="ignore"):  # 'inf'/'1e300' in an int column: numpy warns, then pandas raises
            reader = pd.read_csv(path, header=None, names=names, skiprows=1, dtype=dtypes, engine="c",
                                 chunksize=max(1, chunk_rows))
        while True:
            with np.errstate(invalid="ignore"):
                df = next(reader, None)
            if df is None:
                break
            rows = _rows(path, df, fp, plain, has_w, state, done)
            done += len(df)
            yield rows
    except pd.errors.EmptyDataError:
        return
    except (ValueError, OverflowError, pd.errors.ParserError) as e:
        if isinstance(e, pd.errors.ParserError) and "Expected" in str(e):
            raise InputError(f"{path}: malformed CSV ({str(e).strip()}); every row needs {len(names)} fields") from None
        raise _diagnose(path, names, int_cols, e) from None


def _rows(path: str, df: pd.DataFrame, fp: ModelFingerprint, plain: bool, has_w: bool, state: _SeqState,
          done: int) -> dict[str, Any]:
    k, n = fp.n_expert_used, len(df)
    experts = df[[f"expert_{i}" for i in range(k)]].to_numpy(np.int64)
    layer, pos = df["layer"].to_numpy(np.int64), df["pos"].to_numpy(np.int64)
    checks = [("layer", layer[:, None], fp.n_layer), ("expert", experts, fp.n_expert)]
    if not plain:
        checks.append(("phase", df["phase"].to_numpy(np.int64)[:, None], 2))
    for col in ("seq", "pos", "token"):
        if col in df.columns:
            v = df[col].to_numpy(np.int64)
            out = (v < I32_MIN) | (v > I32_MAX)
            if out.any():
                i = int(np.argmax(out))
                raise InputError(f"{path}: line {_line_of(path, done + i)}: {col} {int(v[i])} does not fit the "
                                 "trace's 32-bit field; the log is damaged")
    srt = np.sort(experts, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1) if k > 1 else np.zeros(n, bool)
    if dup.any():
        i = int(np.argmax(dup))
        raise InputError(f"{path}: line {_line_of(path, done + i)}: expert ids {experts[i].tolist()} repeat an "
                         f"expert; top-{k} selects {k} distinct experts: the log is damaged")
    for name, arr, hi in checks:
        out = (arr < 0) | (arr >= hi)
        if out.any():
            i = int(np.argmax(out.any(axis=1)))
            value = int(arr[i][out[i]][0])
            where = f"{path}: line {_line_of(path, done + i)}"
            if name == "phase":
                raise InputError(f"{where}: phase {value} is not 0 (prefill) or 1 (decode)")
            raise InputError(f"{where}: {name} id {value} outside [0, {hi}) of the model; "
                             "this log is from another model")
    if plain:
        return {"seq": state.infer(pos, layer), "phase": np.full(n, PHASE_DECODE, np.int64),
                "pos": pos, "token": np.full(n, -1, np.int64), "layer": layer, "experts": experts,
                "weights": None}
    return {"seq": df["seq"].to_numpy(np.int64), "phase": df["phase"].to_numpy(np.int64), "pos": pos,
            "token": df["token"].to_numpy(np.int64), "layer": layer, "experts": experts,
            "weights": df[[f"weight_{i}" for i in range(k)]].to_numpy(np.float32) if has_w else None}


ROW_KEYS = ("seq", "phase", "pos", "token", "layer", "experts", "weights")


def _cat(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {key: None if a[key] is None else np.concatenate([a[key], b[key]]) for key in ROW_KEYS}


def _take(rows: dict[str, Any], sl: slice) -> dict[str, Any]:
    return {key: None if rows[key] is None else rows[key][sl] for key in ROW_KEYS}


def encode_trace(chunks: Iterable[dict[str, Any]], fp: ModelFingerprint, meta: dict[str, Any]) -> Iterator[bytes]:
    """Header and records for chunks of row-aligned arrays: a record per run of rows with equal
    (seq, layer, phase); the last run of a chunk waits for the next chunk, which may continue it."""
    yield encode_header(fp, meta)
    carry: dict[str, Any] | None = None
    for rows in chunks:
        rows = rows if carry is None else _cat(carry, rows)
        n = len(rows["seq"])
        if n == 0:
            continue
        starts = _record_starts(rows)
        yield from _encode_records(_take(rows, slice(0, int(starts[-1]))), fp)
        carry = _take(rows, slice(int(starts[-1]), n))
    if carry is not None:
        yield from _encode_records(carry, fp)


def _record_starts(rows: dict[str, Any]) -> np.ndarray:
    seq, layer, phase = rows["seq"], rows["layer"], rows["phase"]
    return np.flatnonzero(np.r_[True, (seq[1:] != seq[:-1]) | (layer[1:] != layer[:-1]) | (phase[1:] != phase[:-1])])


def _encode_records(rows: dict[str, Any], fp: ModelFingerprint) -> Iterator[bytes]:
    n = len(rows["seq"])
    if n == 0:
        return
    seq, layer, phase = rows["seq"], rows["layer"], rows["phase"]
    starts = _record_starts(rows)
    sizes = np.diff(np.r_[starts, n])
    # consecutive records with equal size are encoded in one vectorised call
    grp = np.flatnonzero(np.r_[True, sizes[1:] != sizes[:-1]])
    grp_end = np.r_[grp[1:], len(starts)]
    k = fp.n_expert_used
    w = rows["weights"]
    for g0, g1 in zip(grp.tolist(), grp_end.tolist()):
        m, t = g1 - g0, int(sizes[g0])
        idx = starts[g0:g1, None] + np.arange(t)  # [m, t] row indices
        first = starts[g0:g1]
        yield encode_records(seq[first], phase[first], layer[first], rows["pos"][idx], rows["token"][idx],
                             rows["experts"][idx].reshape(m, t, k),
                             None if w is None else w[idx].reshape(m, t, k))


__all__ = ["read_csv_log", "write_csv_chunks", "infer_sequences", "encode_trace", "plain_header",
           "detail_header"]
