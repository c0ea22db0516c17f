"""How differently prompt kinds route: the Jensen-Shannon divergence between kinds' per-layer expert distributions.

Why: "the trained model specialises" needs a number and a baseline. For each layer, each kind's activations are
normalised to a distribution over experts, and the divergence (bits, in [0, 1]) is averaged over all pairs of
kinds. The same prompts on a random-weight model of the same shape and tokens give the baseline: a random
router also routes different tokens differently, and short prompts add sampling noise, so the baseline is not 0.
Only layers that route every token count (qwen3moe's last layer routes just the rows whose logits are needed).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

from ..analysis.diff import js_divergence, shares
from ..errors import InputError
from ..trace.format import TraceData


@dataclass
class KindDivergence:
    layers: pd.DataFrame  # layer, tokens (rows routed), full (routes every token), js_divergence (mean over pairs)
    mean: float  # mean over the full layers


def kind_activations(tr: TraceData, n_kinds: int, n_expert: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(layer ids [L], activations [n_kinds, L, n_expert], rows per layer [L]); kind i is sequence i."""
    layers, li = np.unique(tr.layer, return_inverse=True)
    if len(tr) == 0 or tr.seq.min() < 0 or tr.seq.max() >= n_kinds:
        raise InputError(f"demo trace: sequences {sorted(set(tr.seq.tolist()))[:8]} are not the {n_kinds} kinds")
    k = tr.experts.shape[1]
    idx = (np.repeat(tr.seq.astype(np.int64), k) * len(layers) + np.repeat(li, k)) * n_expert
    idx = idx + tr.experts.reshape(-1).astype(np.int64)
    acts = np.bincount(idx, minlength=n_kinds * len(layers) * n_expert).reshape(n_kinds, len(layers), n_expert)
    return layers, acts, np.bincount(li, minlength=len(layers))


def kind_divergence(tr: TraceData, n_kinds: int, n_expert: int) -> KindDivergence:
    """Mean pairwise Jensen-Shannon divergence between the kinds' expert shares, per layer and over full layers."""
    if n_kinds < 2:
        raise InputError("kind divergence needs at least two kinds of prompts")
    layers, acts, rows = kind_activations(tr, n_kinds, n_expert)
    sh = np.stack([shares(a) for a in acts])  # [K, L, E]
    js = np.mean([js_divergence(sh[i], sh[j]) for i, j in combinations(range(n_kinds), 2)], axis=0)
    full = rows == rows.max()
    frame = pd.DataFrame({"layer": layers, "tokens": rows, "full": full, "js_divergence": np.round(js, 4)})
    return KindDivergence(layers=frame, mean=float(js[full].mean()))


__all__ = ["KindDivergence", "kind_activations", "kind_divergence"]
