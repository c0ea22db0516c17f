"""Compare two traces of one model (the library half of ``gguf-experts diff`` and of the report's
difference): load both, refuse traces of different models, and hand the counts to analysis.diff."""
from __future__ import annotations

import os

import numpy as np

from .analysis.diff import ShareDiff, diff_frames, share_diff
from .errors import ModelMismatchError
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
    fa, fb = read_trace_header(a).fingerprint, read_trace_header(b).fingerprint
    fields = ("architecture", "n_layer", "n_expert", "n_expert_used", "tensor_digest")
    bad = [f"{f}: {getattr(fa, f)!r} vs {getattr(fb, f)!r}" for f in fields if getattr(fa, f) != getattr(fb, f)]
    if bad:
        raise ModelMismatchError(f"{a} and {b} were captured from different models ({', '.join(bad)}); "
                                 "compare traces of one model")
    (aa, ta), (ab, tb) = _counts(a), _counts(b)
    return share_diff(aa, ab, tokens_a=ta, tokens_b=tb)
