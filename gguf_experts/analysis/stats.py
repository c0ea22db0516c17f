"""Expert activation statistics: counts and shares per (layer, expert), split by phase and sequence,
never-activated experts and imbalance measures. One bincount per chunk: memory is bounded by the count
matrices, not by the trace.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError

PHASE_NAMES = ("prefill", "decode")


def check_ids(layer: np.ndarray, experts: np.ndarray, n_layer: int, n_expert: int) -> None:
    """Ids outside the model cannot come from a capture of it: refuse rather than miscount."""
    if layer.size and (int(layer.min()) < 0 or int(layer.max()) >= n_layer):
        raise InputError(f"trace has layer {int(layer.min() if layer.min() < 0 else layer.max())} outside "
                         f"[0, {n_layer}); the trace is damaged or its header names another model")
    if experts.size and (int(experts.min()) < 0 or int(experts.max()) >= n_expert):
        raise InputError(f"trace has expert id {int(experts.min() if experts.min() < 0 else experts.max())} "
                         f"outside [0, {n_expert}); the trace is damaged or its header names another model")


def imbalance(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Imbalance of each row of a count matrix [rows, n]: max/mean, coefficient of variation, Gini and
    entropy normalised by log(n) (1 = perfectly even, 0 = one expert takes everything). NaN for empty rows."""
    c = np.atleast_2d(np.asarray(counts, np.float64))
    n = c.shape[1]
    if n == 0 or c.shape[0] == 0:
        nan = np.full(c.shape[0], np.nan)
        return {"max_mean": nan, "cv": nan.copy(), "gini": nan.copy(), "entropy": nan.copy()}
    total = c.sum(axis=1)
    mean = total / n
    with np.errstate(divide="ignore", invalid="ignore"):
        max_mean = c.max(axis=1) / mean
        cv = c.std(axis=1) / mean
        srt = np.sort(c, axis=1)
        i = np.arange(1, n + 1)
        gini = ((2 * i - n - 1) * srt).sum(axis=1) / (n * total)
        p = c / total[:, None]
        ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(axis=1)
        nent = ent / np.log(n) if n > 1 else np.full_like(ent, np.nan)
    empty = total == 0
    for a in (max_mean, cv, gini, nent):
        a[empty] = np.nan
    return {"max_mean": max_mean, "cv": cv, "gini": gini, "entropy": nent}


SEQ_COLUMNS = ["seq", "tokens_prefill", "tokens_decode", "activations", "experts_used", "experts_used_share",
               "gini_mean", "entropy_mean"]


@dataclass
class StatsAccumulator:
    """Counts updated chunk by chunk: activations per (phase, layer, expert), rows per (phase, layer), and
    per sequence its own counts until the sequence is complete (a later one has started, sequences coming
    in order as a capture writes them); then only its summary row is kept, so memory stays bounded by the
    open sequences, not by the dataset."""

    n_layer: int
    n_expert: int
    counts: np.ndarray = field(init=False)  # int64 [2, L, M]
    tokens: np.ndarray = field(init=False)  # int64 [2, L]
    seq_counts: dict[int, np.ndarray] = field(default_factory=dict)  # open seq -> int64 [L, M]
    seq_rows: dict[int, np.ndarray] = field(default_factory=dict)  # open seq -> int64 [2, L] rows
    seq_done: list[pd.DataFrame] = field(default_factory=list)  # summaries of complete sequences
    _last_seq: int | None = None
    _in_order: bool = True

    def __post_init__(self) -> None:
        self.counts = np.zeros((2, self.n_layer, self.n_expert), np.int64)
        self.tokens = np.zeros((2, self.n_layer), np.int64)

    def update(self, layer: np.ndarray, experts: np.ndarray, phase: np.ndarray, seq: np.ndarray) -> None:
        if layer.size == 0:
            return
        L, M = self.n_layer, self.n_expert
        check_ids(layer, experts, L, M)
        if int(phase.max()) > 1:
            raise InputError("trace has a phase other than 0 (prefill) / 1 (decode); the trace is damaged")
        base = (phase.astype(np.int64) * L + layer) * M
        self.counts += np.bincount((experts + base[:, None]).ravel(), minlength=2 * L * M).reshape(2, L, M)
        self.tokens += np.bincount(phase.astype(np.int64) * L + layer, minlength=2 * L).reshape(2, L)
        seq = np.asarray(seq, np.int64)
        if self._in_order and (np.any(np.diff(seq) < 0) or (self._last_seq is not None and seq[0] < self._last_seq)):
            self._in_order = False  # sequences interleave: keep every one open to the end
        useqs, sidx = np.unique(seq, return_inverse=True)
        key = (sidx[:, None] * (L * M) + layer[:, None].astype(np.int64) * M + experts).ravel()
        prow = np.bincount((sidx * 2 + phase) * L + layer, minlength=len(useqs) * 2 * L).reshape(len(useqs), 2, L)
        if len(useqs) * L * M <= 1 << 22:  # dense: one bincount
            per = np.bincount(key, minlength=len(useqs) * L * M).reshape(len(useqs), L * M)
            keys: np.ndarray | None = None
            cnts = bounds = np.empty(0, np.int64)
        else:  # many short sequences in one chunk: only the (sequence, layer, expert) triples that occur
            per = np.empty((0, 0), np.int64)
            keys, cnts = np.unique(key, return_counts=True)
            bounds = np.searchsorted(keys, np.arange(len(useqs) + 1) * (L * M))
        for j, s in enumerate(useqs.tolist()):  # one step per distinct sequence of the chunk
            if s not in self.seq_counts:
                self.seq_counts[s] = np.zeros((L, M), np.int64)
                self.seq_rows[s] = np.zeros((2, L), np.int64)
            if keys is None:
                self.seq_counts[s] += per[j].reshape(L, M)
            else:
                a, b = bounds[j], bounds[j + 1]
                self.seq_counts[s].reshape(-1)[keys[a:b] - j * L * M] += cnts[a:b]
            self.seq_rows[s] += prow[j]
        self._last_seq = int(seq[-1])
        if self._in_order:
            done = [q for q in self.seq_counts if q < self._last_seq]
            if done:
                self.seq_done.append(_seq_summary(done, self))
                for q in done:
                    del self.seq_counts[q], self.seq_rows[q]

    def layers_present(self) -> np.ndarray:
        """MoE layers that have rows in the trace (dense layers never appear); for counts loaded from a file
        that does not say tokens, the layers with activations."""
        return np.flatnonzero((self.tokens.sum(axis=0) > 0) | (self.counts.sum(axis=(0, 2)) > 0))


def _seq_summary(seqs: list[int], acc: StatsAccumulator) -> pd.DataFrame:
    """Summary rows of sequences: tokens (rows of its busiest layer), activations, distinct (layer, expert)
    pairs used (share of those of the layers it reached), Gini and entropy averaged over its layers."""
    if not seqs:
        return pd.DataFrame(columns=SEQ_COLUMNS)
    stack = np.stack([acc.seq_counts[s] for s in seqs])  # [S, L, M]
    rows = np.stack([acc.seq_rows[s] for s in seqs])  # [S, 2, L]
    S, L, M = stack.shape
    imb = imbalance(stack.reshape(S * L, M))
    has = stack.sum(axis=2) > 0
    used = (stack > 0).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        g = np.nanmean(np.where(has, imb["gini"].reshape(S, L), np.nan), axis=1) if L else np.full(S, np.nan)
        e = np.nanmean(np.where(has, imb["entropy"].reshape(S, L), np.nan), axis=1) if L else np.full(S, np.nan)
        share = used / (has.sum(axis=1) * M)
    return pd.DataFrame({"seq": seqs, "tokens_prefill": rows[:, 0].max(axis=1), "tokens_decode": rows[:, 1].max(axis=1),
                         "activations": stack.sum(axis=(1, 2)), "experts_used": used,
                         "experts_used_share": share, "gini_mean": g, "entropy_mean": e}, columns=SEQ_COLUMNS)


def expert_frame(acc: StatsAccumulator, expert_bytes: np.ndarray | None = None) -> pd.DataFrame:
    """One row per (layer, expert) of every layer in the trace, sorted by activations descending within a
    layer: activations, share of the layer's activations, prefill/decode counts, rank and cumulative share."""
    layers = acc.layers_present()
    M = acc.n_expert
    tot = acc.counts.sum(axis=0)[layers]  # [l, M]
    order = np.argsort(-tot, axis=1, kind="stable")
    sorted_c = np.take_along_axis(tot, order, axis=1)
    layer_tot = tot.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(layer_tot > 0, sorted_c / layer_tot, 0.0)
    lay = np.repeat(layers, M)
    exp = order.ravel()
    df = pd.DataFrame({
        "layer": lay, "expert": exp, "activations": sorted_c.ravel(), "share": share.ravel(),
        "prefill": acc.counts[0][lay, exp], "decode": acc.counts[1][lay, exp],
        "rank": np.tile(np.arange(1, M + 1), len(layers)), "cum_share": np.cumsum(share, axis=1).ravel(),
    })
    if expert_bytes is not None:
        b = np.rint(expert_bytes[lay, exp]).astype(np.int64)
        df["bytes"] = b
        df["bytes_read"] = b * df["activations"].to_numpy()
    return df


def layer_frame(acc: StatsAccumulator) -> pd.DataFrame:
    """Per layer: tokens (prefill/decode), activations, never-activated experts, the share of activations
    the top 10% of experts take, and the imbalance measures, overall and per phase."""
    layers = acc.layers_present()
    tot = acc.counts.sum(axis=0)[layers]
    M = acc.n_expert
    top_n = max(1, int(np.ceil(M * 0.1)))
    srt = -np.sort(-tot, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        top_share = srt[:, :top_n].sum(axis=1) / tot.sum(axis=1)
    df = pd.DataFrame({
        "layer": layers, "tokens": acc.tokens.sum(axis=0)[layers], "tokens_prefill": acc.tokens[0][layers],
        "tokens_decode": acc.tokens[1][layers], "activations": tot.sum(axis=1),
        "never_activated": (tot == 0).sum(axis=1), "top10pct_share": top_share,
    })
    for name, v in imbalance(tot).items():
        df[name] = v
    for p, pname in enumerate(PHASE_NAMES):
        for name, v in imbalance(acc.counts[p][layers]).items():
            df[f"{name}_{pname}"] = v
    return df


def sequence_frame(acc: StatsAccumulator) -> pd.DataFrame:
    """Per sequence (prompt): tokens, activations, distinct (layer, expert) pairs used, and imbalance
    averaged over layers (complete sequences' summaries plus the open ones)."""
    parts = [p for p in acc.seq_done + [_seq_summary(sorted(acc.seq_counts), acc)] if len(p)]
    if not parts:
        return pd.DataFrame(columns=SEQ_COLUMNS)
    return pd.concat(parts, ignore_index=True).sort_values("seq", kind="stable", ignore_index=True)


def stats_document(acc: StatsAccumulator, k: int, expert_bytes: np.ndarray | None = None) -> dict[str, Any]:
    """JSON: per-layer arrays indexed by expert id (activation_counts, activation_frequency, ...)."""
    layers = acc.layers_present()
    lf = layer_frame(acc)
    out_layers = []
    for j, l in enumerate(layers.tolist()):  # one entry per MoE layer (tens), arrays inside are numpy
        c = acc.counts[:, l].sum(axis=0)
        toks = int(acc.tokens[:, l].sum())
        row = lf.iloc[j]
        entry: dict[str, Any] = {
            "layer": l, "tokens": toks, "tokens_prefill": int(acc.tokens[0, l]), "tokens_decode": int(acc.tokens[1, l]),
            "activation_counts": c, "activation_frequency": c / toks if toks else np.zeros(len(c)),
            "prefill_counts": acc.counts[0, l], "decode_counts": acc.counts[1, l],
            "never_activated": np.flatnonzero(c == 0),
            "experts_by_activations": np.argsort(-c, kind="stable"),
            "imbalance": {n: _num(row[n]) for n in ("max_mean", "cv", "gini", "entropy")},
            "top10pct_share": _num(row["top10pct_share"]),
        }
        if expert_bytes is not None:
            entry["expert_bytes"] = expert_bytes[l]
            entry["bytes_read"] = int((expert_bytes[l] * c).sum())
        out_layers.append(entry)
    allc = acc.counts.sum(axis=0)[layers].reshape(1, -1)
    overall: dict[str, Any] = {n: _num(v[0]) for n, v in imbalance(allc).items()}
    overall.update({"layers": len(layers), "activations": int(allc.sum()),
                    "never_activated": int((allc == 0).sum()),
                    "tokens": int(acc.tokens.sum(axis=0).max()) if len(layers) else 0})
    return {"n_layer": acc.n_layer, "n_expert": acc.n_expert, "n_expert_used": k, "overall": overall,
            "layers": out_layers,
            "sequences": [{c: _num(v) if isinstance(v, float) else v for c, v in r.items()}
                          for r in sequence_frame(acc).to_dict(orient="records")]}


def _num(v: Any) -> float | None:
    """JSON has no NaN: an undefined measure (an empty layer) is null."""
    f = float(v)
    return None if np.isnan(f) else f
