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


def row_bits(items: np.ndarray, n_words: int) -> np.ndarray:
    """One-hot bitsets per access: [R, k, W] uint64 (item i sets bit i % 64 of word i // 64)."""
    r, k = items.shape
    flat = items.reshape(-1)
    bits = np.zeros((r * k, n_words), np.uint64)
    bits.reshape(-1)[np.arange(r * k) * n_words + (flat >> 6)] = np.left_shift(
        np.uint64(1), (flat & 63).astype(np.uint64))
    return bits.reshape(r, k, n_words)


def _as_records(a: np.ndarray) -> np.ndarray:
    """View [..., W] uint64 as one opaque record per row: np.take on it is ~20x faster than 2-D fancy indexing."""
    w = a.shape[-1]
    return np.ascontiguousarray(a).view(np.dtype((np.void, 8 * w))).reshape(a.shape[:-1])


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


def _range_or(st_rec: np.ndarray, r: int, w: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """OR of rows [a, b) for each pair (zero where a >= b); st_rec is the sparse table as records."""
    n = b - a
    ok = n > 0
    lev = np.frexp(np.maximum(n, 1))[1].astype(np.int64) - 1  # floor(log2 n), exact for integers
    base = lev * r
    lo = np.take(st_rec, np.where(ok, base + a, 0)).view(np.uint64).reshape(-1, w)
    hi = np.take(st_rec, np.where(ok, base + b - np.left_shift(1, lev), 0)).view(np.uint64).reshape(-1, w)
    out = lo | hi
    out[~ok] = 0
    return out


def popcounts(bits: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Bits set per row of [N, W] words, or the sum of per-word weights x bits set (bytes)."""
    pc = np.bitwise_count(bits)
    if weights is not None:
        return pc.astype(np.float64) @ weights.astype(np.float64)
    if pc.shape[1] > 8:
        return pc.sum(axis=1, dtype=np.int64)
    total = pc[:, 0].astype(np.int64)
    for j in range(1, pc.shape[1]):  # W <= 8 columns: faster than a reduction over a short axis
        total += pc[:, j]
    return total


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
    """Per access of a chunk, rows grouped by stream (stable: each stream's rows keep their order)."""

    order: np.ndarray  # int64 [R]: the caller's row index of each row here
    stream: np.ndarray  # int64 [R]
    items: np.ndarray  # int64 [R, k]
    distance: np.ndarray  # int64 [R, k]: distinct items between the last use and now; COLD for first uses
    gap: np.ndarray  # int64 [R, k]: rows of the stream since the last use; COLD for first uses
    local_row: np.ndarray  # int64 [R]: the row's index in its stream (counting earlier chunks)
    byte_distance: np.ndarray | None = None  # float64 [R, k]: bytes of the distinct items (word_bytes given)


def _order_by_stream(stream: np.ndarray, n_streams: int) -> np.ndarray:
    dt = np.uint16 if n_streams <= 1 << 16 else np.int64
    return np.argsort(stream.astype(dt, copy=False), kind="stable")  # radix sort for 16-bit keys


def _ahead(state: StackState, w: int) -> np.ndarray:
    """ahead[s, item]: bitset of the items more recent than item at the current point (chunk start)."""
    s_n, n_items = state.n_streams, state.n_items
    ranked = np.argsort(-state.last, axis=1, kind="stable")
    onehot = row_bits(ranked.reshape(-1, 1), w).reshape(s_n, n_items, w)
    incl = np.bitwise_or.accumulate(onehot, axis=1)
    excl = np.zeros_like(incl)
    excl[:, 1:] = incl[:, :-1]
    ahead = np.empty_like(excl)
    ahead[np.repeat(np.arange(s_n), n_items), ranked.reshape(-1)] = excl.reshape(-1, w)
    return ahead.reshape(s_n * n_items, w)


def chunk_distances(state: StackState, stream: np.ndarray, items: np.ndarray,
                    word_bytes: np.ndarray | None = None) -> ChunkDistances:
    """Stack distances of one chunk of rows (stream id per row, item ids [R, k]); updates ``state``.

    Rows of one stream must come in that stream's order; rows of different streams may interleave.
    ``word_bytes`` [W] (bytes of each item in bitset word j, items of one word being equal in size) adds
    byte distances: the bytes of the distinct items used since the last use.
    Raises InputError when a row lists an item twice (top-k selections are distinct).
    """
    stream = np.asarray(stream, np.int64)
    items = np.asarray(items, np.int64)
    r, k = items.shape
    s_n, n_items = state.n_streams, state.n_items
    w = words_for(n_items)
    if r == 0:
        z = np.zeros((0, k), np.int64)
        return ChunkDistances(np.zeros(0, np.int64), stream, items, z, z.copy(), np.zeros(0, np.int64),
                              None if word_bytes is None else np.zeros((0, k)))
    order = _order_by_stream(stream, s_n) if s_n > 1 else np.arange(r)
    st_sorted = stream[order]
    it = items[order]
    counts = np.bincount(st_sorted, minlength=s_n)
    seg_start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    pos = np.arange(r, dtype=np.int64)
    local = state.rows[st_sorted] + (pos - seg_start[st_sorted])  # stream-local row index
    flat_item = it.reshape(-1)
    flat_stream = np.repeat(st_sorted, k)
    g = flat_stream * n_items + flat_item
    srt = np.argsort(g.astype(np.uint16) if s_n * n_items <= 1 << 16 else g, kind="stable")
    gs = g[srt]
    same = gs[1:] == gs[:-1]
    cur, prv = srt[1:][same], srt[:-1][same]
    if cur.size and (cur // k == prv // k).any():
        bad = cur[cur // k == prv // k][0]
        raise InputError(f"a row of layer/stream {int(flat_stream[bad])} lists expert {int(flat_item[bad]) % n_items} "
                         "twice; top-k selections are distinct, so the trace is damaged")
    prev = np.full(r * k, -1, np.int64)  # flat index of the previous use in this chunk
    prev[cur] = prv
    in_chunk = prev >= 0
    carried_row = state.last_row[flat_stream, flat_item]
    cold = ~in_chunk & (carried_row < 0)
    before = ~in_chunk & ~cold

    bits = row_bits(it, w)
    st_rec = _as_records(_sparse_table(np.bitwise_or.reduce(bits, axis=1)))
    acc_row = np.repeat(pos, k)
    dist_bits = np.zeros((r * k, w), np.uint64)
    ia = np.flatnonzero(in_chunk)
    if ia.size:  # (a) rows strictly between + (b) earlier slots of the previous use's row
        pa = prev[ia]
        prow, pslot = pa // k, pa % k
        part = _as_records(np.bitwise_or.accumulate(bits, axis=1)).reshape(-1)  # inclusive prefix over slots
        pre = np.take(part, np.maximum(pa - 1, 0)).view(np.uint64).reshape(-1, w).copy()
        pre[pslot == 0] = 0
        dist_bits[ia] = _range_or(st_rec, r, w, prow + 1, acc_row[ia]) | pre
    ib = np.flatnonzero(before)
    if ib.size:  # (c) ahead in the recency order at the chunk start + (a) rows of this chunk before
        sb = flat_stream[ib]
        ahead = np.take(_as_records(_ahead(state, w)), sb * n_items + flat_item[ib])
        dist_bits[ib] = ahead.view(np.uint64).reshape(-1, w) | _range_or(st_rec, r, w, seg_start[sb], acc_row[ib])
    dist = popcounts(dist_bits)
    dist[cold] = COLD
    byte_dist = None
    if word_bytes is not None:
        byte_dist = popcounts(dist_bits, word_bytes)
        byte_dist[cold] = np.inf
    gap = np.full(r * k, COLD, np.int64)
    gap[ia] = acc_row[ia] - prev[ia] // k
    gap[ib] = local[acc_row[ib]] - carried_row[ib]
    # state update: the last use in this chunk of each (stream, item); its key orders slot 0 first
    ends = np.ones(r * k, bool)
    ends[:-1] = ~same
    li = srt[ends]
    state.last[flat_stream[li], flat_item[li]] = local[li // k] * k + (k - 1 - li % k)
    state.last_row[flat_stream[li], flat_item[li]] = local[li // k]
    state.rows += counts
    return ChunkDistances(order, st_sorted, it, dist.reshape(r, k), gap.reshape(r, k), local,
                          None if byte_dist is None else byte_dist.reshape(r, k))
