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
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from .format import (
    CRC_BYTES,
    FIXED_WORDS,
    FLAG_WEIGHTS,
    HEADER_PREFIX_SIZE,
    KNOWN_FLAGS,
    MEAS_FLAG_NO_MAJFLT,
    MEAS_FLAG_NO_READ_BYTES,
    MEAS_KNOWN_FLAGS,
    MEAS_LEN,
    MEAS_MARKER,
    PHASE_MIXED,
    REC_MARKER,
    RECORD_FIXED,
    IoTable,
    TraceData,
    TraceHeader,
    concat,
    crc32_rows,
    decode_header,
    header_size_needed,
    record_length,
    warn_empty_records,
    warn_no_rows,
    warn_recovered,
)

DEFAULT_MAX_ROWS = 1 << 17  # small chunks stay in cache and in the malloc heap: fastest (bench_join.py)
MIN_ROW_BYTES = 12  # pos + token + one expert id: a block of B bytes holds at most B / 12 rows
MAX_RECORD_BYTES = 1 << 30  # a larger length field is damage, not a record
_FIXED = RECORD_FIXED.size
_U32 = struct.Struct("<I")
_MEAS_BAD_BITS = 0xFFFF0000 | ((0xFF & ~MEAS_KNOWN_FLAGS) << 8)  # unknown flags, non-zero reserved


@dataclass
class _Run:
    """``count`` groups, each ``per`` expert records of ``length`` bytes, then (``meas``) one measurement record.

    A plain run of equal-length records is per = 1 without measurements; a lone measurement is per = 0; a
    decode stretch of a version-2 trace (every layer's one-token record, then the ubatch's measurement, token
    after token) is one periodic run, so measurements cost no Python work per ubatch."""

    offset: int  # in the block
    length: int
    count: int
    n: int
    weights: bool
    per: int = 1
    meas: bool = False

    @property
    def stride(self) -> int:
        return self.per * self.length + (MEAS_LEN if self.meas else 0)

    @property
    def rows(self) -> int:
        return self.count * self.per * self.n

    def groups(self, buf: np.ndarray) -> np.ndarray:
        """The run's bytes as [count, stride] (a view)."""
        return buf[self.offset:self.offset + self.count * self.stride].reshape(self.count, self.stride)


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
    """Which rows of a [..., 7] uint32 view of fixed fields start a record like the run's first."""
    return ((words[..., 0] == REC_MARKER) & (words[..., 1] == length)
            & ((words[..., 3] & 0xFFFFFF00) == word3_hi) & ((words[..., 3] & 0xFF) <= 1)
            & (words[..., 5] == n) & (words[..., 6] == k))


def _check_meas(words: np.ndarray) -> np.ndarray:
    """Which rows of a [rows, >= 4] uint32 view start a valid measurement record header."""
    w3 = words[:, 3]
    return ((words[:, 0] == MEAS_MARKER) & (words[:, 1] == MEAS_LEN) & ((w3 & 0xFF) <= PHASE_MIXED)
            & ((w3 & _MEAS_BAD_BITS) == 0))


def _meas_at(buf: np.ndarray, o: int) -> bool:
    return bool(_check_meas(buf[o:o + 16].view("<u4").reshape(1, 4))[0])


def _crc_ok(rows: np.ndarray, length: int) -> np.ndarray:
    """Per record of an [m, length] or [g, c, length] uint8 array (rows contiguous, in file order): does the
    stored CRC (last 4 bytes) match the bytes before it? Flat [m] / [g * c]."""
    stored = rows[..., length - CRC_BYTES:].view("<u4")[..., 0].reshape(-1)
    return crc32_rows(rows[..., :length - CRC_BYTES]) == stored


def _periodic(buf: np.ndarray, o: int, c: int, length: int, word3_hi: int, n: int, k: int,
              weights: bool) -> tuple[list[_Run], int, str | None] | None:
    """Groups of ``c`` records of ``length`` bytes each followed by a measurement, from ``o`` (the first group's
    records and measurement header are known valid); None when fewer than two groups repeat."""
    size = buf.shape[0]
    g_len = c * length + MEAS_LEN
    avail = (size - o) // g_len
    if avail < 2:
        return None
    count, probe = 1, 16
    while count < avail:
        hi = min(avail, count + probe)
        grp = buf[o + count * g_len:o + hi * g_len].reshape(hi - count, g_len)
        fixed = grp[:, :c * length].reshape(hi - count, c, length)[:, :, :_FIXED].view("<u4")  # a view
        ok = _check_fixed(fixed, length, word3_hi, n, k).all(axis=1)
        ok &= _check_meas(grp[:, c * length:c * length + 16].view("<u4"))
        if ok.all():
            count, probe = hi, probe * 4
        else:
            count += int(np.argmin(ok))
            break
    if count < 2:
        return None
    grp = buf[o:o + count * g_len].reshape(count, g_len)
    good_r = _crc_ok(grp[:, :c * length].reshape(count, c, length), length)
    good_m = _crc_ok(grp[:, c * length:], MEAS_LEN)
    if good_r.all() and good_m.all():
        return [_Run(o, length, count, n, weights, per=c, meas=True)], o + count * g_len, None
    # the first bad record in file order: (group, slot), the measurement being slot c
    bad_r = int(np.argmin(good_r)) if not good_r.all() else count * c
    bad_m = int(np.argmin(good_m)) if not good_m.all() else count
    g, j = (bad_r // c, bad_r % c) if (bad_r // c, bad_r % c) <= (bad_m, c) else (bad_m, c)
    runs = [_Run(o, length, g, n, weights, per=c, meas=True)] if g else []
    if j:
        runs.append(_Run(o + g * g_len, length, j, n, weights))
    return runs, o + g * g_len + j * length, "checksum mismatch"


def _lone_meas(buf: np.ndarray, o: int, at_eof: bool) -> tuple[_Run | None, str | None]:
    """A single measurement record at ``o``: (its run, None), or (None, damage reason or None: more data needed)."""
    if buf.shape[0] - o < MEAS_LEN:
        return None, ("truncated record" if at_eof else None)
    if not _meas_at(buf, o):
        return None, "damaged measurement record"
    if not _crc_ok(buf[o:o + MEAS_LEN].reshape(1, MEAS_LEN), MEAS_LEN)[0]:
        return None, "checksum mismatch"
    return _Run(o, 0, 1, 0, False, per=0, meas=True), None


def _run_length(buf: np.ndarray, o: int, length: int, word3_hi: int, n: int, k: int) -> int:
    """How many records like the one at ``o`` follow each other (fixed fields only; probes of 16, 64, 256, ...)."""
    avail = (buf.shape[0] - o) // length
    count, probe = 1, 16
    while count < avail:
        hi = min(avail, count + probe)
        block = buf[o + count * length:o + hi * length].reshape(hi - count, length)[:, :_FIXED]
        ok = _check_fixed(block.view("<u4"), length, word3_hi, n, k)
        if not ok.all():
            return count + int(np.argmin(ok))
        count, probe = hi, probe * 4
    return count


def _record_head(buf: np.ndarray, o: int, k: int, at_eof: bool
                 ) -> tuple[tuple[int, int, int, int] | None, str | None]:
    """The expert record at ``o``: ((length, n, flags, word 3's high bits), None) when its fixed fields are valid
    and it is wholly in ``buf``; else (None, damage reason, or None when more data may follow)."""
    size = buf.shape[0]
    if size - o < _FIXED + CRC_BYTES:
        return None, ("truncated record" if at_eof else None)
    marker, length, _seq, phase, flags, reserved, _layer, n, kk = RECORD_FIXED.unpack_from(buf.data, o)
    if (marker != REC_MARKER or phase > 1 or flags & ~KNOWN_FLAGS or reserved or kk != k
            or length != record_length(n, k, bool(flags & FLAG_WEIGHTS)) or length > MAX_RECORD_BYTES):
        return None, "damaged record header"
    if size - o < length:
        return None, ("truncated record" if at_eof else None)
    return (length, n, flags, (flags << 8) | (reserved << 16)), None


def _scan(buf: np.ndarray, k: int, at_eof: bool, measures: bool = True) -> tuple[list[_Run], int, str | None]:
    """Find the runs of valid records in ``buf`` (which starts at a record boundary).

    Returns (runs, bytes consumed, damage reason or None). Stops early (no damage) when the next record
    does not fit in ``buf`` and more data may follow. ``measures``: measurement records are allowed
    (version 2 and later; in a version-1 trace one is damage).
    """
    runs: list[_Run] = []
    size = buf.shape[0]
    view = buf.data  # a memoryview: what struct reads the record headers from
    o = 0
    while o < size:
        if size - o < 4:
            return runs, o, ("truncated record" if at_eof else None)
        if measures and _U32.unpack_from(view, o)[0] == MEAS_MARKER:
            lone, damage = _lone_meas(buf, o, at_eof)
            if lone is None:
                return runs, o, damage
            runs.append(lone)
            o += MEAS_LEN
            continue
        head, damage = _record_head(buf, o, k, at_eof)
        if head is None:
            return runs, o, damage
        length, n, flags, word3_hi = head
        count = _run_length(buf, o, length, word3_hi, n, k)
        w = bool(flags & FLAG_WEIGHTS)
        end = o + count * length
        if measures and size - end >= MEAS_LEN and _meas_at(buf, end):
            per = _periodic(buf, o, count, length, word3_hi, n, k, w)
            if per is not None:
                more, o, damage = per
                runs += more
                if damage is not None:
                    return runs, o, damage
                continue
        good = _crc_ok(buf[o:end].reshape(count, length), length)
        if not good.all():
            bad = int(np.argmin(good))
            if bad:
                runs.append(_Run(o, length, bad, n, w))
            return runs, o + bad * length, "checksum mismatch"
        runs.append(_Run(o, length, count, n, w))
        o = end
    return runs, o, None


def _extract(buf: np.ndarray, runs: list[_Run], header: TraceHeader, want_weights: bool = True) -> TraceData:
    """Row-aligned arrays from the runs: fields are columns of each run's [records, length/4] view; the
    measurements go to the ``io`` table with ``row`` counted from the chunk's first row."""
    k = header.fingerprint.n_expert_used
    total = sum(r.rows for r in runs)
    has_w = want_weights and any(r.weights and r.per for r in runs)
    seq = np.empty(total, np.int32)
    phase = np.empty(total, np.uint8)
    pos = np.empty(total, np.int32)
    token = np.empty(total, np.int32)
    layer = np.empty(total, np.int32)
    experts = np.empty((total, k), np.int32)
    weights = np.empty((total, k), np.float32) if has_w else None
    meas: list[tuple[np.ndarray, np.ndarray]] = []  # ([m, 12] uint32 words, row after each)
    at = 0
    for r in runs:
        rows = r.rows
        grp = r.groups(buf) if (rows or r.meas) else None
        if r.meas and grp is not None:
            words = np.ascontiguousarray(grp[:, r.per * r.length:]).view("<u4")
            meas.append((words, at + np.arange(1, r.count + 1, dtype=np.int64) * (r.per * r.n)))
        if rows == 0 or grp is None:
            continue
        # [count, per, length/4] int32: a view (periodic runs are strided); fields are copied out column-wise
        w = grp[:, :r.per * r.length].reshape(r.count, r.per, r.length).view("<i4")
        sl = slice(at, at + rows)
        c, n = FIXED_WORDS, r.n
        if n == 1:
            seq[sl], layer[sl] = w[..., 2].reshape(rows), w[..., 4].reshape(rows)
            phase[sl] = (w[..., 3] & 0xFF).reshape(rows)
        else:
            seq[sl] = np.repeat(w[..., 2].reshape(-1), n)
            layer[sl] = np.repeat(w[..., 4].reshape(-1), n)
            phase[sl] = np.repeat((w[..., 3] & 0xFF).reshape(-1), n)
        pos[sl] = w[..., c:c + n].reshape(rows)
        token[sl] = w[..., c + n:c + 2 * n].reshape(rows)
        e = c + 2 * n
        experts[sl] = w[..., e:e + n * k].reshape(rows, k)
        if weights is not None:
            if r.weights:
                weights[sl] = w[..., e + n * k:e + 2 * n * k].view("<f4").reshape(rows, k)
            else:
                weights[sl] = np.nan
        at += rows
    return TraceData(seq=seq, phase=phase, pos=pos, token=token, layer=layer, experts=experts,
                     weights=weights, header=header, n_records=sum(r.count * r.per for r in runs),
                     io=_io_table(meas) if meas else None)


def _io_table(parts: list[tuple[np.ndarray, np.ndarray]]) -> IoTable:
    """The measurement records' fields ([m, 12] uint32 words each) as an IoTable; unknown counters are -1."""
    w = np.concatenate([p[0] for p in parts])
    flags = (w[:, 3] >> 8) & 0xFF

    def u64(lo: int, unknown: int) -> np.ndarray:
        v = (w[:, lo].astype(np.uint64) | (w[:, lo + 1].astype(np.uint64) << np.uint64(32))).astype(np.int64)
        return np.where(flags & unknown, -1, v) if unknown else v

    return IoTable(seq=w[:, 2].view("<i4").astype(np.int32), phase=(w[:, 3] & 0xFF).astype(np.uint8),
                   n_tokens=w[:, 4].astype(np.int64), read_bytes=u64(5, MEAS_FLAG_NO_READ_BYTES),
                   majflt=u64(7, MEAS_FLAG_NO_MAJFLT), wall_ns=u64(9, 0),
                   row=np.concatenate([p[1] for p in parts]))


def iter_trace_chunks(path: str | os.PathLike[str], max_rows: int = DEFAULT_MAX_ROWS,
                      weights: bool = True, start: int | None = None, stop: int | None = None
                      ) -> Iterator[TraceData]:
    """Yield the trace as TraceData chunks of at most ``max_rows`` rows (a single larger record excepted).

    ``weights=False`` leaves the gate weights out (they are still checksummed): join does not need them.
    ``start``/``stop``: only the records in these file offsets (both record boundaries, see ``record_start``),
    so that workers can read parts of one big trace (gguf_experts.fleet_dask); row numbers of the measured
    I/O then count from ``start``.

    Memory is bounded by the chunk size whatever the file size. A damaged tail ends the iteration after
    a TraceRecoveryWarning; the last chunk then has ``recovered=True`` and ``dropped_bytes`` set.
    """
    where = str(path)
    block_bytes = max(1, int(max_rows)) * MIN_ROW_BYTES
    stuck_need = 0  # set when one record is larger than a block: read up to its end once
    with open(path, "rb") as f:
        header = _read_header(f, where)
        file_size = os.fstat(f.fileno()).st_size if stop is None else stop
        offset = header.size if start is None else start  # file offset of store[0]
        if start is not None:
            f.seek(start)
        store = bytearray(block_bytes)  # reused: chunks are copies, never views of it
        fill = 0  # valid bytes in store (the leftover of the previous block, then new data)
        yielded = False
        measures = header.version >= 2  # a measurement record in a version-1 trace is damage
        rows_before = 0  # rows of the chunks already yielded: IoTable.row counts from the trace's first row
        empty = _EmptyRecords()
        while True:
            cap = max(block_bytes, stuck_need)
            stuck_need = 0
            if cap > len(store):
                bigger = bytearray(cap)
                bigger[:fill] = store[:fill]
                store = bigger
            if stop is not None:  # a part: read no further than its end (a record boundary)
                cap = max(fill, min(cap, stop - offset))
            got = f.readinto(memoryview(store)[fill:cap]) if cap > fill else 0
            at_eof = fill + got < cap or (stop is not None and offset + fill + got >= stop)
            fill += got
            buf = np.frombuffer(store, np.uint8, count=fill)
            runs, used, damage = _scan(buf, header.fingerprint.n_expert_used, at_eof, measures)
            chunk = _extract(buf, runs, header, weights) if runs else None
            if chunk is not None:
                if chunk.io is not None:
                    chunk.io = chunk.io.shifted(rows_before)
                rows_before += len(chunk)
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
                present = max(0, (os.fstat(f.fileno()).st_size if stop is None else stop) - offset)
                stuck_need = max(min(need, MAX_RECORD_BYTES, present), _FIXED + CRC_BYTES, fill + 1)
        empty.warn(where)
        if not yielded:
            warn_no_rows(where)
            yield TraceData.empty(header)


def record_start(path: str | os.PathLike[str], offset: int, window: int = 1 << 18) -> int:
    """The file offset of the first record at or after ``offset`` (the end of the file if none): a 4-byte
    aligned marker from which the records check (fixed fields and CRC) over the next MAX_RECORD_SCAN bytes.
    Used to cut a big trace into parts at record boundaries; a false start inside a record would need a marker,
    a length and a CRC-32 to match by chance, and damage is still reported by the part that contains it."""
    with open(path, "rb") as f:
        header = _read_header(f, str(path))
        size = os.fstat(f.fileno()).st_size
        o = max(header.size, offset)
        o += (header.size - o) % 4  # records start at 4-byte steps from the header's end
        measures = header.version >= 2
        k = header.fingerprint.n_expert_used
        while o < size:
            f.seek(o)
            raw = f.read(window + 4 * MAX_RECORD_SCAN)
            buf = np.frombuffer(raw, np.uint8)
            words = buf[:len(raw) // 4 * 4].view("<u4")[:window // 4]
            marks = (words == REC_MARKER) | ((words == MEAS_MARKER) if measures else False)
            at_eof = o + len(raw) >= size
            for c in (np.flatnonzero(marks) * 4).tolist():
                end = c + MAX_RECORD_SCAN
                runs, used, damage = _scan(buf[c:end], k, at_eof and end >= len(buf), measures)
                if runs and damage is None:
                    return o + c
            o += window
        return size


MAX_RECORD_SCAN = 1 << 16  # bytes checked from a candidate start (and read past the window for the last ones)


class _EmptyRecords:
    """Records with no rows (n_tokens = 0): skipped, counted, and reported once (EmptyRecordsWarning)."""

    def __init__(self) -> None:
        self.count, self.first = 0, -1
        self.seqs: set[int] = set()

    def note(self, buf: np.ndarray, runs: list[_Run], offset: int) -> None:
        for r in runs:
            if r.n == 0 and r.per > 0:  # expert records with no rows (a lone measurement has per = 0)
                recs = np.ascontiguousarray(r.groups(buf)[:, :r.per * r.length]).reshape(r.count * r.per, r.length)
                self.seqs.update(np.unique(recs.view("<i4")[:, 2]).tolist())  # word 2 of a record: its sequence
                self.first = offset + r.offset if self.first < 0 else self.first
                self.count += r.count * r.per

    def warn(self, where: str) -> None:
        if self.count:
            warn_empty_records(where, self.count, self.first, sorted(self.seqs))


def read_trace(path: str | os.PathLike[str]) -> TraceData:
    """The whole trace in memory (use iter_trace_chunks for traces larger than memory)."""
    p = Path(path)
    parts = list(iter_trace_chunks(p))
    return concat(parts, parts[0].header) if parts else TraceData.empty(read_trace_header(p))
