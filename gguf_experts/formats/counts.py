"""Count-only inputs: activations per (phase, layer, expert) without token order.

llama-imatrix files, tracer JSON statistics and REAP JSON hold counts, not traces: they answer shares, byte
heat, never-used experts and prune plans, but nothing that needs the order of tokens (reuse, cache curves).
``ExpertCounts`` is what every count reader returns and every count writer takes; a trace reduces to one
with ``from_chunks``.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from ..gguf.fingerprint import ModelFingerprint
from ..trace.format import TraceData

PREFILL, DECODE = 0, 1


@dataclass
class ExpertCounts:
    """Activations per (phase, layer, expert) and tokens per (phase, layer).

    When the source does not say which phase a token was in (``phase_known`` False), everything is in the
    decode slot, as the plain CSV log convention has it; llama-imatrix and llama-expert-profile evaluate
    whole batches, so their counts are prefill.
    """

    counts: np.ndarray  # int64 [2, L, M]
    tokens: np.ndarray  # int64 [2, L]
    k: int | None = None  # experts per token, when the source or the model says
    source: str = ""  # format name
    phase_known: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layer(self) -> int:
        return int(self.counts.shape[1])

    @property
    def n_expert(self) -> int:
        return int(self.counts.shape[2])

    @property
    def activations(self) -> np.ndarray:
        """[L, M] over both phases."""
        return self.counts.sum(axis=0)

    def layers(self) -> np.ndarray:
        """Layers with any activation or token (the MoE layers the source covered)."""
        return np.flatnonzero((self.counts.sum(axis=(0, 2)) > 0) | (self.tokens.sum(axis=0) > 0))

    @classmethod
    def empty(cls, n_layer: int, n_expert: int, **kw: Any) -> ExpertCounts:
        return cls(np.zeros((2, n_layer, n_expert), np.int64), np.zeros((2, n_layer), np.int64), **kw)

    @classmethod
    def from_chunks(cls, chunks: Iterable[TraceData], fp: ModelFingerprint, source: str = "trace") -> ExpertCounts:
        """Reduce a trace (chunk by chunk, bounded memory) to its counts."""
        from ..analysis.stats import check_ids

        L, M = fp.n_layer, fp.n_expert
        out = cls.empty(L, M, k=fp.n_expert_used, source=source)
        flat, tok = out.counts.reshape(-1), out.tokens.reshape(-1)
        for c in chunks:
            if not len(c):
                continue
            check_ids(c.layer, c.experts, L, M)
            base = (c.phase.astype(np.int64) * L + c.layer) * M
            flat += np.bincount((c.experts + base[:, None]).ravel(), minlength=2 * L * M)
            tok += np.bincount(c.phase.astype(np.int64) * L + c.layer, minlength=2 * L)
        return out

    def check_model(self, fp: ModelFingerprint, where: str) -> None:
        """Refuse counts that cannot come from this model (more experts or layers, another top-k)."""
        if self.n_expert != fp.n_expert:
            raise InputError(f"{where}: {self.n_expert} experts per layer, but the model has {fp.n_expert}; "
                             "pass the model the file was made with")
        used = self.layers()
        if len(used) and int(used.max()) >= fp.n_layer:
            raise InputError(f"{where}: has layer {int(used.max())}, but the model has {fp.n_layer} layers; "
                             "pass the model the file was made with")
        if self.k is not None and self.k != fp.n_expert_used:
            raise InputError(f"{where}: {self.k} experts per token, but the model uses {fp.n_expert_used}; "
                             "pass the model the file was made with")

    def resized(self, n_layer: int) -> ExpertCounts:
        """The same counts with room for n_layer layers (a model's), zero for layers the source lacks."""
        if n_layer == self.n_layer:
            return self
        if n_layer < self.n_layer:
            raise InputError(f"counts cover {self.n_layer} layers, more than {n_layer}")
        c = np.zeros((2, n_layer, self.n_expert), np.int64)
        t = np.zeros((2, n_layer), np.int64)
        c[:, :self.n_layer], t[:, :self.n_layer] = self.counts, self.tokens
        return ExpertCounts(c, t, self.k, self.source, self.phase_known, dict(self.meta))

    def fingerprint(self, model_fp: ModelFingerprint | None = None) -> ModelFingerprint:
        """The model's fingerprint (after checking), or one made of what the counts say."""
        if model_fp is not None:
            return model_fp
        return ModelFingerprint(architecture="unknown", n_layer=self.n_layer, n_expert=self.n_expert,
                                n_expert_used=int(self.k or 0), tensor_digest="", type_digest="")


def tokens_from_activations(acts: np.ndarray, k: int | None) -> np.ndarray:
    """Tokens per layer when a source only has activations: activations / k (rounded down), 0 without k."""
    if not k:
        return np.zeros(acts.shape[0], np.int64)
    return (acts.sum(axis=1) // int(k)).astype(np.int64)
