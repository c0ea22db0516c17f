"""Belady's OPT miss-ratio curves for every capacity 1..n_expert in one pass per layer (Mattson's priority
stack), equal at every capacity to cache.simulate(policy="opt") under cache.py's convention.

Why one stack serves every capacity. The convention: the k distinct experts R of a row (token x layer) are
requested together; an expert resident when the row starts is a hit; then the cache of capacity C keeps
  C >= k: R plus the best C - k of its other residents,   C < k: the best C of R,
"best" by one priority shared by every capacity: soonest next use (after this row), then lower id. Suppose
cache_C = the top C of a stack S for every C (true at the start: experts never requested yet sit below all
others, with key _UNSEEN, and never count as resident: their requests miss at every capacity).
Let A_C = S[:C] minus R and B_C = the best C - k of A_C. A_(C+1) is A_C or A_C plus one expert, so B_(C+1)
is B_C plus one expert (the best m + 1 of a set with one more element contain its best m). Hence the new
caches are again the prefixes of one stack: R sorted by priority, then the experts B_(C+1) - B_C in turn
(inclusion property), and the hits of capacity C are the requests whose depth in S at the row start is < C
(first uses: none).

How the row's update is computed. Mattson's update for ONE request of x at depth d moves x to the top and
sends positions 0..d-1 down through a carry: at each position the expert with the sooner next use stays and
the other is carried on. The carry is the worst (largest key) of positions 0..i, so with x's slot set to +inf
new[i] = min(key[i], cummax(key[:i])): one np.maximum.accumulate, no loop over positions. A row applies it
k times, its experts worst first, each given its new key minus a boost while the row lasts (the boost keeps
already-placed row experts above everything; the row's not-yet-placed experts have next use = this row, so
they already rank above every other expert). Induction on the steps gives exactly the caches above for every
C >= k (R plus the best C - k others) and C < k (the C last placed = the best C of R); the boost is removed
after the row. Keys are next_use * M + id (unique; the id is the tie-break), so the stack holds keys only.
Cost: k vectorised steps per token over [layers, width] arrays, width = the deepest request of the step.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from ...errors import InputError
from .cache import curve_frame, layer_streams
from ..stats import check_ids

MAX_TOKENS = 1 << 31  # tokens per layer (int32 rows); an expert not requested again has next use T
_UNSEEN = 1 << 41  # key time of experts never requested yet: below everything, never resident
_BOOST = 1 << 42  # subtracted (in time units) from the keys of a row's placed experts during the row
_INF = np.int64(1) << np.int64(62)
MAX_EXPERTS = 1 << 19  # keys (time x M + id) stay far below 2**62


def _check_distinct(layer: np.ndarray, experts: np.ndarray) -> None:
    """A row listing an expert twice has no OPT stack update (one expert, two slots): refuse it."""
    if experts.shape[1] < 2:
        return
    s = np.sort(experts, axis=1)
    dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
    if dup.any():
        r = int(np.flatnonzero(dup)[0])
        raise InputError(f"row {r} of layer {int(layer[r])} lists an expert twice; top-k selections are "
                         "distinct, so the trace is damaged")


def _next_rows(X: np.ndarray) -> np.ndarray:
    """For each (t, l, slot): the stream-local row of that expert's next request, T if none (every such
    expert ties, broken by id, as with any bound beyond the trace). One stable sort per layer."""
    T, L, k = X.shape
    nxt = np.full((T, L, k), T, np.int32)
    row = np.repeat(np.arange(T, dtype=np.int32), k)
    for l in range(L):  # per layer: memory of one layer's requests, not the trace's
        g = X[:, l, :].reshape(-1)
        srt = np.argsort(g, kind="stable")
        gs = g[srt]
        same = (gs[1:] == gs[:-1]) & (gs[1:] >= 0)
        out = np.full(T * k, T, np.int32)
        out[srt[:-1][same]] = row[srt[1:][same]]
        nxt[:, l, :] = out.reshape(T, k)
    return nxt


def opt_depths(layer: np.ndarray, experts: np.ndarray, n_layer: int, n_expert: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """OPT stack depth of every request at its row's start (n_expert for a first use) as D [T, L, k]
    (-1 where a layer has no row t), and the requested experts X [T, L, k] (-1 there too), rows
    regrouped per layer by stream-local index. A request hits at capacity C exactly when its depth < C."""
    layer = np.asarray(layer)
    experts = np.asarray(experts)
    check_ids(layer, experts, n_layer, n_expert)
    _check_distinct(layer, experts)
    L, M = n_layer, n_expert
    if M >= MAX_EXPERTS:
        raise InputError(f"OPT curves support up to {MAX_EXPERTS - 1} experts per layer, the trace has {M}")
    X, valid = layer_streams(layer, experts, L, np.int32)
    T, _, k = X.shape
    if T >= MAX_TOKENS:
        raise InputError(f"OPT curves support fewer than {MAX_TOKENS} tokens per layer, the trace has {T}")
    nxt = _next_rows(X)
    D = np.full((T, L, k), -1, np.int32)
    if T == 0:
        return D, X
    ids = np.arange(M, dtype=np.int64)
    stack = np.tile(np.int64(_UNSEEN) * M + ids, (L, 1))  # keys by stack position (0 = top) [L, M]
    key = stack.copy()  # current key of each expert [L, M]
    buf = np.empty_like(stack)  # running maxima
    lr = np.arange(L)
    lr1 = lr[:, None]
    boost = np.int64(_BOOST) * M
    unseen = np.int64(_UNSEEN) * M
    for t in range(T):  # one step per token (x slot below), vectorised over layers and stack positions
        v = valid[t]
        vc = v[:, None]
        sel = np.where(vc, X[t], 0).astype(np.int64)
        ck = key[lr1, sel]  # [L, k]
        depth = np.argmax(stack[:, None, :] == ck[:, :, None], axis=2)
        D[t] = np.where(vc, np.where(ck >= unseen, M, depth), -1)
        newk = nxt[t].astype(np.int64) * M + sel - boost
        order = np.argsort(-newk, axis=1)  # worst first: the best ends on top
        top = stack[:, :1]  # a layer without a row "requests" its top expert: a no-op
        olds = np.where(vc, np.take_along_axis(ck, order, 1), top).T[:, :, None].copy()  # [k, L, 1]
        news = np.where(vc, np.take_along_axis(newk, order, 1), top).T.copy()  # [k, L]
        for j in range(k):
            pos = (stack == olds[j]).argmax(axis=1)
            w = int(pos.max()) + 1
            stack[lr, pos] = _INF  # the requested expert leaves: the carry lands in its place
            if w > 1:
                cm = np.maximum.accumulate(stack[:, :w - 1], axis=1, out=buf[:, :w - 1])
                np.minimum(stack[:, 1:w], cm, out=stack[:, 1:w])
            stack[:, 0] = news[j]
        stack[v, :k] += boost
        key[lr1[v], sel[v]] = newk[v] + boost
    return D, X


def opt_histograms(layer: np.ndarray, experts: np.ndarray, n_layer: int, n_expert: int,
                   expert_bytes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hist [L, M + 1] of requests by OPT depth (M: first use), the same weighed by expert bytes, the
    layers with rows): the form cache.curve_frame turns into hit counts of every capacity."""
    L, M = n_layer, n_expert
    D, X = opt_depths(layer, experts, L, M)
    eb = np.ones((L, M)) if expert_bytes is None else np.asarray(expert_bytes, np.float64)
    hist = np.zeros((L, M + 1), np.int64)
    byte_hist = np.zeros((L, M + 1), np.float64)
    ok = D[:, :, 0] >= 0
    layers = np.flatnonzero(ok.any(axis=0))
    for l in layers:  # per layer: bounded temporaries
        d, x = D[ok[:, l], l].reshape(-1), X[ok[:, l], l].reshape(-1)
        hist[l] = np.bincount(d, minlength=M + 1)
        byte_hist[l] = np.bincount(d, weights=eb[l, x], minlength=M + 1)
    return hist, byte_hist, layers

def opt_curves(layer: np.ndarray, experts: np.ndarray, n_layer: int, n_expert: int,
               capacities: Iterable[int] | None = None, expert_bytes: np.ndarray | None = None) -> pd.DataFrame:
    """OPT rows (cache.CURVE_COLUMNS, policy 'opt') per layer at every capacity 1..n_expert (or the given
    ones), plus layer 'all'. The whole trace must be in memory: OPT needs the future."""
    hist, byte_hist, layers = opt_histograms(layer, experts, n_layer, n_expert, expert_bytes)
    return curve_frame(hist, byte_hist, "opt", capacities, layers)
