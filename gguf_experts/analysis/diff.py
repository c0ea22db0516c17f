"""How two workloads route differently: per (layer, expert) share deltas and a per-layer Jensen-Shannon divergence.

Pure functions over activation count matrices [n_layer, n_expert] (``join.Counts.activations``, or the
``experts`` frame of a ``HeatResult``): nothing here reads a trace. Jensen-Shannon is used because it is
symmetric (a vs b == b vs a), finite when one side never used an expert (KL is not) and bounded: in bits it
lies in [0, 1], 0 for identical routing, 1 for disjoint expert sets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import InputError

EXPERT_DIFF_COLUMNS = ["layer", "expert", "activations_a", "activations_b", "share_a", "share_b", "delta"]
LAYER_DIFF_COLUMNS = ["layer", "tokens_a", "tokens_b", "activations_a", "activations_b", "js_divergence",
                      "top_gain_expert", "top_gain_delta", "top_loss_expert", "top_loss_delta"]


@dataclass
class ShareDiff:
    """Per (layer, expert) deltas (b minus a) and per-layer divergence; ``overall`` is the token-weighted mean."""

    experts: pd.DataFrame  # EXPERT_DIFF_COLUMNS, one row per (layer, expert) of the compared layers
    layers: pd.DataFrame  # LAYER_DIFF_COLUMNS
    overall: float  # mean JS divergence over layers, weighted by the activations of both traces


def shares(acts: np.ndarray) -> np.ndarray:
    """Row-normalised activation counts; an all-zero row stays zero."""
    a = np.asarray(acts, dtype=np.float64)
    tot = a.sum(axis=1, keepdims=True)
    return np.divide(a, tot, out=np.zeros_like(a), where=tot > 0)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits between matching rows of two row-stochastic matrices ([L, E] -> [L])."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    m = 0.5 * (p + q)

    def kl(x: np.ndarray) -> np.ndarray:
        ratio = np.divide(x, m, out=np.ones_like(x), where=x > 0)
        return (x * np.log2(ratio)).sum(axis=1)

    return np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, 1.0)


def share_diff(acts_a: np.ndarray, acts_b: np.ndarray, layers: np.ndarray | None = None,
               tokens_a: np.ndarray | None = None, tokens_b: np.ndarray | None = None) -> ShareDiff:
    """Compare two activation matrices of the same model shape.

    ``layers`` names the rows (default 0..L-1); rows where neither trace has activations are dropped (dense
    layers). ``tokens_a/_b`` (rows per layer) are carried into the layer frame when given.
    """
    a = np.asarray(acts_a, dtype=np.int64)
    b = np.asarray(acts_b, dtype=np.int64)
    if a.ndim != 2 or a.shape != b.shape:
        raise InputError(f"cannot compare activation matrices of shapes {a.shape} and {b.shape}: the traces "
                         "come from models with different layer/expert counts; compare traces of one model")
    n_layer, n_expert = a.shape
    names = np.arange(n_layer) if layers is None else np.asarray(layers, dtype=np.int64)
    ta = np.zeros(n_layer, np.int64) if tokens_a is None else np.asarray(tokens_a, dtype=np.int64)
    tb = np.zeros(n_layer, np.int64) if tokens_b is None else np.asarray(tokens_b, dtype=np.int64)
    keep = (a.sum(axis=1) > 0) | (b.sum(axis=1) > 0)
    a, b, names, ta, tb = a[keep], b[keep], names[keep], ta[keep], tb[keep]
    sa, sb = shares(a), shares(b)
    delta = sb - sa
    js = js_divergence(sa, sb)
    ex = pd.DataFrame({
        "layer": np.repeat(names, n_expert), "expert": np.tile(np.arange(n_expert), len(names)),
        "activations_a": a.ravel(), "activations_b": b.ravel(), "share_a": sa.ravel(), "share_b": sb.ravel(),
        "delta": delta.ravel(),
    }, columns=EXPERT_DIFF_COLUMNS)
    gain = delta.argmax(axis=1) if len(names) else np.zeros(0, np.int64)
    loss = delta.argmin(axis=1) if len(names) else np.zeros(0, np.int64)
    rows = np.arange(len(names))
    ly = pd.DataFrame({
        "layer": names, "tokens_a": ta, "tokens_b": tb, "activations_a": a.sum(axis=1),
        "activations_b": b.sum(axis=1), "js_divergence": js,
        "top_gain_expert": gain, "top_gain_delta": delta[rows, gain] if len(names) else np.zeros(0),
        "top_loss_expert": loss, "top_loss_delta": delta[rows, loss] if len(names) else np.zeros(0),
    }, columns=LAYER_DIFF_COLUMNS)
    w = a.sum(axis=1) + b.sum(axis=1)
    overall = float((js * w).sum() / w.sum()) if w.sum() > 0 else 0.0
    return ShareDiff(experts=ex, layers=ly, overall=overall)


def frame_matrix(experts: pd.DataFrame, n_expert: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(layers, activations [L, E]) from a ``HeatResult.experts`` frame (columns layer, expert, activations)."""
    missing = {"layer", "expert", "activations"} - set(experts.columns)
    if missing:
        raise InputError(f"expert table lacks column(s) {sorted(missing)}; pass HeatResult.experts")
    lay = experts["layer"].to_numpy(dtype=np.int64)
    exp = experts["expert"].to_numpy(dtype=np.int64)
    layers = np.unique(lay)
    ne = int(exp.max()) + 1 if n_expert is None and len(exp) else int(n_expert or 0)
    m = np.zeros((len(layers), ne), np.int64)
    np.add.at(m, (np.searchsorted(layers, lay), exp), experts["activations"].to_numpy(dtype=np.int64))
    return layers, m


def diff_frames(experts_a: pd.DataFrame, experts_b: pd.DataFrame, layers_a: pd.DataFrame | None = None,
                layers_b: pd.DataFrame | None = None) -> ShareDiff:
    """share_diff of two ``HeatResult.experts`` frames (layers aligned by number); the optional
    ``HeatResult.layers`` frames supply tokens per layer."""
    la, ma = frame_matrix(experts_a)
    lb, mb = frame_matrix(experts_b)
    if ma.shape[1] != mb.shape[1]:
        raise InputError(f"traces have {ma.shape[1]} and {mb.shape[1]} experts per layer: not the same model")
    layers = np.union1d(la, lb)
    full_a = np.zeros((len(layers), ma.shape[1]), np.int64)
    full_b = np.zeros_like(full_a)
    full_a[np.searchsorted(layers, la)] = ma
    full_b[np.searchsorted(layers, lb)] = mb

    def tokens(ly: pd.DataFrame | None) -> np.ndarray | None:
        if ly is None:
            return None
        return ly.set_index("layer")["tokens"].reindex(layers).fillna(0).to_numpy(dtype=np.int64)
    return share_diff(full_a, full_b, layers=layers, tokens_a=tokens(layers_a), tokens_b=tokens(layers_b))


def top_changes(diff: ShareDiff, per_layer: int = 3) -> pd.DataFrame:
    """The ``per_layer`` experts with the largest |delta| in each layer, largest first."""
    ex = diff.experts.assign(abs_delta=diff.experts["delta"].abs())
    ex = ex.sort_values(["layer", "abs_delta"], ascending=[True, False], kind="stable")
    return ex.groupby("layer", sort=True).head(per_layer).drop(columns="abs_delta").reset_index(drop=True)
