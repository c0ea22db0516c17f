"""The expert-id mapping of a pruned model, and reading traces of it in the original model's ids.

Why: after `prune`, expert 3 of layer 7 in the pruned file may be expert 11 of the original. `prune` stores
the original ids per layer in the output's metadata (``gguf_experts.prune.original_ids.<layer>``, plus the
source's name and fingerprint); `capture` copies them into the trace header (meta ``prune``). join-trace,
stats, report and diff translate such traces to original ids, so they can be compared with traces of the
original model and read against either model.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelMismatchError

if TYPE_CHECKING:
    import pandas as pd

    from .reader import Model
    from .fingerprint import ModelFingerprint
    from ..trace.format import TraceData, TraceHeader

PREFIX = "gguf_experts.prune."
META_KEY = "prune"  # in a trace header's meta


@dataclass
class PruneMapping:
    """Original ids of the kept experts of each MoE layer (ascending), and where they came from."""

    source: str
    source_fingerprint: dict[str, Any]
    source_n_expert: int
    original_ids: dict[int, np.ndarray]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "source_fingerprint": self.source_fingerprint,
                "source_n_expert": self.source_n_expert,
                "original_ids": {str(k): v.tolist() for k, v in sorted(self.original_ids.items())}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneMapping:
        return cls(str(d["source"]), dict(d["source_fingerprint"]), int(d["source_n_expert"]),
                   {int(k): np.asarray(v, np.int64) for k, v in d["original_ids"].items()})

    def source_fp(self) -> ModelFingerprint:
        from .fingerprint import ModelFingerprint

        return ModelFingerprint.from_dict(self.source_fingerprint, where=f"prune mapping of {self.source}")

    def lut(self, n_layer: int) -> np.ndarray:
        """[n_layer, n_keep] pruned id -> original id (rows of layers without experts: identity)."""
        n_keep = len(next(iter(self.original_ids.values())))
        out = np.tile(np.arange(n_keep, dtype=np.int32), (n_layer, 1))
        for layer, ids in self.original_ids.items():
            if layer < n_layer:
                out[layer] = ids
        return out

    def translate(self, chunks: Iterable[TraceData]) -> Iterator[TraceData]:
        """The chunks with expert ids in the original model's numbering and its fingerprint."""
        lut: np.ndarray | None = None
        header: TraceHeader | None = None
        for c in chunks:
            if lut is None or header is None:
                lut = self.lut(c.header.fingerprint.n_layer)
                header = dataclasses.replace(c.header, fingerprint=self.source_fp())
            experts = c.experts
            if len(c):
                if int(c.experts.max()) >= lut.shape[1] or int(c.experts.min()) < 0:
                    raise ModelMismatchError(f"a trace row selects expert {int(c.experts.max())} but the pruned "
                                             f"model keeps {lut.shape[1]} per layer; the trace is from another model")
                experts = lut[c.layer.astype(np.int64)[:, None], c.experts]
            yield dataclasses.replace(c, experts=experts.astype(np.int32), header=header)

    def relabel(self, slices: pd.DataFrame) -> pd.DataFrame:
        """An expert-slice table of the pruned model with expert ids of the original model."""
        out = slices.copy()
        if len(out):
            lut = self.lut(int(out["layer"].max()) + 1)
            out["expert_id"] = lut[out["layer"].to_numpy(np.int64), out["expert_id"].to_numpy(np.int64)]
        return out


def _ints(v: Any) -> list[int]:
    return [int(x) for x in (v.load() if hasattr(v, "load") else v)]


def mapping_of(kv: dict[str, Any]) -> PruneMapping | None:
    """The mapping a pruned model's metadata holds, or None for a model that was not pruned."""
    if PREFIX + "source_fingerprint" not in kv:
        return None
    ids = {int(k[len(PREFIX + "original_ids."):]): np.asarray(_ints(v), np.int64)
           for k, v in kv.items() if k.startswith(PREFIX + "original_ids.")}
    return PruneMapping(str(kv.get(PREFIX + "source", "?")), json.loads(str(kv[PREFIX + "source_fingerprint"])),
                        int(kv.get(PREFIX + "source_expert_count", 0)), ids)


def trace_mapping(header: TraceHeader) -> PruneMapping | None:
    d = header.meta.get(META_KEY) if isinstance(header.meta, dict) else None
    return PruneMapping.from_dict(d) if isinstance(d, dict) else None


def to_original(chunks: Iterable[TraceData], model: Model | None = None) -> Iterator[TraceData]:
    """Chunks of a trace in original expert ids when it was captured from a pruned model (the mapping from
    the trace header, else from ``model`` when the trace's fingerprint is that pruned model's); otherwise
    the chunks unchanged."""
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        return iter(())
    mapping = trace_mapping(first.header)
    if mapping is None and model is not None:
        from .fingerprint import fingerprint

        m = mapping_of(model.kv)
        if m is not None and fingerprint(model).tensor_digest == first.header.fingerprint.tensor_digest:
            mapping = m
    rest = _prepend(first, it)
    return mapping.translate(rest) if mapping is not None else rest


def original_input(inp: Any) -> Any:
    """A formats.Input with an ordered trace of a pruned model (mapping in its header) in original ids."""
    if inp.header is not None and inp.chunks is not None and trace_mapping(inp.header) is not None:
        inp.header = translate_header(inp.header)
        inp.chunks = to_original(inp.chunks)
    return inp


def translate_header(header: TraceHeader) -> TraceHeader:
    """The header as the translated chunks carry it (source fingerprint for a trace of a pruned model)."""
    m = trace_mapping(header)
    return dataclasses.replace(header, fingerprint=m.source_fp()) if m is not None else header


def model_view(model: Model) -> tuple[ModelFingerprint, PruneMapping | None]:
    """The fingerprint a translated trace is checked against, and the model's own mapping (if pruned)."""
    from .fingerprint import fingerprint

    m = mapping_of(model.kv)
    return (m.source_fp() if m is not None else fingerprint(model)), m


def _prepend(first: TraceData, it: Iterator[TraceData]) -> Iterator[TraceData]:
    yield first
    yield from it
