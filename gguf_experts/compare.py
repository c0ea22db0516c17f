"""Compare two traces of one model (the library half of ``gguf-experts diff``): load both (traces or another
tool's files), refuse inputs of different models, and hand the counts to analysis.diff."""
from __future__ import annotations

import os
from typing import Any

from .analysis.diff import ShareDiff, diff_frames, share_diff
from .errors import ModelMismatchError
from .gguf.fingerprint import ModelFingerprint, check_same_model
from .formats.load import Input, open_input
from .heat import join
from .gguf.expert_ids import original_input


def _source(path: str | os.PathLike[str], model: str | None) -> Any:
    """What join takes for an input: the path of a trace.bin, chunks of another ordered log, or counts."""
    inp = open_input(path, model)
    if inp.format == "trace":
        return path
    return inp.counts if inp.counts is not None else inp.chunks


def _shape(inp: Input) -> ModelFingerprint:
    return inp.counts.fingerprint() if inp.counts is not None else inp.header.fingerprint  # type: ignore[union-attr]


def compare(a: str | os.PathLike[str], b: str | os.PathLike[str], model: str | None = None) -> ShareDiff:
    """Load and compare two inputs (traces or another tool's files); refuses inputs of different models."""
    if model:
        ha, hb = join(_source(a, model), model), join(_source(b, model), model)
        return diff_frames(ha.experts, hb.experts, ha.layers, hb.layers)
    ia, ib = original_input(open_input(a)), original_input(open_input(b))  # a pruned model's: original ids
    fa, fb = _shape(ia), _shape(ib)
    if fa.tensor_digest and fb.tensor_digest:
        check_same_model(fa, fb, str(a), str(b))
    elif fa.n_expert != fb.n_expert:  # a foreign file without --model: only shapes are known
        raise ModelMismatchError(f"{a} and {b} were captured from different models (n_expert: {fa.n_expert} vs "
                                 f"{fb.n_expert}); compare traces of one model")
    ca, cb = ia.to_counts(), ib.to_counts()
    n = max(ca.n_layer, cb.n_layer)
    ca, cb = ca.resized(n), cb.resized(n)
    return share_diff(ca.activations, cb.activations, tokens_a=ca.tokens.sum(axis=0), tokens_b=cb.tokens.sum(axis=0))
