"""One-pass LRU stack distances for token-grouped expert requests, vectorised with bitsets.

Convention (the same in every simulator of this package and in the test's plain simulator):
the k experts of one row (one token at one layer) are requested together. An expert that is resident
when the row starts is a hit; the row's experts then become the most recently used, slot 0 (the top-1
expert) most recent of all. With this convention LRU is a stack algorithm: the cache of capacity C
always holds the C most recently used experts, so the stack distance of an access (its 0-based position
in the recency list when its row starts, i.e. the number of distinct experts used since its last use,
counting the earlier slots of that row) is < C exactly when it hits at capacity C. One pass gives the
hit count of every capacity.

How the distances are computed without a Python loop over tokens or accesses: the distinct experts used
since the last use of expert e are the union of (a) the experts of the rows strictly between that use and
now, (b) the earlier slots of the row of that use and (c) when that use precedes the current chunk, the
experts ahead of e in the recency list at the chunk start. Each is a bitset (n_items bits in W uint64
words); (a) is a range-OR answered by a sparse table, (b) a per-slot prefix OR, (c) a per-item prefix OR
of the chunk-start recency order. The distance is the popcount of their OR. Cost per access is O(W) words
plus O(W log R / k) for the sparse table: no per-access Python work.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

COLD = -1  # distance of a first use (a compulsory miss at every capacity)


def words_for(n_items: int) -> int:
    return max(1, (int(n_items) + 63) // 64)


def row_bits(items: np.ndarray, n_words: int) -> tuple[np.ndarray, np.ndarray]:
    """One-hot bitsets per access [R, k, W] and per row [R, W] (OR over its slots)."""
    r, k = items.shape
    bits = np.zeros((r, k, n_words), np.uint64)
    rr = np.repeat(np.arange(r), k)
    ss = np.tile(np.arange(k), r)
    flat = items.reshape(-1)
    bits[rr, ss, flat >> 6] = np.left_shift(np.uint64(1), (flat & 63).astype(np.uint64))
    return bits, np.bitwise_or.reduce(bits, axis=1)


def _sparse_table(row_or: np.ndarray) -> np.ndarray:
    """st[j, x] = OR of rows x .. x + 2**j - 1 (entries whose range overruns R are unused)."""
    r, w = row_or.shape
    levels = max(1, int(r).bit_length())
    st = np.zeros((levels, r, w), np.uint64)
    st[0] = row_or
    for j in range(1, levels):  # log2(R) steps, each vectorised over all rows
        half = 1 << (j - 1)
        n = r - (1 << j) + 1
        if n <= 0:
            break
        np.bitwise_or(st[j - 1, :n], st[j - 1, half:half + n], out=st[j, :n])
    return st


def _range_or(st: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """OR of rows [a, b) for each pair (zero where a >= b)."""
    n = b - a
    ok = n > 0
    lev = np.zeros(n.shape, np.int64)
    lev[ok] = np.log2(n[ok]).astype(np.int64)
    # log2 of exact powers of two is exact in float64; guard against rounding just below
    lev[ok] -= (np.left_shift(1, lev[ok]) > n[ok]).astype(np.int64)
    lo = np.where(ok, a, 0)
    hi = np.where(ok, b - np.left_shift(1, lev), 0)
    out = st[lev, lo] | st[lev, hi]
    out[~ok] = 0
    return out


@dataclass
class StackState:
    """What carries from one chunk to the next, per stream (a layer, or the one global stream)."""

    n_streams: int
    n_items: int
    k: int
    last: np.ndarray = field(init=False)  # int64 [S, n_items]: key of the last use (-1 never used)
    last_row: np.ndarray = field(init=False)  # int64 [S, n_items]: stream-local row of the last use
    rows: np.ndarray = field(init=False)  # int64 [S]: rows consumed per stream

    def __post_init__(self) -> None:
        self.last = np.full((self.n_streams, self.n_items), -1, np.int64)
        self.last_row = np.full((self.n_streams, self.n_items), -1, np.int64)
        self.rows = np.zeros(self.n_streams, np.int64)


@dataclass
class ChunkDistances:
    """Per access of a chunk, in the chunk's row order: stream, item, LRU stack distance and row gap."""

    stream: np.ndarray  # int64 [R] per row
    items: np.ndarray  # int64 [R, k]
    distance: np.ndarray  # int64 [R, k]: distinct items between the last use and now; COLD for first uses
    gap: np.ndarray  # int64 [R, k]: rows of the stream since the last use (COLD for first uses)
    word_counts: np.ndarray | None = None  # int64 [R, k, W]: per-word popcounts of the distance set


def _order_by_stream(stream: np.ndarray, n_streams: int) -> np.ndarray:
    dt = np.uint16 if n_streams <= 1 << 16 else np.int64
    return np.argsort(stream.astype(dt, copy=False), kind="stable")  # radix sort for 16-bit keys


def chunk_distances(state: StackState, stream: np.ndarray, items: np.ndarray,
                    keep_words: bool = False) -> ChunkDistances:
    """Stack distances of one chunk of rows (stream id per row, item ids [R, k]); updates ``state``.

    Rows of one stream must come in that stream's order; rows of different streams may interleave.
    Raises InputError when a row lists an item twice (top-k selections are distinct).
    """
    stream = np.asarray(stream, np.int64)
    items = np.asarray(items, np.int64)
    r, k = items.shape
    s_n, n_items = state.n_streams, state.n_items
    w = words_for(n_items)
    if r == 0:
        z = np.zeros((0, k), np.int64)
        return ChunkDistances(stream, items, z, z.copy(),
                              np.zeros((0, k, w), np.int64) if keep_words else None)
    order = _order_by_stream(stream, s_n) if s_n > 1 else np.arange(r)
    st_sorted = stream[order]
    it = items[order]
    counts = np.bincount(st_sorted, minlength=s_n)
    seg_start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    pos = np.arange(r, dtype=np.int64)
    local = state.rows[st_sorted] + (pos - seg_start[st_sorted])  # stream-local row index
    key = (local[:, None] * k + (k - 1 - np.arange(k))[None, :]).reshape(-1)
    flat_item = it.reshape(-1)
    flat_stream = np.repeat(st_sorted, k)
    g = flat_stream * n_items + flat_item
    gdt = np.uint16 if s_n * n_items <= 1 << 16 else np.int64
    srt = np.argsort(g.astype(gdt), kind="stable")
    gs = g[srt]
    same = gs[1:] == gs[:-1]
    prev = np.full(r * k, -1, np.int64)  # flat index of the previous use in this chunk
    prev[srt[1:][same]] = srt[:-1][same]
    if same.any() and (srt[1:][same] // k == srt[:-1][same] // k).any():
        bad = srt[1:][same][srt[1:][same] // k == srt[:-1][same] // k][0]
        raise InputError(f"a row of stream {int(flat_stream[bad])} lists expert {int(flat_item[bad])} twice; "
                         "top-k selections are distinct, so the trace is damaged")
    in_chunk = prev >= 0
    carried = state.last[flat_stream, flat_item]
    carried_row = state.last_row[flat_stream, flat_item]
    cold = ~in_chunk & (carried < 0)
    before = ~in_chunk & ~cold

    bits, row_or = row_bits(it, w)
    st = _sparse_table(row_or)
    acc_row = np.repeat(pos, k)
    dist_bits = np.zeros((r * k, w), np.uint64)
    # (a)+(b): previous use inside the chunk
    ia = np.flatnonzero(in_chunk)
    if ia.size:
        pa = prev[ia]
        prow, pslot = pa // k, pa % k
        part = np.bitwise_or.accumulate(bits, axis=1)  # inclusive prefix OR over slots
        pre = np.where((pslot > 0)[:, None], part[prow, np.maximum(pslot - 1, 0)], np.uint64(0))
        dist_bits[ia] = _range_or(st, prow + 1, acc_row[ia]) | pre
    # (c)+(a): previous use before the chunk
    ib = np.flatnonzero(before)
    if ib.size:
        ranked = np.argsort(-state.last, axis=1, kind="stable")  # recency order at the chunk start
        onehot = np.zeros((s_n, n_items, w), np.uint64)
        sidx = np.repeat(np.arange(s_n), n_items)
        ritem = ranked.reshape(-1)
        onehot[sidx, np.tile(np.arange(n_items), s_n), ritem >> 6] = np.left_shift(
            np.uint64(1), (ritem & 63).astype(np.uint64))
        incl = np.bitwise_or.accumulate(onehot, axis=1)
        excl = np.zeros_like(incl)
        excl[:, 1:] = incl[:, :-1]
        ahead = np.empty_like(excl)  # ahead[s, item]: items more recent than item at the chunk start
        ahead[sidx, ritem] = excl.reshape(-1, w)
        sb = flat_stream[ib]
        dist_bits[ib] = ahead[sb, flat_item[ib]] | _range_or(st, seg_start[sb], acc_row[ib])
    wc = np.bitwise_count(dist_bits).astype(np.int64)
    dist = wc.sum(axis=1)
    dist[cold] = COLD
    gap = np.full(r * k, COLD, np.int64)
    gap[ia] = acc_row[ia] - prev[ia] // k
    gap[ib] = local[acc_row[ib]] - carried_row[ib]
    # state update: the last use in this chunk of each (stream, item)
    ends = np.ones(r * k, bool)
    ends[:-1] = ~same
    last_idx = srt[ends]
    state.last[flat_stream[last_idx], flat_item[last_idx]] = key[last_idx]
    state.last_row[flat_stream[last_idx], flat_item[last_idx]] = local[last_idx // k]
    state.rows += counts
    inv = np.empty(r, np.int64)
    inv[order] = pos  # back to the caller's row order
    out_w = wc.reshape(r, k, w)[inv] if keep_words else None
    return ChunkDistances(stream, items, dist.reshape(r, k)[inv], gap.reshape(r, k)[inv], out_w)
