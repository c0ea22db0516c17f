"""Static hot-expert pin lists, learned on one part of a trace and judged on the other (held-out) part.

A pin list keeps the same experts resident for the whole run (what llama.cpp forks and fitz-tec consume).
Whether that beats a dynamic cache depends on the workload, so the score compares, on the held-out requests
only: the pins' hit rate; LRU and OPT (Belady) with the same capacity, warmed on the training part (they run
over training then held-out requests; only held-out ones are scored); the expected hit rate of a uniform
pick of as many experts; and the best static list in hindsight (chosen on the held-out part itself: the
ceiling of any pin list, so its distance to the pins is what drift between the parts cost).

Pins per layer (capacity C): the C experts with the most training requests, ties by lower id (fitz-tec's
order). Global byte budget: experts of any layer by training requests per byte (then requests, layer,
id), as many as fit before the first one that does not.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import InputError
from .cache.cache import GlobalLRU, LayerLRU, layer_streams
from .cache.cachesim import as_accesses
from .cache.opt import opt_depths
from .stats import check_ids

SCORE_COLUMNS = ["layer", "pinned", "pinned_bytes", "train_accesses", "test_accesses", "pins_train_hit_rate",
                 "pins_hit_rate", "hindsight_hit_rate", "uniform_hit_rate", "lru_hit_rate", "opt_hit_rate",
                 "beats_lru"]


@dataclass
class Split:
    """Rows of the training part then of the held-out part (each in capture order)."""

    train_layer: np.ndarray
    train_experts: np.ndarray
    test_layer: np.ndarray
    test_experts: np.ndarray


def split_fraction(layer: np.ndarray, experts: np.ndarray, n_layer: int, fraction: float) -> Split:
    """The first `fraction` of each layer's rows (capture order) train, the rest is held out."""
    if not 0.0 < fraction < 1.0:
        raise InputError(f"--train-fraction {fraction}: give a number between 0 and 1 (e.g. 0.5)")
    layer = np.asarray(layer, np.int64)
    order = np.argsort(layer, kind="stable")
    counts = np.bincount(layer, minlength=n_layer)
    start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    local = np.empty(len(layer), np.int64)
    local[order] = np.arange(len(layer)) - start[layer[order]]
    train = local < np.floor(counts * fraction).astype(np.int64)[layer]
    return Split(layer[train], experts[train], layer[~train], experts[~train])


def counts_of(layer: np.ndarray, experts: np.ndarray, n_layer: int, n_expert: int) -> np.ndarray:
    """Requests per (layer, expert): [n_layer, n_expert]."""
    k = experts.shape[1] if experts.ndim == 2 else 1
    idx = np.repeat(np.asarray(layer, np.int64), k) * n_expert + np.asarray(experts, np.int64).reshape(-1)
    return np.bincount(idx, minlength=n_layer * n_expert).reshape(n_layer, n_expert)


def pick_per_layer(counts: np.ndarray, capacity: int) -> np.ndarray:
    """bool [L, M]: each layer's `capacity` most requested experts (ties: lower id); none in a layer with
    no training requests (a dense layer, or one the trace never reached: nothing to learn from)."""
    L, M = counts.shape
    if not 1 <= capacity <= M:
        raise InputError(f"--capacity {capacity}: give 1..{M} experts per layer")
    rank = np.lexsort((np.tile(np.arange(M), (L, 1)), -counts), axis=1)[:, :capacity]
    out = np.zeros((L, M), bool)
    out[np.arange(L)[:, None], rank] = True
    out[counts.sum(axis=1) == 0] = False
    return out


def pick_budget(counts: np.ndarray, expert_bytes: np.ndarray, budget: int) -> np.ndarray:
    """bool [L, M]: experts by requests per byte until the next one does not fit in `budget` bytes."""
    L, M = counts.shape
    c = counts.reshape(-1).astype(np.float64)
    b = np.asarray(expert_bytes, np.float64).reshape(-1)
    if (b <= 0).all():
        raise InputError("the model has no expert bytes for the trace's layers; check --model")
    ok = b > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.where(ok, c / np.where(ok, b, 1), -1.0)
    ids = np.arange(L * M)
    order = np.lexsort((ids, -c, -density))
    order = order[ok[order]]
    n = int(np.searchsorted(np.cumsum(b[order]), budget, side="right"))
    out = np.zeros(L * M, bool)
    out[order[:n]] = True
    return out.reshape(L, M)


def _per_layer(v: np.ndarray, layers: np.ndarray) -> np.ndarray:
    return np.concatenate((v[layers], [v[layers].sum()]))


def score_pins(split: Split, n_layer: int, n_expert: int, k: int, pins: np.ndarray,
               capacity: int | None = None, budget: int | None = None, expert_bytes: np.ndarray | None = None,
               order: str = "token") -> pd.DataFrame:
    """SCORE_COLUMNS per layer with requests, plus 'all'. LRU/OPT: per-layer caches of `capacity` experts,
    or (budget) one global LRU cache of `budget` bytes (OPT: none exact for byte sizes, left empty)."""
    L, M = n_layer, n_expert
    for lay, ex in ((split.train_layer, split.train_experts), (split.test_layer, split.test_experts)):
        check_ids(lay, ex, L, M)
    train = counts_of(split.train_layer, split.train_experts, L, M)
    test = counts_of(split.test_layer, split.test_experts, L, M)
    layers = np.flatnonzero((train.sum(axis=1) + test.sum(axis=1)) > 0)
    eb = np.ones((L, M)) if expert_bytes is None else np.asarray(expert_bytes, np.float64)
    hind = pick_per_layer(test, capacity) if capacity else pick_budget(test, eb, int(budget or 0))
    n_pin = pins.sum(axis=1)
    if capacity:
        uniform = test.sum(axis=1) * capacity / M
    else:  # as many experts as the pins, drawn uniformly from the layers with requests
        uniform = test.sum(axis=1) * n_pin.sum() / max(1, len(layers) * M)
    acc_tr, acc_te = train.sum(axis=1), test.sum(axis=1)
    lru, opt, lru_all = _dynamic(split, L, M, k, capacity, budget, expert_bytes, order)
    cols = {
        "pinned": _per_layer(n_pin, layers), "pinned_bytes": _per_layer((pins * eb).sum(axis=1), layers),
        "train_accesses": _per_layer(acc_tr, layers), "test_accesses": _per_layer(acc_te, layers),
        "pins_train": _per_layer((train * pins).sum(axis=1), layers),
        "pins": _per_layer((test * pins).sum(axis=1), layers),
        "hindsight": _per_layer((test * hind).sum(axis=1), layers), "uniform": _per_layer(uniform, layers),
        "lru": _per_layer(lru, layers), "opt": _per_layer(opt, layers),
    }
    cols["lru"][-1] = lru_all  # a global cache (budget): known for all layers together only
    with np.errstate(invalid="ignore", divide="ignore"):
        te = cols["test_accesses"].astype(np.float64)
        df = pd.DataFrame({
            "layer": [str(x) for x in layers] + ["all"], "pinned": cols["pinned"],
            "pinned_bytes": np.rint(cols["pinned_bytes"]).astype(np.int64),
            "train_accesses": cols["train_accesses"], "test_accesses": cols["test_accesses"],
            "pins_train_hit_rate": cols["pins_train"] / cols["train_accesses"],
            "pins_hit_rate": cols["pins"] / te, "hindsight_hit_rate": cols["hindsight"] / te,
            "uniform_hit_rate": cols["uniform"] / te, "lru_hit_rate": cols["lru"] / te,
            "opt_hit_rate": cols["opt"] / te,
        })
    df["beats_lru"] = pd.array([None if np.isnan(lr) or np.isnan(p) else bool(p > lr)
                                for p, lr in zip(df.pins_hit_rate, df.lru_hit_rate, strict=True)], dtype="boolean")
    if expert_bytes is None:
        df["pinned_bytes"] = pd.array([pd.NA] * len(df), dtype="Int64")
    return df[SCORE_COLUMNS]


def _dynamic(split: Split, L: int, M: int, k: int, capacity: int | None, budget: int | None,
             expert_bytes: np.ndarray | None, order: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Held-out hits per layer of LRU and OPT warmed on the training part (float [L]; NaN where unknown),
    and LRU's hits over all layers."""
    tl, te, hl, he = split.train_layer, split.train_experts, split.test_layer, split.test_experts
    if order == "access":
        (tl, te), (hl, he), k = as_accesses(tl, te), as_accesses(hl, he), 1
    if budget:
        g = GlobalLRU(L, M, k, np.asarray(expert_bytes, np.float64), np.array([budget]))
        g.update(tl, te)
        before = int(g.hits[0])
        g.update(hl, he)
        return np.full(L, np.nan), np.full(L, np.nan), float(g.hits[0] - before)
    assert capacity is not None
    acc = LayerLRU(L, M, k)
    acc.update(tl, te)
    before = acc.hist[:, :capacity].sum(axis=1)
    acc.update(hl, he)
    lru = (acc.hist[:, :capacity].sum(axis=1) - before).astype(np.float64)
    lay = np.concatenate((tl, hl))
    ex = np.concatenate((te, he))
    D, _ = opt_depths(lay, ex, L, M)
    n_train = np.bincount(np.asarray(tl, np.int64), minlength=L)
    _, valid = layer_streams(lay, ex, L)
    t = np.arange(D.shape[0])[:, None]
    held = valid & (t >= n_train[None, :])  # stream-local rows after the training part
    opt = ((D < capacity) & (D >= 0) & held[:, :, None]).sum(axis=(0, 2)).astype(np.float64)
    return lru, opt, float(lru.sum())
