"""LFUDA and S3-FIFO expert caches: per-layer simulations at chosen capacities (neither is a stack
policy, so there is no one-pass curve), under cache.py's row convention.

LFUDA (LFU with dynamic aging, Arlitt et al. 2000): each resident expert has a key K = L + F, F its requests
since it entered the cache, L the cache's age (the key of the last expert evicted). Low keys leave first,
ties by least recent use. Rows (the k experts of a token at one layer) follow the convention: an expert
resident at the row's start is a hit; F grows by one for each row expert (1 for a fetched one); the cache
keeps the row's experts plus the best C - k others by (K, recency); L becomes the largest key evicted; the
row's keys are then L + F. With C < k the row's best C by (key, recency) stay. With rows of one expert this
is textbook per-access LFUDA.

S3-FIFO (Yang et al., SOSP 2023), libCacheSim's defaults: a small FIFO of 10% of the slots (at least one),
a main FIFO of the rest, a ghost FIFO of as many entries as main; 2-bit counters capped at 3. A missed expert
enters main if it is in the ghost, else small. To free a slot: when small holds its share (or main holds
nothing evictable), its tail moves to main if it was requested while in small (counter cleared), else
leaves into the ghost; otherwise main's tail is reinserted with its counter minus one while the counter is
positive, else evicted. A row's experts are requested in top-k order; a hit is an expert resident at the
row's start, and the row's experts are in use until the row ends: eviction passes over them (from small
they move to main, in main they are reinserted). Only when the cache is smaller than the row does it drop
the oldest of them. A queue policy does not vectorise across steps; it is a plain per-request simulation.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import pandas as pd

from ...errors import InputError
from .cache import curve_rows, layer_streams
from ..stats import check_ids

_NONE = np.int64(-1) << np.int64(62)  # priority of slots that are not candidates


def _capacities(capacities: Iterable[int], n_expert: int) -> np.ndarray:
    caps = np.asarray(sorted({int(c) for c in capacities}), np.int64)
    if caps.size == 0 or caps.min() < 1 or caps.max() > n_expert:
        raise InputError(f"capacities must be between 1 and {n_expert} experts per layer")
    return caps


def _best(prio: np.ndarray, n: int) -> np.ndarray:
    """Per row of prio [R, M], the n entries of highest priority (entries at _NONE never): bool [R, M].
    Priorities are distinct among candidates (recency breaks ties), so a threshold selects exactly n."""
    R, M = prio.shape
    if n <= 0:
        return np.zeros((R, M), bool)
    if n >= M:
        return prio > _NONE
    thr = -np.partition(-prio, n - 1, axis=1)[:, n - 1]
    return (prio >= thr[:, None]) & (prio > _NONE)


def simulate_lfuda(layer: np.ndarray, experts: np.ndarray, n_layer: int, n_expert: int,
                   capacities: Iterable[int], expert_bytes: np.ndarray | None = None) -> pd.DataFrame:
    """LFUDA per-layer caches at the given capacities (cache.CURVE_COLUMNS rows, policy 'lfuda').

    One vectorised step per token row index over layers; a capacity's state (resident set, in-cache
    counts, keys, age) is its own, so capacities advance in a short loop."""
    check_ids(layer, experts, n_layer, n_expert)
    caps = _capacities(capacities, n_expert)
    L, M = n_layer, n_expert
    X, valid = layer_streams(layer, experts, L)
    T, _, k = X.shape
    eb = np.ones((L, M)) if expert_bytes is None else np.asarray(expert_bytes, np.float64)
    W = np.int64(T * k + 1)  # recency keys are < W; priority = key * W + recency
    if (T * k + 2) * W >= 1 << 62:
        raise InputError(f"LFUDA supports up to ~2**30 requests per layer; the trace has {T * k}")
    S = len(caps)
    res = np.zeros((S, L, M), bool)
    freq = np.zeros((S, L, M), np.int64)
    key = np.zeros((S, L, M), np.int64)
    age = np.zeros((S, L), np.int64)
    last = np.zeros((L, M), np.int64)
    hits = np.zeros((S, L), np.int64)
    fetched = np.zeros((S, L), np.float64)
    lr = np.arange(L)[:, None]
    slot_rank = (k - 1 - np.arange(k))[None, :]
    for t in range(T):
        v = valid[t]
        if not v.any():
            continue
        sl = np.where(X[t] >= 0, X[t], 0)
        vl = lr[v, 0]
        rows: slice | np.ndarray = slice(None) if len(vl) == L else vl
        sv = sl[v]
        lv = vl[:, None]
        was = res[:, lv, sv]  # [S, V, k]
        hits[:, v] += was.sum(axis=2)
        fetched[:, v] += ((~was) * eb[lv, sv][None]).sum(axis=2)
        last[lv, sv] = t * k + slot_rank
        req = np.zeros((len(vl), M), bool)
        req[np.arange(len(vl))[:, None], sv] = True
        for s, c in enumerate(caps):
            r_s, f_s, k_s = res[s, rows], freq[s, rows], key[s, rows]  # views when every layer has a row
            f_s[req] = np.where(r_s[req], f_s[req] + 1, 1)
            others = r_s & ~req
            pr = np.where(others, k_s * W + last[rows], _NONE)
            keep = _best(pr, max(int(c) - k, 0))
            gone = others & ~keep
            a = np.maximum(age[s, rows], np.where(gone, k_s, 0).max(axis=1))
            k_s[req] = (a[:, None] + f_s)[req]
            new = keep | req
            if c < k:  # the row's best c by (key, recency) stay
                pr = np.where(req, k_s * W + last[rows], _NONE)
                mine = _best(pr, int(c))
                drop = req & ~mine
                a = np.maximum(a, np.where(drop, k_s, 0).max(axis=1))
                gone |= drop
                new = keep | mine
            f_s[gone] = 0
            res[s, rows], freq[s, rows], key[s, rows], age[s, rows] = new, f_s, k_s, a
    layers = np.flatnonzero(valid.any(axis=0))
    acc = valid.sum(axis=0) * k
    return curve_rows(layers, "lfuda", caps, acc[layers], hits[:, layers].T, fetched[:, layers].T)


class S3FIFO:
    """One S3-FIFO cache of `capacity` experts (see the module docstring for the rules)."""

    def __init__(self, capacity: int, n_expert: int) -> None:
        self.capacity = capacity
        self.small_cap = max(1, -(-capacity // 10))  # 10% of the slots, at least one
        self.ghost_cap = max(1, capacity - self.small_cap)  # as many ghost entries as main slots
        self.small: OrderedDict[int, None] = OrderedDict()  # first item = tail (oldest)
        self.main: OrderedDict[int, None] = OrderedDict()
        self.ghost: OrderedDict[int, None] = OrderedDict()
        self.freq = [0] * n_expert
        self.where = [0] * n_expert  # 0 absent, 1 small, 2 main

    def row(self, row: list[int]) -> list[bool]:
        """Request a row's experts in top-k order; returns which were resident at the row's start."""
        where, freq = self.where, self.freq
        was = [where[e] != 0 for e in row]
        pinned = set(row)
        for e in row:
            if where[e]:
                freq[e] = min(freq[e] + 1, 3)
                continue
            while len(self.small) + len(self.main) >= self.capacity:
                self._evict(pinned)
            if e in self.ghost:
                del self.ghost[e]
                self.main[e] = None
                where[e] = 2
            else:
                self.small[e] = None
                where[e] = 1
            freq[e] = 0
        return was

    def _evict(self, pinned: set[int]) -> None:
        main_free = len(self.main) > sum(1 for e in pinned if self.where[e] == 2)
        if self.small and (len(self.small) >= self.small_cap or not main_free):
            if self._evict_small(pinned):
                return
            main_free = len(self.main) > sum(1 for e in pinned if self.where[e] == 2)
        if main_free:
            self._evict_main(pinned)
            return
        # every resident expert belongs to the row (capacity < k): the oldest leaves
        q = self.main if self.main else self.small
        e = next(iter(q))
        del q[e]
        self.where[e] = 0

    def _evict_small(self, pinned: set[int]) -> bool:
        while self.small:
            e = next(iter(self.small))
            del self.small[e]
            if e in pinned or self.freq[e] >= 1:  # requested while in small (or in use now): to main
                self.freq[e] = 0
                self.main[e] = None
                self.where[e] = 2
                continue
            self.where[e] = 0
            self.ghost[e] = None
            if len(self.ghost) > self.ghost_cap:
                self.ghost.popitem(last=False)
            return True
        return False

    def _evict_main(self, pinned: set[int]) -> None:
        while True:  # ends: an evictable expert exists and every pass lowers its counter
            e = next(iter(self.main))
            if e in pinned:
                self.main.move_to_end(e)
            elif self.freq[e] >= 1:
                self.freq[e] -= 1
                self.main.move_to_end(e)
            else:
                del self.main[e]
                self.where[e] = 0
                return


def simulate_s3fifo(layer: np.ndarray, experts: np.ndarray, n_layer: int, n_expert: int,
                    capacities: Iterable[int], expert_bytes: np.ndarray | None = None) -> pd.DataFrame:
    """S3-FIFO per-layer caches at the given capacities (cache.CURVE_COLUMNS rows, policy 's3fifo')."""
    check_ids(layer, experts, n_layer, n_expert)
    caps = _capacities(capacities, n_expert)
    L, M = n_layer, n_expert
    lay = np.asarray(layer, np.int64)
    ex = np.asarray(experts, np.int64)
    k = ex.shape[1] if ex.ndim == 2 else 0
    eb = np.ones((L, M)) if expert_bytes is None else np.asarray(expert_bytes, np.float64)
    layers = np.unique(lay)
    hits = np.zeros((len(layers), len(caps)), np.int64)
    fetched = np.zeros((len(layers), len(caps)), np.float64)
    acc = np.zeros(len(layers), np.int64)
    for i, li in enumerate(layers.tolist()):
        rows = ex[lay == li].tolist()
        acc[i] = len(rows) * k
        for j, c in enumerate(caps.tolist()):
            cache = S3FIFO(c, M)
            miss = np.zeros(M, np.int64)
            h = 0
            for row in rows:
                for e, was in zip(row, cache.row(row), strict=True):
                    if was:
                        h += 1
                    else:
                        miss[e] += 1
            hits[i, j] = h
            fetched[i, j] = float(miss @ eb[li])
    return curve_rows(layers, "s3fifo", caps, acc, hits, fetched)
