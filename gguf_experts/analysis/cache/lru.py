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
experts ahead of e in the recency list at the chunk start. Each is a bitset of W uint64 words whose bits
are numbered by rank in that recency list (popcounts do not care about the numbering): (a) is a range-OR
answered by a sparse table, (b) a per-slot prefix OR, (c) simply "bits 0..rank(e)-1". The distance is the
popcount of their OR. Cost per access is O(W) words plus O(W log R / k) for the sparse table, with R the
rows of a piece (chunk_rows_for keeps its arrays in cache): no per-access Python work. Byte distances (the
global cache) sum popcount(bits & mask) x size over the few distinct expert sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import InputError

COLD = -1  # distance of a first use (a compulsory miss at every capacity)
_BIT = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))


def words_for(n_items: int) -> int:
    return max(1, (int(n_items) + 63) // 64)


def chunk_rows_for(n_items: int, k: int) -> int:
    """Rows per chunk_distances call: per-access bitset arrays of ~1 MiB stay in cache; at 2 MiB the
    throughput halved (bench_analysis.py: 14.5 vs 5.9 M accesses/s for 128 experts, top-8). Rows of one
    access (--order access) take up to 32768 rows a piece: 6.2 vs 4.2 M accesses/s at 8192 (128 experts)."""
    cap = max(8192, 32768 // max(1, k))
    return int(min(cap, max(512, (1 << 20) // (max(1, k) * words_for(n_items) * 8))))


def row_bits(items: np.ndarray, n_words: int, out: np.ndarray | None = None) -> np.ndarray:
    """One-hot bitsets per access: [R, k, W] uint64 (item i sets bit i % 64 of word i // 64), written into
    ``out`` ([R * k, W], zeroed here) when given."""
    r, k = items.shape
    flat = items.reshape(-1)
    if out is None:
        out = np.zeros((r * k, n_words), np.uint64)
    else:
        out[:] = 0
    if n_words == 1:
        out[:, 0] = np.take(_BIT, flat & 63)
    else:
        out.reshape(-1)[np.arange(r * k) * n_words + (flat >> 6)] = np.take(_BIT, flat & 63)
    return out.reshape(r, k, n_words)


def _or_slots(part: np.ndarray) -> np.ndarray:
    """In place: one-hot bits [R, k, W] become the inclusive prefix OR over slots; returns the row OR
    [R, W]. k vectorised steps, faster than ufunc.accumulate over the short slot axis."""
    for j in range(1, part.shape[1]):
        np.bitwise_or(part[:, j - 1], part[:, j], out=part[:, j])
    return part[:, -1]


def _as_records(a: np.ndarray) -> np.ndarray:
    """View [..., W] uint64 as one opaque record per row: np.take on it is ~20x faster than 2-D fancy indexing."""
    w = a.shape[-1]
    return np.ascontiguousarray(a).view(np.dtype((np.void, 8 * w))).reshape(a.shape[:-1])


def _sparse_table(row_or: np.ndarray) -> np.ndarray:
    """st[j * R + x] = OR of rows x .. x + 2**j - 1 (entries whose range overruns R are unused), then one
    zero row: [levels * R + 1, W]."""
    r, w = row_or.shape
    levels = max(1, int(r).bit_length())
    flat = np.zeros((levels * r + 1, w), np.uint64)
    st = flat[:levels * r].reshape(levels, r, w)
    st[0] = row_or
    for j in range(1, levels):  # log2(R) steps, each vectorised over all rows
        half = 1 << (j - 1)
        n = r - (1 << j) + 1
        if n <= 0:
            break
        np.bitwise_or(st[j - 1, :n], st[j - 1, half:half + n], out=st[j, :n])
    return flat


def _range_or(st_rec: np.ndarray, r: int, w: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """OR of rows [a, b) for each pair (zero where a >= b). st_rec is the sparse table as records with
    one zero record appended (the answer of empty ranges)."""
    n = b - a
    ok = n > 0
    lev = np.frexp(np.maximum(n, 1))[1].astype(np.int64) - 1  # floor(log2 n), exact for integers
    zero = st_rec.shape[0] - 1
    base = lev * r
    lo = np.take(st_rec, np.where(ok, base + a, zero))
    hi = np.take(st_rec, np.where(ok, base + b - np.left_shift(1, lev), zero))
    out = lo.view(np.uint64).reshape(-1, w)
    out |= hi.view(np.uint64).reshape(-1, w)
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
    byte_distance: np.ndarray | None = None  # float64 [R, k]: bytes of the distinct items (item_bytes given)


def _order_by_stream(stream: np.ndarray, n_streams: int) -> np.ndarray:
    dt = np.uint16 if n_streams <= 1 << 16 else np.int64
    return np.argsort(stream.astype(dt, copy=False), kind="stable")  # radix sort for 16-bit keys


def _ranks(state: StackState) -> np.ndarray:
    """rank[s * n_items + item]: the item's position in its stream's recency list now (0 = most recent);
    a permutation per stream (items never used take the last positions)."""
    s_n, n_items = state.n_streams, state.n_items
    ranked = np.argsort(-state.last, axis=1)  # keys of used items are distinct: no stable sort needed
    rank = np.empty(s_n * n_items, np.int64)
    rank[(np.arange(s_n)[:, None] * n_items + ranked).reshape(-1)] = np.tile(np.arange(n_items), s_n)
    return rank


def _low_masks(n_items: int, w: int) -> np.ndarray:
    """[n_items, W]: row r has bits 0..r-1 set (the items ranked ahead of rank r)."""
    return _low_masks_of(np.arange(n_items), w)


def _low_masks_of(r: np.ndarray, w: int) -> np.ndarray:
    """[len(r), W]: row i has bits 0..r[i]-1 set."""
    j = np.arange(w)[None, :]
    q, rem = (r >> 6)[:, None], (r & 63).astype(np.uint64)[:, None]
    part = np.left_shift(np.uint64(1), rem) - np.uint64(1)
    return np.where(j < q, np.uint64(~np.uint64(0)), np.where(j == q, part, np.uint64(0))).astype(np.uint64)


def _class_masks(state: StackState, rank: np.ndarray, item_bytes: np.ndarray, w: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Byte sizes present and, per size, the bitset (in rank numbering) of the items of that size."""
    sizes, cls = np.unique(item_bytes, return_inverse=True)
    masks = np.zeros((len(sizes), w), np.uint64)
    pos = rank.reshape(state.n_streams, state.n_items)[0]  # one stream when byte sizes are given
    np.bitwise_or.at(masks, (cls, pos >> 6), np.take(_BIT, pos & 63))
    return sizes.astype(np.float64), masks


def chunk_distances(state: StackState, stream: np.ndarray, items: np.ndarray,
                    item_bytes: np.ndarray | None = None) -> ChunkDistances:
    """Stack distances of one chunk of rows (stream id per row, item ids [R, k]); updates ``state``.

    Rows of one stream must come in that stream's order; rows of different streams may interleave.
    ``item_bytes`` [n_items] (one stream only) adds byte distances: the bytes of the distinct items used
    since the last use (summed per size class: a model has a few distinct expert sizes).
    Raises InputError when a row lists an item twice (top-k selections are distinct).
    """
    stream = np.asarray(stream, np.int64)
    items = np.asarray(items, np.int64)
    r, k = items.shape
    s_n, n_items = state.n_streams, state.n_items
    w = words_for(n_items)
    if r == 0:
        z = np.zeros((0, k), np.int64)
        return ChunkDistances(np.zeros(0, np.int64), stream, items, z, z.copy(),
                              None if item_bytes is None else np.zeros((0, k)))
    order = _order_by_stream(stream, s_n) if s_n > 1 else np.arange(r)
    st_sorted = stream[order]
    it = items[order]
    counts = np.bincount(st_sorted, minlength=s_n)
    seg_start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    pos = np.arange(r, dtype=np.int64)
    local = state.rows[st_sorted] + (pos - seg_start[st_sorted])  # stream-local row index
    n = r * k
    acc_row = np.repeat(pos, k)
    flat_stream = np.repeat(st_sorted, k)
    g = flat_stream * n_items + it.reshape(-1)  # (stream, item) as one id
    srt = np.argsort(g.astype(np.uint16) if s_n * n_items <= 1 << 16 else g, kind="stable")
    gs = g[srt]
    same = gs[1:] == gs[:-1]
    prev = np.full(n, -1, np.int64)  # flat index of the previous use in this chunk
    prev[srt[1:][same]] = srt[:-1][same]
    in_chunk = prev >= 0
    prev_row = np.take(acc_row, prev)
    dup = in_chunk & (prev_row == acc_row)  # a previous use in the same row
    if dup.any():
        bad = int(np.flatnonzero(dup)[0])
        raise InputError(f"a row of layer/stream {int(flat_stream[bad])} lists expert {int(g[bad]) % n_items} "
                         "twice; top-k selections are distinct, so the trace is damaged")
    carried_row = np.take(state.last_row.reshape(-1), g)
    cold = ~in_chunk & (carried_row < 0)

    # the "earlier part" of the distance set: earlier slots of the previous use's row (previous use in
    # this chunk), or the items ahead in the recency order at the chunk start (previous use before it).
    # Bits are numbered by rank at the chunk start (popcounts do not care about the numbering), so the
    # items ahead of rank q are simply bits 0..q-1.
    rank = _ranks(state)
    grank = np.take(rank, g)
    small = n_items * w <= 1 << 16  # a table of the masks "bits 0..q-1" for every rank q (else computed)
    pre = np.empty((n + 1 + (n_items if small else 0), w), np.uint64)
    row_or = _or_slots(row_bits(grank.reshape(r, k), w, out=pre[:n]))
    pre[n] = 0
    if small:
        pre[n + 1:] = _low_masks(n_items, w)
    ahead_idx = n + 1 + grank if small else n
    pre_table = _as_records(pre)
    st_rec = _as_records(_sparse_table(row_or))
    pre_idx = np.where(in_chunk, np.where(prev != prev_row * k, prev - 1, n), ahead_idx)  # slot 0: none
    pre_idx[cold] = n
    start = np.where(in_chunk, prev_row + 1, seg_start[flat_stream])
    start[cold] = acc_row[cold]
    dist_bits = _range_or(st_rec, r, w, start, acc_row)
    dist_bits |= np.take(pre_table, pre_idx).view(np.uint64).reshape(-1, w)
    if not small:
        ib = np.flatnonzero(~in_chunk & ~cold)
        dist_bits[ib] |= _low_masks_of(grank[ib], w)
    dist = popcounts(dist_bits)
    dist[cold] = COLD
    byte_dist = None
    if item_bytes is not None:
        if s_n != 1:
            raise ValueError("byte distances need a single stream")
        sizes, masks = _class_masks(state, rank, np.asarray(item_bytes), w)
        byte_dist = np.zeros(n)
        for size, mask in zip(sizes.tolist(), masks):  # a few distinct expert sizes
            byte_dist += size * popcounts(dist_bits & mask[None, :])
        byte_dist[cold] = np.inf
    gap = np.where(in_chunk, acc_row - prev_row, local[acc_row] - carried_row)
    gap[cold] = COLD
    # state update: the last use in this chunk of each (stream, item); its key orders slot 0 first
    ends = np.ones(n, bool)
    ends[:-1] = ~same
    li = srt[ends]
    state.last.reshape(-1)[g[li]] = local[li // k] * k + (k - 1 - li % k)
    state.last_row.reshape(-1)[g[li]] = local[li // k]
    state.rows += counts
    return ChunkDistances(order, st_sorted, it, dist.reshape(r, k), gap.reshape(r, k),
                          None if byte_dist is None else byte_dist.reshape(r, k))
