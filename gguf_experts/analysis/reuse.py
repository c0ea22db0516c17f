"""Expert reuse between tokens: overlap of consecutive decode tokens, reuse gaps (tokens since the expert
was last used) and the co-activation matrix. Built on the per-chunk output of the LRU pass (lru.py), so a
trace is read once for stats, curves and reuse together.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .cache.lru import COLD, ChunkDistances, row_bits, words_for

# gap buckets: 1..16 exactly, then powers of two; bucket b holds gaps in [lo[b], hi[b]]
_EXACT = 16
_POW = 40


def gap_buckets() -> tuple[np.ndarray, np.ndarray]:
    lo = np.concatenate((np.arange(1, _EXACT + 1), 1 + (1 << np.arange(4, _POW))))
    hi = np.concatenate((np.arange(1, _EXACT + 1), 1 << np.arange(5, _POW + 1)))
    return lo.astype(np.int64), hi.astype(np.int64)


def gap_bucket(g: np.ndarray) -> np.ndarray:
    """Bucket index of gaps >= 1."""
    big = np.frexp(np.maximum(g - 1, 1))[1].astype(np.int64)  # g-1 in [2**(e-1), 2**e) -> e
    return np.where(g <= _EXACT, g - 1, _EXACT + big - 5)


@dataclass
class ReuseAccumulator:
    """Overlap |E_t & E_t-1| / k of consecutive decode rows of a layer within a sequence, histograms of
    reuse gaps per layer, and optionally pair counts (co-activation) per layer."""

    n_layer: int
    n_expert: int
    k: int
    coactivation: bool = False
    overlap_sum: np.ndarray = field(init=False)  # [L] sum of |E_t & E_t-1|
    overlap_pairs: np.ndarray = field(init=False)  # [L] consecutive decode pairs
    gap_hist: np.ndarray = field(init=False)  # [L, buckets]
    first_uses: np.ndarray = field(init=False)  # [L]
    pairs: np.ndarray | None = None  # [L, M, M] int64 when coactivation
    _last_bits: np.ndarray = field(init=False)  # [L, W] experts of the layer's previous row
    _last_seq: np.ndarray = field(init=False)
    _last_phase: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        L, M = self.n_layer, self.n_expert
        self.overlap_sum = np.zeros(L, np.int64)
        self.overlap_pairs = np.zeros(L, np.int64)
        self.gap_hist = np.zeros((L, len(gap_buckets()[0])), np.int64)
        self.first_uses = np.zeros(L, np.int64)
        if self.coactivation:
            self.pairs = np.zeros((L, M, M), np.int64)
        self._last_bits = np.zeros((L, words_for(M)), np.uint64)
        self._last_seq = np.full(L, -1, np.int64)
        self._last_phase = np.full(L, -1, np.int64)

    def update(self, cd: ChunkDistances, seq: np.ndarray, phase: np.ndarray) -> None:
        """Add one chunk, given the LRU pass's output for it and the chunk's seq/phase in row order."""
        L, M, k = self.n_layer, self.n_expert, self.k
        r = len(cd.order)
        if r == 0:
            return
        lay = cd.stream
        sq = seq[cd.order].astype(np.int64)
        ph = phase[cd.order].astype(np.int64)
        bits = np.bitwise_or.reduce(row_bits(cd.items, words_for(M)), axis=1)  # [R, W]
        # previous row of the same layer: the row above (rows are grouped by layer), or the carried one
        first = np.ones(r, bool)
        first[1:] = lay[1:] != lay[:-1]
        pbits = np.empty_like(bits)
        pbits[1:] = bits[:-1]
        pbits[first] = self._last_bits[lay[first]]
        pseq = np.concatenate(([0], sq[:-1]))
        pseq[first] = self._last_seq[lay[first]]
        pph = np.concatenate(([0], ph[:-1]))
        pph[first] = self._last_phase[lay[first]]
        ok = (ph == 1) & (pph == 1) & (pseq == sq)
        shared = np.bitwise_count(bits & pbits).sum(axis=1, dtype=np.int64)
        self.overlap_sum += np.bincount(lay[ok], weights=shared[ok], minlength=L).astype(np.int64)
        self.overlap_pairs += np.bincount(lay[ok], minlength=L)
        last = np.ones(r, bool)
        last[:-1] = lay[1:] != lay[:-1]
        self._last_bits[lay[last]] = bits[last]
        self._last_seq[lay[last]] = sq[last]
        self._last_phase[lay[last]] = ph[last]
        g = cd.gap.ravel()
        la = np.repeat(lay, k)
        cold = g == COLD
        self.first_uses += np.bincount(la[cold], minlength=L)
        nb = self.gap_hist.shape[1]
        self.gap_hist += np.bincount(la[~cold] * nb + gap_bucket(g[~cold]), minlength=L * nb).reshape(L, nb)
        if self.pairs is not None:
            a = np.repeat(cd.items, k, axis=1)  # [R, k*k]: (slot i, slot j) pairs
            b = np.tile(cd.items, (1, k))
            off = (lay * M * M)[:, None]
            keep = a != b
            self.pairs += np.bincount((off + a * M + b)[keep], minlength=L * M * M).reshape(L, M, M)

    def layers(self) -> np.ndarray:
        return np.flatnonzero((self.gap_hist.sum(axis=1) + self.first_uses) > 0)

    def layer_frame(self) -> pd.DataFrame:
        """Per layer: decode pairs, mean overlap, reuse-gap quantiles and the share reused within 1/8/64
        tokens (first uses excluded from shares)."""
        ls = self.layers()
        _, hi = gap_buckets()
        gh = self.gap_hist[ls]
        reuses = gh.sum(axis=1)
        cum = np.cumsum(gh, axis=1)

        def within(n: int) -> np.ndarray:
            b = int(gap_bucket(np.array([n]))[0])
            with np.errstate(invalid="ignore", divide="ignore"):
                return cum[:, b] / reuses

        def quant(q: float) -> np.ndarray:
            idx = (cum >= np.ceil(q * reuses)[:, None]).argmax(axis=1)
            return np.where(reuses > 0, hi[idx], 0)

        with np.errstate(invalid="ignore", divide="ignore"):
            mo = self.overlap_sum[ls] / (self.overlap_pairs[ls] * self.k)
        return pd.DataFrame({
            "layer": ls, "decode_pairs": self.overlap_pairs[ls], "mean_overlap": mo,
            "reuses": reuses, "first_uses": self.first_uses[ls],
            "gap_median_le": quant(0.5), "gap_p90_le": quant(0.9),
            "reused_within_1": within(1), "reused_within_8": within(8), "reused_within_64": within(64),
        })

    def gap_frame(self) -> pd.DataFrame:
        """The reuse-gap distribution: per layer and bucket [gap_lo, gap_hi] tokens, count and share."""
        ls = self.layers()
        lo, hi = gap_buckets()
        gh = self.gap_hist[ls]
        last = int(np.flatnonzero(gh.sum(axis=0))[-1]) + 1 if gh.sum() else 0
        gh = gh[:, :last]
        nb = gh.shape[1]
        with np.errstate(invalid="ignore", divide="ignore"):
            share = gh / gh.sum(axis=1, keepdims=True)
        return pd.DataFrame({"layer": np.repeat(ls, nb), "gap_lo": np.tile(lo[:nb], len(ls)),
                             "gap_hi": np.tile(hi[:nb], len(ls)), "count": gh.ravel(), "share": share.ravel()})

    def coactivation_frame(self, counts: np.ndarray | None = None, tokens: np.ndarray | None = None
                           ) -> pd.DataFrame:
        """Nonzero pairs a < b per layer: tokens where both fired, and lift = observed / expected under
        independence (needs per-expert counts [L, M] and tokens [L])."""
        if self.pairs is None:
            return pd.DataFrame(columns=["layer", "expert_a", "expert_b", "count", "lift"])
        M = self.n_expert
        iu = np.triu_indices(M, 1)
        p = self.pairs[:, iu[0], iu[1]]  # [L, pairs]
        l_idx, j = np.nonzero(p)
        a, b = iu[0][j], iu[1][j]
        c = p[l_idx, j]
        df = pd.DataFrame({"layer": l_idx, "expert_a": a, "expert_b": b, "count": c})
        if counts is not None and tokens is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                df["lift"] = c * tokens[l_idx] / (counts[l_idx, a] * counts[l_idx, b])
        return df
