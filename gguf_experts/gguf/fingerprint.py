"""The model fingerprint: what a trace remembers of the model it was captured from, in one place.

A trace header holds it, join/report/diff/convert compare it, capture/profile compute it. A fingerprint
read from a file is range-checked against llama.cpp's own limits before anything is sized by it, so a
damaged header (``n_expert`` 2^31, ``n_layer`` 1e9, ``n_expert_used`` -1) is refused at once instead of
allocating gigabytes.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InputError, ModelMismatchError, TraceFormatError
from .metadata import LLAMA_MAX_EXPERTS, LLAMA_MAX_LAYERS

if TYPE_CHECKING:
    from .reader import Model

#: fields that must agree for a trace to belong to a model; type_digest (the quantization) may differ
STRICT_FIELDS = ("architecture", "n_layer", "n_expert", "n_expert_used", "tensor_digest")
#: integer fields of a fingerprint and their ranges (llama.cpp's LLAMA_MAX_LAYERS / LLAMA_MAX_EXPERTS)
_INT_RANGES = {"n_layer": (1, LLAMA_MAX_LAYERS), "n_expert": (1, LLAMA_MAX_EXPERTS),
               "n_expert_used": (1, LLAMA_MAX_EXPERTS)}


class QuantizationMismatchWarning(UserWarning):
    """The trace was captured from another quantization of the same model: counts carry over."""


@dataclass(frozen=True)
class ModelFingerprint:
    """Enough of a model to refuse joining a trace with another one.

    ``tensor_digest`` covers tensor names and shapes (the model); ``type_digest`` the ggml types (its
    quantization), so a trace can be joined with another quantization of the same model, with a warning.
    """

    architecture: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    tensor_digest: str
    type_digest: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "trace header",
                  damaged: str = "the file was not written by gguf-experts or is damaged") -> "ModelFingerprint":
        """Parse and range-check a fingerprint read from a file (a trace header, a stats JSON); ``damaged``
        says what to do about a bad one."""
        if not isinstance(d, dict):
            raise TraceFormatError(f"{where}: model fingerprint is a {type(d).__name__}, not an object; {damaged}")
        missing = [f for f in ("architecture", *_INT_RANGES, "tensor_digest", "type_digest") if f not in d]
        if missing:
            raise TraceFormatError(f"{where}: model fingerprint lacks {', '.join(missing)}; {damaged}")
        for f in ("architecture", "tensor_digest", "type_digest"):
            if not isinstance(d[f], str):
                raise TraceFormatError(f"{where}: fingerprint {f} = {_short(d[f])} is not a string; {damaged}")
        ints: dict[str, int] = {}
        for f, (lo, hi) in _INT_RANGES.items():
            v = d[f]
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise TraceFormatError(f"{where}: fingerprint {f} = {_short(v)} is not an integer in [{lo}, {hi}] "
                                       f"(llama.cpp's limits); {damaged}")
            ints[f] = v
        if ints["n_expert_used"] > ints["n_expert"]:
            raise TraceFormatError(f"{where}: fingerprint n_expert_used = {ints['n_expert_used']} exceeds n_expert = "
                                   f"{ints['n_expert']}; {damaged}")
        return cls(architecture=d["architecture"], tensor_digest=d["tensor_digest"], type_digest=d["type_digest"],
                   **ints)


    def checked(self, where: str) -> "ModelFingerprint":
        """Itself, after the checks a reader applies: a writer never writes a trace it could not read back."""
        return ModelFingerprint.from_dict(self.to_dict(), where, "a trace needs a Mixture-of-Experts model "
                                          "within llama.cpp's limits")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def fingerprint(model: Model) -> ModelFingerprint:
    """Identity of a model for traces: structure (names, shapes) and, separately, quantization (types)."""
    shapes = hashlib.sha256()
    types = hashlib.sha256()
    # sorted by name: llama.cpp's quantizer writes tensors in another order than the converter does
    for t in sorted(model.tensors, key=lambda t: t.name):
        shapes.update(f"{t.name}:{','.join(map(str, t.ne))}\n".encode())
        types.update(f"{t.name}:{t.type.name}\n".encode())
    return ModelFingerprint(
        architecture=model.architecture, n_layer=model.block_count, n_expert=model.expert_count,
        n_expert_used=model.expert_used_count, tensor_digest=shapes.hexdigest()[:32],
        type_digest=types.hexdigest()[:32],
    )


def model_fingerprint(model_path: str | os.PathLike[str]) -> ModelFingerprint:
    """The fingerprint of a MoE model file (capture, profile); a dense model is refused."""
    from .reader import open_model

    fp = fingerprint(open_model(model_path))
    if not fp.n_expert or not fp.n_expert_used:
        raise InputError(f"{model_path}: not a Mixture-of-Experts model (no expert_count/expert_used_count); "
                         "nothing to capture")
    return fp


def check_fingerprint(trace_fp: ModelFingerprint, model_fp: ModelFingerprint,
                      trace_name: str = "trace", model_name: str = "model") -> str | None:
    """Raise ModelMismatchError if the trace was captured from another model.

    Returns a warning string (does not raise) when only the quantization (type_digest) differs: the
    experts and their order are the same, only the byte sizes of the slices change.
    """
    diff = [f for f in STRICT_FIELDS if getattr(trace_fp, f) != getattr(model_fp, f)]
    if diff:
        parts = ", ".join(f"{f}: trace {getattr(trace_fp, f)!r} vs model {getattr(model_fp, f)!r}" for f in diff)
        raise ModelMismatchError(f"{trace_name} was not captured from {model_name} ({parts}); "
                                 "join it with the model it was captured from")
    if trace_fp.type_digest != model_fp.type_digest:
        return (f"{trace_name} was captured from another quantization of {model_name} "
                "(same tensors, other ggml types); expert activations carry over, byte sizes are the model's")
    return None


def check_model(trace_fp: ModelFingerprint, model: Model, trace_name: str) -> str | None:
    """Refuse another model (ModelMismatchError); warn, and return the message, for another quantization."""
    msg = check_fingerprint(trace_fp, fingerprint(model), trace_name=trace_name, model_name=str(model.path))
    if msg:
        warnings.warn(QuantizationMismatchWarning(msg), stacklevel=3)
    return msg


def check_same_model(a: ModelFingerprint, b: ModelFingerprint, name_a: str, name_b: str) -> None:
    """Refuse two traces of different models (diff without --model); quantization may differ."""
    bad = [f"{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}" for f in STRICT_FIELDS if getattr(a, f) != getattr(b, f)]
    if bad:
        raise ModelMismatchError(f"{name_a} and {name_b} were captured from different models ({', '.join(bad)}); "
                                 "compare traces of one model")


__all__ = ["STRICT_FIELDS", "ModelFingerprint", "QuantizationMismatchWarning", "check_fingerprint", "check_model",
           "check_same_model", "fingerprint", "model_fingerprint"]


def fingerprint_for(where: str, fp: ModelFingerprint | None, n_layer: int, n_expert: int, k: int
                    ) -> ModelFingerprint:
    """The model's fingerprint after checking the file against it, or one made of what the file says."""
    if fp is None:
        return ModelFingerprint(architecture="unknown", n_layer=n_layer, n_expert=n_expert, n_expert_used=k,
                                tensor_digest="", type_digest="")
    bad = []
    if n_expert != fp.n_expert:
        bad.append(f"{n_expert} experts vs the model's {fp.n_expert}")
    if n_layer > fp.n_layer:
        bad.append(f"layer {n_layer - 1} vs the model's {fp.n_layer} layers")
    if k != fp.n_expert_used:
        bad.append(f"top-{k} vs the model's top-{fp.n_expert_used}")
    if bad:
        raise InputError(f"{where}: not from this model ({'; '.join(bad)}); pass the model it was made with")
    return fp
