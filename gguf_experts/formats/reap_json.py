"""The REAP JSON of llama.cpp PR #20454's ``llama-expert-profile`` (tools/expert-profile/expert-profile.cpp,
``save_stats``), read as expert counts.

``{"<layer>": {"total_tokens": T, "activation_counts": [n_experts], "activation_frequency": [...],
"avg_gate_weight": [...], "ean_mean": [...], "reap": [...], "never_activated": <count>}}`` with one entry per
MoE layer seen. Its array length is the tool's ``--n-experts`` (default 128), not read from the model, so it
is checked against --model. The profiler decodes each prompt+response as one batch: counts are prefill.
(It copies ``ffn_moe_topk`` as if contiguous, which misreads multi-token batches; we read what is written.)
The REAP fields (avg_gate_weight, ean_mean, reap) are kept in ``meta["reap"]`` as [L, M] arrays; written
back only when present (a routing trace has no expert output norms: `gguf-experts profile` measures them).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from .counts import DECODE, PREFILL, ExpertCounts

REAP_FIELDS = ("avg_gate_weight", "ean_mean", "reap")


def looks_like(doc: Any) -> bool:
    return (isinstance(doc, dict) and bool(doc) and all(str(k).isdigit() for k in doc)
            and all(isinstance(v, dict) and "activation_counts" in v for v in doc.values()))


def _counts(v: Any, where: str) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64) if isinstance(v, list) else None
    if a is None or a.ndim != 1 or not np.isfinite(a).all() or (a < 0).any() or (a != np.rint(a)).any():
        raise InputError(f"{where}: expected a list of whole numbers >= 0")
    return a.astype(np.int64)


def read_reap_json(doc: dict[str, Any], where: str, k: int | None = None) -> ExpertCounts:
    layers = sorted(int(x) for x in doc)
    first = doc[str(layers[0])] if str(layers[0]) in doc else next(iter(doc.values()))
    M = len(first.get("activation_counts") or [])
    if M == 0:
        raise InputError(f"{where}: activation_counts is empty; the profile saw no experts")
    out = ExpertCounts.empty(layers[-1] + 1, M, k=k, source="reap-json", phase_known=True)
    reap = {f: np.zeros((layers[-1] + 1, M)) for f in REAP_FIELDS}
    have = {f: True for f in REAP_FIELDS}
    for key, entry in doc.items():
        l, at = int(key), f"{where}: layer {key}"
        c = _counts(entry["activation_counts"], f"{at}: activation_counts")
        if len(c) != M:
            raise InputError(f"{at}: {len(c)} activation_counts, layer {layers[0]} has {M}")
        tt = entry.get("total_tokens", 0)
        if isinstance(tt, bool) or not isinstance(tt, (int, float)) or tt < 0 or tt != int(tt):
            raise InputError(f"{at}: total_tokens {tt!r} is not a whole number >= 0")
        if "prefill_counts" in entry and "decode_counts" in entry:
            out.counts[PREFILL, l] = _counts(entry["prefill_counts"], f"{at}: prefill_counts")
            out.counts[DECODE, l] = _counts(entry["decode_counts"], f"{at}: decode_counts")
            if not np.array_equal(out.counts[:, l].sum(axis=0), c):
                raise InputError(f"{at}: prefill_counts + decode_counts differ from activation_counts")
            ptok = entry.get("prefill_tokens", int(tt))
            out.tokens[PREFILL, l], out.tokens[DECODE, l] = int(ptok), int(tt) - int(ptok)
        else:
            out.counts[PREFILL, l] = c
            out.tokens[PREFILL, l] = int(tt)
        for f in REAP_FIELDS:
            v = entry.get(f)
            if isinstance(v, list) and len(v) == M:
                reap[f][l] = np.asarray(v, np.float64)
            else:
                have[f] = False
    out.meta = {"reap": {f: reap[f] for f in REAP_FIELDS if have[f]}}
    return out


def reap_document(c: ExpertCounts) -> dict[str, Any]:
    """llama-expert-profile's shape (layers with activity), plus prefill/decode counts and prefill tokens."""
    reap = c.meta.get("reap") or {}
    doc: dict[str, Any] = {}
    for l in c.layers().tolist():
        acts = c.counts[:, l].sum(axis=0)
        tt = int(c.tokens[:, l].sum())
        e: dict[str, Any] = {"total_tokens": tt, "activation_counts": acts.tolist(),
                             "activation_frequency": (acts / tt if tt else np.zeros(len(acts))).tolist()}
        for f in REAP_FIELDS:
            if f in reap:
                e[f] = np.asarray(reap[f][l], np.float64).tolist()
        e["never_activated"] = int((acts == 0).sum())
        e["prefill_counts"] = c.counts[PREFILL, l].tolist()
        e["decode_counts"] = c.counts[DECODE, l].tolist()
        e["prefill_tokens"] = int(c.tokens[PREFILL, l])
        doc[str(l)] = e
    return doc
