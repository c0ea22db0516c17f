"""Expert cache simulation: LRU miss-ratio curves for every capacity in one pass (stack distances, see
lru.py), LFU and Belady's OPT at chosen capacities, a global byte-budget LRU cache over all layers, and
working sets W(tau).

Convention shared by every policy here and by the plain simulators in the tests: the k experts of one
row (one token at one layer) are requested together; an expert resident when the row starts is a hit,
every other one a miss that is fetched (its bytes counted). After the row the cache holds the row's
experts plus the best of the others by the policy's priority:
  LRU: most recently used first (slot 0 of a row counts as more recent than slot 1, ...);
  LFU: most requests so far first, ties by most recent use;
  OPT: soonest next request first (Belady), ties by lower expert id.
When the capacity is smaller than k the cache keeps the best of the row's experts by that priority.
Per-layer caches hold C experts of their layer; the global cache holds whole experts of any layer whose
bytes fit in the budget.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ...errors import InputError
from .lru import COLD, ChunkDistances, StackState, chunk_distances, chunk_rows_for
from ..stats import check_ids

CURVE_COLUMNS = ["layer", "policy", "capacity", "accesses", "hits", "hit_rate", "bytes_fetched"]
GAP_CAP = 4096  # working-set windows up to this many tokens are exact


@dataclass
class LayerLRU:
    """Per-layer LRU stack-distance histograms, updated chunk by chunk (memory: layers x experts).

    hist[l, d] counts accesses of layer l with stack distance d (d = n_expert: first use), so the hits of
    capacity C are hist[l, :C].sum(). byte_hist weighs each access by its expert's bytes. gap_hist and
    fwd_* feed the working set (see working_set)."""

    n_layer: int
    n_expert: int
    k: int
    expert_bytes: np.ndarray | None = None  # [L, M] bytes of each expert (sum of its slices)
    state: StackState = field(init=False)
    hist: np.ndarray = field(init=False)
    byte_hist: np.ndarray = field(init=False)
    fwd_hist: np.ndarray = field(init=False)  # [L, GAP_CAP + 1]: accesses by forward gap (capped)
    fwd_bytes: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        L, M = self.n_layer, self.n_expert
        self.state = StackState(L, M, self.k)
        self.hist = np.zeros((L, M + 1), np.int64)
        self.byte_hist = np.zeros((L, M + 1), np.float64)
        self.fwd_hist = np.zeros((L, GAP_CAP + 1), np.int64)
        self.fwd_bytes = np.zeros((L, GAP_CAP + 1), np.float64)
        if self.expert_bytes is None:
            self.expert_bytes = np.ones((L, M), np.float64)

    def update(self, layer: np.ndarray, experts: np.ndarray) -> list[tuple[slice, ChunkDistances]]:
        """Add rows (any number: split into cache-sized pieces); returns each piece's rows and
        ChunkDistances (reuse statistics are built on them)."""
        check_ids(layer, experts, self.n_layer, self.n_expert)
        step = chunk_rows_for(self.n_expert, self.k)
        out = []
        for a in range(0, len(layer), step):  # one vectorised pass per piece of `step` rows
            sl = slice(a, a + step)
            out.append((sl, self._update(layer[sl], experts[sl])))
        return out

    def _update(self, layer: np.ndarray, experts: np.ndarray) -> ChunkDistances:
        L, M = self.n_layer, self.n_expert
        cd = chunk_distances(self.state, layer, experts)
        d = np.where(cd.distance == COLD, M, cd.distance)
        lay = np.repeat(cd.stream, self.k)
        idx = lay * (M + 1) + d.ravel()
        assert self.expert_bytes is not None  # set in __post_init__
        b = self.expert_bytes[lay, cd.items.ravel()]
        self.hist += np.bincount(idx, minlength=L * (M + 1)).reshape(L, M + 1)
        self.byte_hist += np.bincount(idx, weights=b, minlength=L * (M + 1)).reshape(L, M + 1)
        # a reuse after g rows closes the previous use's window: its forward gap is g
        g = cd.gap.ravel()
        ok = g != COLD
        gi = lay[ok] * (GAP_CAP + 1) + np.minimum(g[ok], GAP_CAP)
        self.fwd_hist += np.bincount(gi, minlength=L * (GAP_CAP + 1)).reshape(L, GAP_CAP + 1)
        self.fwd_bytes += np.bincount(gi, weights=b[ok], minlength=L * (GAP_CAP + 1)).reshape(L, GAP_CAP + 1)
        return cd

    def curves(self, capacities: Iterable[int] | None = None) -> pd.DataFrame:
        """LRU rows per layer at every capacity 1..n_expert (or the given ones), plus layer 'all' (every
        layer with a cache of that capacity)."""
        return curve_frame(self.hist, self.byte_hist, "lru", capacities, self.layers())

    def layers(self) -> np.ndarray:
        return np.flatnonzero(self.hist.sum(axis=1) > 0)

    def working_set(self, taus: Iterable[int] | None = None) -> pd.DataFrame:
        assert self.expert_bytes is not None  # set in __post_init__
        return working_set(self.fwd_hist, self.fwd_bytes, self.state, self.expert_bytes, self.layers(), taus)


def curve_frame(hist: np.ndarray, byte_hist: np.ndarray, policy: str, capacities: Iterable[int] | None,
                layers: np.ndarray) -> pd.DataFrame:
    """Hits of capacity C are the accesses with stack distance < C (inclusion property)."""
    M = hist.shape[1] - 1
    caps = np.arange(1, M + 1) if capacities is None else np.asarray(sorted(set(capacities)), np.int64)
    if caps.size and (caps.min() < 1 or caps.max() > M):
        raise InputError(f"capacity must be between 1 and {M} experts per layer, got {caps.min()}..{caps.max()}")
    h, bh = hist[layers], byte_hist[layers]
    cum = np.concatenate((np.zeros((len(layers), 1), np.int64), np.cumsum(h[:, :M], axis=1)), axis=1)
    bcum = np.concatenate((np.zeros((len(layers), 1)), np.cumsum(bh[:, :M], axis=1)), axis=1)
    acc = h.sum(axis=1)
    btot = bh.sum(axis=1)
    return curve_rows(layers, policy, caps, acc, cum[:, caps], btot[:, None] - bcum[:, caps])


def curve_rows(layers: np.ndarray, policy: str, caps: np.ndarray, acc: np.ndarray, hits: np.ndarray,
               fetched: np.ndarray) -> pd.DataFrame:
    """CURVE_COLUMNS rows, layer-major, plus the 'all' rows: hits and fetched are [layer, capacity]."""
    nl, nc = hits.shape
    rows = pd.DataFrame({
        "layer": np.repeat(layers, nc).astype(str), "policy": policy, "capacity": np.tile(caps, nl),
        "accesses": np.repeat(acc, nc), "hits": hits.ravel(),
        "bytes_fetched": np.rint(fetched.ravel()).astype(np.int64),
    })
    total = pd.DataFrame({"layer": "all", "policy": policy, "capacity": caps, "accesses": int(acc.sum()),
                          "hits": hits.sum(axis=0), "bytes_fetched": np.rint(fetched.sum(axis=0)).astype(np.int64)})
    out = pd.concat([rows, total], ignore_index=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["hit_rate"] = out["hits"] / out["accesses"]
    return out[CURVE_COLUMNS]


def smallest_capacity(curves: pd.DataFrame, targets: Iterable[float] = (0.9, 0.95, 0.99)) -> pd.DataFrame:
    """Per layer (and 'all'), the smallest capacity whose hit rate reaches each target (NA when none does:
    first uses are misses at any size)."""
    rows = []
    for (layer, policy), g in curves.groupby(["layer", "policy"], sort=False):  # one group per layer
        caps = g["capacity"].to_numpy()
        hr = g["hit_rate"].to_numpy()
        row: dict[str, Any] = {"layer": layer, "policy": policy,
                               "max_hit_rate": float(np.nanmax(hr)) if np.isfinite(hr).any() else np.nan}
        for t in targets:
            ok = np.flatnonzero(hr >= t)
            row[f"capacity_{round(t * 100)}"] = int(caps[ok[0]]) if ok.size else pd.NA
        rows.append(row)
    return pd.DataFrame(rows)


def working_set(fwd_hist: np.ndarray, fwd_bytes: np.ndarray, state: StackState, expert_bytes: np.ndarray,
                layers: np.ndarray, taus: Iterable[int] | None = None) -> pd.DataFrame:
    """W(tau): the mean over tokens t of the distinct experts (and their bytes) a layer used in tokens
    t-tau+1..t (windows truncated at the trace start). An access whose expert is next used g tokens later
    (or the trace ends g tokens later) lies in min(tau, g) of those windows, so
    W(tau) = sum_i min(tau, g_i) / T: exact from a histogram of forward gaps, all tau at once."""
    L = fwd_hist.shape[0]
    fh = fwd_hist.copy()
    fb = fwd_bytes.copy()
    # the last use of each expert stays in windows until the trace ends
    seen = state.last_row >= 0
    lay = np.repeat(np.arange(L), state.n_items).reshape(L, -1)[seen]
    g = np.minimum((state.rows[:, None] - state.last_row)[seen], GAP_CAP)
    np.add.at(fh, (lay, g), 1)
    np.add.at(fb, (lay, g), expert_bytes[seen])
    T = state.rows.astype(np.float64)
    if taus is None:
        tmax = int(min(GAP_CAP, max(1, T[layers].max() if len(layers) else 1)))
        taus = sorted(set([1 << i for i in range(int(tmax).bit_length())] + [tmax]))
    taus = np.asarray(sorted({int(t) for t in taus}), np.int64)
    if taus.size and (taus.min() < 1 or taus.max() > GAP_CAP):
        raise InputError(f"working-set windows must be 1..{GAP_CAP} tokens, got {taus.min()}..{taus.max()}")
    # sum_i min(tau, g_i) = sum_{x=1..tau} #{g_i >= x}
    ge = fh[:, ::-1].cumsum(axis=1)[:, ::-1]  # ge[:, x] = #{g >= x}
    gb = fb[:, ::-1].cumsum(axis=1)[:, ::-1]
    cnt = np.cumsum(ge[:, 1:], axis=1)  # cnt[:, tau-1]
    byt = np.cumsum(gb[:, 1:], axis=1)
    sel = layers
    with np.errstate(invalid="ignore", divide="ignore"):
        w = cnt[sel][:, taus - 1] / T[sel, None]
        wb = byt[sel][:, taus - 1] / T[sel, None]
    nl, nt = w.shape
    df = pd.DataFrame({"layer": np.repeat(sel, nt).astype(str), "tau": np.tile(taus, nl),
                       "experts": w.ravel(), "bytes": wb.ravel()})
    tot = pd.DataFrame({"layer": "all", "tau": taus, "experts": w.sum(axis=0), "bytes": wb.sum(axis=0)})
    return pd.concat([df, tot], ignore_index=True)


def layer_streams(layer: np.ndarray, experts: np.ndarray, n_layer: int,
                  dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Rows regrouped per layer and aligned by stream-local index: X [T, L, k] (-1 where a layer has no
    row t) and valid [T, L]; int32 halves the whole-trace arrays where ids fit."""
    k = experts.shape[1]
    order = np.argsort(layer.astype(np.int64), kind="stable")
    lay = layer[order].astype(np.int64)
    counts = np.bincount(lay, minlength=n_layer)
    start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    local = np.arange(len(lay)) - start[lay]
    T = int(counts.max()) if len(counts) else 0
    X: np.ndarray = np.full((T, n_layer, k), -1, dtype)
    X[local, lay] = experts[order]
    return X, X[:, :, 0] >= 0


def _next_use(X: np.ndarray, n_expert: int) -> np.ndarray:
    """For each (t, l, slot): the stream-local row of the next request of that expert (2**40 if none)."""
    T, L, k = X.shape
    flat = X.transpose(1, 0, 2).reshape(-1)  # layer-major, then time, then slot
    lay = np.repeat(np.arange(L), T * k)
    row = np.tile(np.repeat(np.arange(T), k), L)
    g = np.where(flat >= 0, lay * n_expert + flat, -1)
    srt = np.argsort(g, kind="stable")
    gs = g[srt]
    nxt = np.full(flat.shape, 1 << 40, np.int64)
    same = (gs[1:] == gs[:-1]) & (gs[1:] >= 0)
    nxt[srt[:-1][same]] = row[srt[1:][same]]
    return nxt.reshape(L, T, k).transpose(1, 0, 2)


_IN = np.int64(1) << np.int64(61)  # priority boost of the row's own experts
_OUT = -(np.int64(1) << np.int64(62))  # priority of experts that are neither resident nor requested


def simulate(layer: np.ndarray, experts: np.ndarray, n_layer: int, n_expert: int, policy: str,
             capacities: Iterable[int], expert_bytes: np.ndarray | None = None) -> pd.DataFrame:
    """LFU / OPT / LRU per-layer caches at the given capacities (CURVE_COLUMNS rows, layer 'all' too).

    One vectorised step per token row index: all layers and all capacities advance together (a
    partition per [capacity, layer] row keeps the C best by priority), so the Python loop runs once per
    token of the longest layer stream, not once per access. The whole trace must be in memory (OPT
    needs the future anyway)."""
    if policy not in ("lru", "lfu", "opt"):
        raise InputError(f"unknown cache policy {policy!r}; use lru, lfu or opt")
    check_ids(layer, experts, n_layer, n_expert)
    caps = np.asarray(sorted({int(c) for c in capacities}), np.int64)
    if caps.size == 0 or caps.min() < 1 or caps.max() > n_expert:
        raise InputError(f"capacities must be between 1 and {n_expert} experts per layer")
    L, M = n_layer, n_expert
    X, valid = layer_streams(layer, experts, L)
    T, _, k = X.shape
    eb = np.ones((L, M)) if expert_bytes is None else np.asarray(expert_bytes, np.float64)
    nxt = _next_use(X, M) if policy == "opt" else None
    S = len(caps)
    res = np.zeros((S, L, M), bool)
    hits = np.zeros((S, L), np.int64)
    fetched = np.zeros((S, L), np.float64)
    prio = np.zeros((L, M), np.int64)  # larger = keep
    if policy == "opt":
        prio[:] = -((np.int64(1) << 40) * M + np.arange(M))
    freq = np.zeros((L, M), np.int64)
    lrows = np.arange(L)[:, None]
    slot_rank = (k - 1 - np.arange(k))[None, :]
    for t in range(T):  # one step per token: vectorised over layers, slots and capacities
        sel = X[t]
        v = valid[t]
        sl = np.where(sel >= 0, sel, 0)
        hit = res[:, lrows, sl] & v[None, :, None]  # [S, L, k]
        hits += hit.sum(axis=2)
        fetched += ((~hit) * (eb[lrows, sl] * v[:, None])[None]).sum(axis=2)
        lk = t * k + slot_rank
        if policy == "lru":
            prio[lrows, sl] = np.where(v[:, None], lk, prio[lrows, sl])
        elif policy == "lfu":
            freq[lrows, sl] += v[:, None]
            prio[lrows, sl] = np.where(v[:, None], (freq[lrows, sl] << 31) + lk, prio[lrows, sl])
        else:
            assert nxt is not None  # computed above for policy 'opt'
            prio[lrows, sl] = np.where(v[:, None], -(nxt[t] * M + sl), prio[lrows, sl])
        req = np.zeros((L, M), bool)
        req[lrows, sl] = v[:, None]
        p = np.where(req, prio + _IN, prio)
        for s, c in enumerate(caps):  # a handful of capacities
            pe = np.where(res[s] | req, p, _OUT)
            if c < M:
                thr = -np.partition(-pe, c - 1, axis=1)[:, c - 1]
                keep = (pe >= thr[:, None]) & (pe > _OUT)
            else:
                keep = pe > _OUT
            res[s] = np.where(v[:, None], keep, res[s])
    layers = np.flatnonzero(valid.any(axis=0))
    acc = valid.sum(axis=0) * k
    return curve_rows(layers, policy, caps, acc[layers], hits[:, layers].T, fetched[:, layers].T)


@dataclass
class GlobalLRU:
    """One LRU cache over the experts of all layers with a byte budget, in one pass for many budgets.

    With byte sizes, LRU still keeps a prefix of the recency list: the longest one whose bytes fit. So an
    access hits at budget B exactly when the bytes of the distinct experts used since its last use plus
    its own bytes are <= B. Rows are requests in capture order (each row: k experts of one layer); experts
    may differ in size (each is weighed by its own bytes)."""

    n_layer: int
    n_expert: int
    k: int
    expert_bytes: np.ndarray  # [L, M]
    budgets: np.ndarray  # int64 [B]
    state: StackState = field(init=False)
    hits: np.ndarray = field(init=False)
    fetched: np.ndarray = field(init=False)
    accesses: int = 0
    total_bytes: float = 0.0

    def __post_init__(self) -> None:
        L, M = self.n_layer, self.n_expert
        self.item_bytes = np.asarray(self.expert_bytes, np.float64).reshape(L * M)
        self.state = StackState(1, L * M, self.k)
        self.budgets = np.asarray(sorted({int(b) for b in self.budgets}), np.int64)
        self.hits = np.zeros(len(self.budgets), np.int64)
        self.fetched = np.zeros(len(self.budgets), np.float64)

    def update(self, layer: np.ndarray, experts: np.ndarray) -> None:
        check_ids(layer, experts, self.n_layer, self.n_expert)
        rows = chunk_rows_for(self.n_layer * self.n_expert, self.k)
        for a in range(0, len(layer), rows):  # bounded memory: the bitsets span every layer's experts
            ids = experts[a:a + rows].astype(np.int64) + (layer[a:a + rows].astype(np.int64) * self.n_expert)[:, None]
            cd = chunk_distances(self.state, np.zeros(len(ids), np.int64), ids, item_bytes=self.item_bytes)
            own = self.item_bytes[cd.items.ravel()]
            assert cd.byte_distance is not None  # item_bytes was given
            need = cd.byte_distance.ravel() + own  # bytes that must fit for a hit
            hit = need[None, :] <= self.budgets[:, None]
            self.hits += hit.sum(axis=1)
            self.fetched += (~hit * own[None, :]).sum(axis=1)
            self.accesses += need.size
            self.total_bytes += float(own.sum())

    def frame(self) -> pd.DataFrame:
        with np.errstate(invalid="ignore", divide="ignore"):
            hr = self.hits / self.accesses
        return pd.DataFrame({"layer": "all", "policy": "lru", "capacity": self.budgets, "accesses": self.accesses,
                             "hits": self.hits, "hit_rate": hr,
                             "bytes_fetched": np.rint(self.fetched).astype(np.int64)})[CURVE_COLUMNS]
