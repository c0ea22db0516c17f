"""Stream a trace file into numpy arrays, block by block, with no Python loop per record or token.

Records have variable length, but equal-length records come in runs (every decode record of a prompt,
every layer of one prefill ubatch). A run is found by probing record starts at o, o+L, o+2L, ... with
vectorised checks of the fixed fields (exponentially growing probes, so the cost is linear), its CRCs
are checked in one pass (``crc32_rows``) and its fields are read as columns of a 2-D int32 view.
The first record that fails a check ends the valid prefix: everything after it is dropped with a
``TraceRecoveryWarning`` (a crash during capture loses at most the record being written).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from .format import (
    CRC_BYTES, FIXED_WORDS, FLAG_WEIGHTS, HEADER_PREFIX_SIZE, KNOWN_FLAGS, REC_MARKER, RECORD_FIXED, TraceData,
    TraceHeader, concat, crc32_rows, decode_header, header_size_needed, record_length, warn_empty_records,
    warn_no_rows, warn_recovered,
)

DEFAULT_MAX_ROWS = 1 << 17  # small chunks stay in cache and in the malloc heap: fastest (bench_join.py)
MIN_ROW_BYTES = 12  # pos + token + one expert id: a block of B bytes holds at most B / 12 rows
MAX_RECORD_BYTES = 1 << 30  # a larger length field is damage, not a record
_FIXED = RECORD_FIXED.size


@dataclass
class _Run:
    offset: int  # in the block
    length: int
    count: int
    n: int
    weights: bool


def read_trace_header(path: str | os.PathLike[str]) -> TraceHeader:
    """The header alone (fingerprint, meta) without reading records."""
    with open(path, "rb") as f:
        return _read_header(f, str(path))


def _read_header(f: BinaryIO, where: str) -> TraceHeader:
    first = f.read(HEADER_PREFIX_SIZE)
    need = header_size_needed(first)
    raw = first + f.read(max(0, need - len(first)))
    header = decode_header(raw, where)
    if header.meta.get("fingerprint_pending"):  # written by `run`'s C tracer (env form): fill from the model
        from .pending import complete_header  # lazily: it reads the model for the fingerprint

        header = complete_header(header, where)
    return header


def _check_fixed(words: np.ndarray, length: int, word3_hi: int, n: int, k: int) -> np.ndarray:
    """Which rows of a [rows, 7] uint32 view of fixed fields start a record like the run's first."""
    return ((words[:, 0] == REC_MARKER) & (words[:, 1] == length) & ((words[:, 3] & 0xFFFFFF00) == word3_hi)
            & ((words[:, 3] & 0xFF) <= 1) & (words[:, 5] == n) & (words[:, 6] == k))


def _scan(buf: np.ndarray, k: int, at_eof: bool) -> tuple[list[_Run], int, str | None]:
    """Find the runs of valid records in ``buf`` (which starts at a record boundary).

    Returns (runs, bytes consumed, damage reason or None). Stops early (no damage) when the next record
    does not fit in ``buf`` and more data may follow.
    """
    runs: list[_Run] = []
    size = buf.shape[0]
    view = buf.data  # a memoryview: what struct reads the record headers from
    o = 0
    while o < size:
        if size - o < _FIXED + CRC_BYTES:
            return runs, o, ("truncated record" if at_eof else None)
        marker, length, _seq, phase, flags, reserved, _layer, n, kk = RECORD_FIXED.unpack_from(view, o)
        if (marker != REC_MARKER or phase > 1 or flags & ~KNOWN_FLAGS or reserved or kk != k
                or length != record_length(n, k, bool(flags & FLAG_WEIGHTS)) or length > MAX_RECORD_BYTES):
            return runs, o, "damaged record header"
        if size - o < length:
            return runs, o, ("truncated record" if at_eof else None)
        avail = (size - o) // length
        count, probe = 1, 16
        word3_hi = (flags << 8) | (reserved << 16)
        while count < avail:
            hi = min(avail, count + probe)
            block = buf[o + count * length:o + hi * length].reshape(hi - count, length)[:, :_FIXED]
            ok = _check_fixed(block.view("<u4"), length, word3_hi, n, k)
            if ok.all():
                count, probe = hi, probe * 4
            else:
                count += int(np.argmin(ok))
                break
        rows = buf[o:o + count * length].reshape(count, length)
        stored = rows[:, length - CRC_BYTES:].view("<u4")[:, 0]
        good = crc32_rows(rows[:, :length - CRC_BYTES]) == stored
        if not good.all():
            bad = int(np.argmin(good))
            if bad:
                runs.append(_Run(o, length, bad, n, bool(flags & FLAG_WEIGHTS)))
            return runs, o + bad * length, "checksum mismatch"
        runs.append(_Run(o, length, count, n, bool(flags & FLAG_WEIGHTS)))
        o += count * length
    return runs, o, None


def _extract(buf: np.ndarray, runs: list[_Run], header: TraceHeader, want_weights: bool = True) -> TraceData:
    """Row-aligned arrays from the runs: fields are columns of each run's [count, length/4] view."""
    k = header.fingerprint.n_expert_used
    total = sum(r.count * r.n for r in runs)
    has_w = want_weights and any(r.weights for r in runs)
    seq = np.empty(total, np.int32)
    phase = np.empty(total, np.uint8)
    pos = np.empty(total, np.int32)
    token = np.empty(total, np.int32)
    layer = np.empty(total, np.int32)
    experts = np.empty((total, k), np.int32)
    weights = np.empty((total, k), np.float32) if has_w else None
    at = 0
    for r in runs:
        rows = r.count * r.n
        if rows == 0:
            continue
        w = buf[r.offset:r.offset + r.count * r.length].reshape(r.count, r.length).view("<i4")
        sl = slice(at, at + rows)
        c, n = FIXED_WORDS, r.n
        if n == 1:
            seq[sl], layer[sl], phase[sl] = w[:, 2], w[:, 4], w[:, 3] & 0xFF
        else:
            seq[sl] = np.repeat(w[:, 2], n)
            layer[sl] = np.repeat(w[:, 4], n)
            phase[sl] = np.repeat(w[:, 3] & 0xFF, n)
        pos[sl] = w[:, c:c + n].reshape(rows)
        token[sl] = w[:, c + n:c + 2 * n].reshape(rows)
        e = c + 2 * n
        experts[sl] = w[:, e:e + n * k].reshape(rows, k)
        if weights is not None:
            if r.weights:
                weights[sl] = w[:, e + n * k:e + 2 * n * k].view("<f4").reshape(rows, k)
            else:
                weights[sl] = np.nan
        at += rows
    return TraceData(seq=seq, phase=phase, pos=pos, token=token, layer=layer, experts=experts,
                     weights=weights, header=header, n_records=sum(r.count for r in runs))


def iter_trace_chunks(path: str | os.PathLike[str], max_rows: int = DEFAULT_MAX_ROWS,
                      weights: bool = True) -> Iterator[TraceData]:
    """Yield the trace as TraceData chunks of at most ``max_rows`` rows (a single larger record excepted).

    ``weights=False`` leaves the gate weights out (they are still checksummed): join does not need them.

    Memory is bounded by the chunk size whatever the file size. A damaged tail ends the iteration after
    a TraceRecoveryWarning; the last chunk then has ``recovered=True`` and ``dropped_bytes`` set.
    """
    where = str(path)
    block_bytes = max(1, int(max_rows)) * MIN_ROW_BYTES
    stuck_need = 0  # set when one record is larger than a block: read up to its end once
    with open(path, "rb") as f:
        header = _read_header(f, where)
        file_size = os.fstat(f.fileno()).st_size
        offset = header.size  # file offset of store[0]
        store = bytearray(block_bytes)  # reused: chunks are copies, never views of it
        fill = 0  # valid bytes in store (the leftover of the previous block, then new data)
        yielded = False
        empty = _EmptyRecords()
        while True:
            cap = max(block_bytes, stuck_need)
            stuck_need = 0
            if cap > len(store):
                bigger = bytearray(cap)
                bigger[:fill] = store[:fill]
                store = bigger
            got = f.readinto(memoryview(store)[fill:cap]) if cap > fill else 0
            at_eof = fill + got < cap
            fill += got
            buf = np.frombuffer(store, np.uint8, count=fill)
            runs, used, damage = _scan(buf, header.fingerprint.n_expert_used, at_eof)
            chunk = _extract(buf, runs, header, weights) if runs else None
            empty.note(buf, runs, offset)
            if damage is not None:
                empty.warn(where)
                dropped = file_size - (offset + used)
                warn_recovered(where, offset + used, dropped, damage)
                out = chunk if chunk is not None else TraceData.empty(header)
                out.recovered, out.dropped_bytes = True, dropped
                yield out
                return
            if chunk is not None:
                yielded = True
                yield chunk
            del buf
            rest = fill - used
            store[:rest] = store[used:fill]
            fill, offset = rest, offset + used
            if at_eof and not fill:
                break
            if not runs and fill and not at_eof:
                # one record larger than the block: read exactly up to its end, but never allocate more than
                # the bytes really left in the file (a damaged length field must not cost its claim in memory)
                need = int.from_bytes(store[4:8], "little") if fill >= 8 else _FIXED
                present = max(0, os.fstat(f.fileno()).st_size - offset)
                stuck_need = max(min(need, MAX_RECORD_BYTES, present), _FIXED + CRC_BYTES, fill + 1)
        empty.warn(where)
        if not yielded:
            warn_no_rows(where)
            yield TraceData.empty(header)


class _EmptyRecords:
    """Records with no rows (n_tokens = 0): skipped, counted, and reported once (EmptyRecordsWarning)."""

    def __init__(self) -> None:
        self.count, self.first = 0, -1
        self.seqs: set[int] = set()

    def note(self, buf: np.ndarray, runs: list[_Run], offset: int) -> None:
        for r in runs:
            if r.n == 0:  # word 2 of each record is its sequence
                words = buf[r.offset:r.offset + r.count * r.length].reshape(r.count, r.length).view("<i4")
                self.seqs.update(np.unique(words[:, 2]).tolist())
                self.first = offset + r.offset if self.first < 0 else self.first
                self.count += r.count

    def warn(self, where: str) -> None:
        if self.count:
            warn_empty_records(where, self.count, self.first, sorted(self.seqs))


def read_trace(path: str | os.PathLike[str]) -> TraceData:
    """The whole trace in memory (use iter_trace_chunks for traces larger than memory)."""
    p = Path(path)
    parts = list(iter_trace_chunks(p))
    return concat(parts, parts[0].header) if parts else TraceData.empty(read_trace_header(p))
