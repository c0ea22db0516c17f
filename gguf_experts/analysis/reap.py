"""REAP saliency (Router-weighted Expert Activation Pruning, arXiv 2510.13999) from routing, gate weights and
the norms of each selected expert's output, per layer and expert.

For expert j of a layer, over the tokens routed to it (X_j): reap_j = mean_{x in X_j} g_j(x) * ||f_j(x)||_2,
with g the gate weights renormalised over the token's top-k (they sum to 1 per token). The accumulator
is updated chunk by chunk and saved to / loaded from JSON with the number of records consumed, so a
profile can resume after a crash without counting anything twice.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..atomic import atomic_write
from ..errors import InputError

FIELDS = ("activation_counts", "activation_frequency", "avg_gate_weight", "ean_sum", "ean_mean",
          "weighted_ean_sum", "reap", "max_activations", "never_activated")
FORMAT = "gguf-experts expert_stats"


def renormalise(weights: np.ndarray) -> np.ndarray:
    """Gate weights divided by their sum over the token's top-k (rows summing to 0 stay 0)."""
    w = np.asarray(weights, np.float64)
    s = w.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s != 0, w / s, 0.0)


@dataclass
class ReapAccumulator:
    """Sums per (layer, expert) from which every REAP field is derived; add chunks with ``update``."""

    n_layer: int
    n_expert: int
    counts: np.ndarray = field(init=False)  # int64 [L, M]
    gate_sum: np.ndarray = field(init=False)  # raw gate weights as applied
    ean_sum: np.ndarray = field(init=False)  # sum of ||f_j(x)||
    weighted_ean_sum: np.ndarray = field(init=False)  # sum of renormalised gate x ||f_j(x)||
    max_norm: np.ndarray = field(init=False)  # max ||f_j(x)||
    tokens: np.ndarray = field(init=False)  # int64 [L]: rows (tokens) seen per layer
    records: int = 0  # input records (e.g. JSONL lines) consumed: the resume point
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        L, M = self.n_layer, self.n_expert
        self.counts = np.zeros((L, M), np.int64)
        self.gate_sum = np.zeros((L, M))
        self.ean_sum = np.zeros((L, M))
        self.weighted_ean_sum = np.zeros((L, M))
        self.max_norm = np.zeros((L, M))
        self.tokens = np.zeros(L, np.int64)

    def update(self, layer: np.ndarray, experts: np.ndarray, weights: np.ndarray, out_norms: np.ndarray) -> None:
        """Add rows: layer [N], experts/weights/out_norms [N, k] (norms of each selected expert's output
        before weighting, e.g. ffn_moe_down per token and slot)."""
        layer = np.asarray(layer, np.int64)
        experts = np.asarray(experts, np.int64)
        weights = np.asarray(weights, np.float64)
        norms = np.asarray(out_norms, np.float64)
        n, k = experts.shape
        if weights.shape != (n, k) or norms.shape != (n, k) or layer.shape != (n,):
            raise InputError(f"REAP inputs disagree in shape: layer {layer.shape}, experts {experts.shape}, "
                             f"weights {weights.shape}, norms {norms.shape}; pass one row per token and layer")
        if n == 0:
            return
        L, M = self.n_layer, self.n_expert
        if layer.min() < 0 or layer.max() >= L or experts.min() < 0 or experts.max() >= M:
            raise InputError(f"REAP input has a layer or expert id outside {L} layers x {M} experts")
        if not (np.isfinite(weights).all() and np.isfinite(norms).all()):
            raise InputError("REAP input has non-finite gate weights or output norms; the capture is damaged")
        idx = (layer[:, None] * M + experts).ravel()
        size = L * M
        self.counts += np.bincount(idx, minlength=size).reshape(L, M)
        self.gate_sum += np.bincount(idx, weights=weights.ravel(), minlength=size).reshape(L, M)
        self.ean_sum += np.bincount(idx, weights=norms.ravel(), minlength=size).reshape(L, M)
        self.weighted_ean_sum += np.bincount(idx, weights=(renormalise(weights) * norms).ravel(),
                                             minlength=size).reshape(L, M)
        mx = self.max_norm.reshape(-1)
        np.maximum.at(mx, idx, norms.ravel())
        self.tokens += np.bincount(layer, minlength=L)

    def merge(self, other: ReapAccumulator) -> None:
        """Add another accumulator's sums (e.g. one finished record's) into this one."""
        if (other.n_layer, other.n_expert) != (self.n_layer, self.n_expert):
            raise InputError(f"cannot merge REAP sums of {other.n_layer}x{other.n_expert} into "
                             f"{self.n_layer}x{self.n_expert}; they come from different models")
        self.counts += other.counts
        self.gate_sum += other.gate_sum
        self.ean_sum += other.ean_sum
        self.weighted_ean_sum += other.weighted_ean_sum
        np.maximum(self.max_norm, other.max_norm, out=self.max_norm)
        self.tokens += other.tokens

    def layers(self) -> np.ndarray:
        return np.flatnonzero(self.tokens > 0)

    def extremes(self, n: int = 3) -> pd.DataFrame:
        """Per layer, the n lowest- and n highest-REAP experts, one expert per row (for people):
        layer, end ("lowest"/"highest"), rank (1 = the extreme), expert, reap, activation_counts."""
        r = self.result()
        reap, counts = r["reap"], r["activation_counts"]
        rows = []
        for l in self.layers().tolist():  # one block of rows per MoE layer
            o = np.argsort(reap[l], kind="stable")
            for end, ids in (("lowest", o[:n]), ("highest", o[::-1][:n])):
                rows += [{"layer": l, "end": end, "rank": i + 1, "expert": int(e), "reap": float(reap[l][e]),
                          "activation_counts": int(counts[l][e])} for i, e in enumerate(ids)]
        return pd.DataFrame(rows, columns=["layer", "end", "rank", "expert", "reap", "activation_counts"])

    def result(self) -> dict[str, np.ndarray]:
        """Every REAP field as [L, M] arrays (never_activated as bool); means are 0 where count is 0."""
        c = self.counts
        with np.errstate(invalid="ignore", divide="ignore"):
            safe = np.where(c > 0, c, 1)
            freq = c / np.where(self.tokens > 0, self.tokens, 1)[:, None]
            return {"activation_counts": c, "activation_frequency": freq,
                    "avg_gate_weight": np.where(c > 0, self.gate_sum / safe, 0.0),
                    "ean_sum": self.ean_sum, "ean_mean": np.where(c > 0, self.ean_sum / safe, 0.0),
                    "weighted_ean_sum": self.weighted_ean_sum,
                    "reap": np.where(c > 0, self.weighted_ean_sum / safe, 0.0),
                    "max_activations": self.max_norm, "never_activated": c == 0}

    def frame(self) -> pd.DataFrame:
        """One row per (layer, expert) of the layers seen, with every field."""
        r = self.result()
        ls = self.layers()
        M = self.n_expert
        df = pd.DataFrame({"layer": np.repeat(ls, M), "expert": np.tile(np.arange(M), len(ls))})
        for f in FIELDS:
            df[f] = r[f][ls].ravel()
        return df

    def prune_plan(self, n: int) -> pd.DataFrame:
        """The n least salient experts per layer (lowest REAP; never-activated first, then by count)."""
        df = self.frame()
        df = df.sort_values(["layer", "reap", "activation_counts", "expert"], kind="stable")
        df["rank"] = df.groupby("layer").cumcount() + 1
        return df[df["rank"] <= n].reset_index(drop=True)

    def to_document(self) -> dict[str, Any]:
        """JSON: per-layer arrays indexed by expert id, plus the raw sums needed to resume exactly."""
        r = self.result()
        layers = []
        for l in self.layers().tolist():  # one entry per MoE layer
            e = {f: (np.flatnonzero(r[f][l]) if f == "never_activated" else r[f][l]) for f in FIELDS}
            e["layer"] = l
            e["tokens"] = int(self.tokens[l])
            layers.append(e)
        return {"format": FORMAT, "version": 1, "n_layer": self.n_layer, "n_expert": self.n_expert,
                "records": self.records, "meta": self.meta, "layers": layers,
                "state": {"counts": self.counts, "gate_sum": self.gate_sum, "ean_sum": self.ean_sum,
                          "weighted_ean_sum": self.weighted_ean_sum, "max_norm": self.max_norm,
                          "tokens": self.tokens}}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically (temp file + rename): a crash mid-save leaves the previous checkpoint intact."""
        doc = self.to_document()
        with atomic_write(path) as fh:
            json.dump(doc, fh, default=_plain, allow_nan=False)
            fh.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReapAccumulator:
        from ..strictio import load_json

        try:
            doc = load_json(path, "expert-stats JSON")
        except InputError as e:
            why = str(e).removeprefix(f"{path}: ")
            raise InputError(f"{path}: not a readable expert-stats JSON ({why}); pass the file profile wrote, "
                             "or drop --resume") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or "state" not in doc:
            raise InputError(f"{path}: not an expert-stats file written by `gguf-experts profile`; "
                             "pass another -o or drop --resume")
        from ..gguf.metadata import LLAMA_MAX_EXPERTS, LLAMA_MAX_LAYERS

        shape = (doc.get("n_layer"), doc.get("n_expert"))
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= hi
                   for v, hi in zip(shape, (LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS))):
            raise InputError(f"{path}: n_layer, n_expert = {shape} are not llama.cpp's ranges (1..{LLAMA_MAX_LAYERS}, "
                             f"1..{LLAMA_MAX_EXPERTS}); the file is damaged: delete it or drop --resume")
        try:
            acc = cls(int(doc["n_layer"]), int(doc["n_expert"]))
            st = doc["state"]
            acc.counts = np.asarray(st["counts"], np.int64).reshape(acc.n_layer, acc.n_expert)
            for name in ("gate_sum", "ean_sum", "weighted_ean_sum", "max_norm"):
                setattr(acc, name, np.asarray(st[name], np.float64).reshape(acc.n_layer, acc.n_expert))
            acc.tokens = np.asarray(st["tokens"], np.int64).reshape(acc.n_layer)
            acc.records = int(doc["records"])
            acc.meta = dict(doc.get("meta") or {})
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: expert-stats state is incomplete ({e}); delete it or drop --resume") from None
        return acc


def _plain(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
