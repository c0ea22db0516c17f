"""Compare two traces of one model (the library half of ``gguf-experts diff`` and of the report's
difference): load both, refuse traces of different models, and hand the counts to analysis.diff."""
from __future__ import annotations

import os

import numpy as np

from .analysis.diff import ShareDiff, diff_frames, share_diff
from .fingerprint import check_same_model
from .join import count_chunks, join
from .trace.reader import iter_trace_chunks, read_trace_header


def _counts(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    header = read_trace_header(path)
    c = count_chunks(iter_trace_chunks(path, weights=False), header.fingerprint)
    return c.activations, c.tokens


def compare(a: str | os.PathLike[str], b: str | os.PathLike[str],
            model: str | os.PathLike[str] | None = None) -> ShareDiff:
    """Load and compare two traces; refuses traces of different models."""
    if model:
        ha, hb = join(a, model), join(b, model)
        return diff_frames(ha.experts, hb.experts, ha.layers, hb.layers)
    check_same_model(read_trace_header(a).fingerprint, read_trace_header(b).fingerprint, str(a), str(b))
    (aa, ta), (ab, tb) = _counts(a), _counts(b)
    return share_diff(aa, ab, tokens_a=ta, tokens_b=tb)
