"""JSON statistics of env-configured llama.cpp expert tracers, read as expert counts.

Two shapes are read (detected by content):
- ``{"total_tokens": T, "expert_activations": {...}, "per_layer": {"<layer>": {"<expert>": n}}}`` (issue 13's
  description of the env-configured tracers); ``per_layer`` is what is counted;
- ``{"layers": [{"layer_id", "total_tokens", "experts": [{"expert_id", "activations", "percentage"}]}]}``,
  which LLAMA_EXPERT_TRACE_OUTPUT of ernestuz-b/llama-prefetch.cpp writes (its total_tokens counts
  activations, not tokens).
Neither says which phase a token was in; ours adds ``prefill_per_layer`` / ``decode_per_layer`` (same shape as
per_layer) so a round trip keeps the split. The first shape is written.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from .counts import DECODE, PREFILL, ExpertCounts, tokens_from_activations

FORMAT_KEYS = ("per_layer",)


def looks_like(doc: Any) -> bool:
    return isinstance(doc, dict) and ("per_layer" in doc or (
        isinstance(doc.get("layers"), list) and all(isinstance(x, dict) and "experts" in x for x in doc["layers"])))


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
        raise InputError(f"{where}: {v!r} is not a count (a whole number >= 0)")
    return int(v)


def _table(obj: Any, where: str) -> dict[int, dict[int, int]]:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected an object {{\"<layer>\": {{\"<expert>\": n}}}}")
    out: dict[int, dict[int, int]] = {}
    for lk, ex in obj.items():
        if not str(lk).isdigit() or not isinstance(ex, dict):
            raise InputError(f"{where}: key {lk!r} is not a layer number with an object of expert counts")
        row = {}
        for ek, n in ex.items():
            if not str(ek).isdigit():
                raise InputError(f"{where}[{lk}]: key {ek!r} is not an expert number")
            row[int(ek)] = _int(n, f"{where}[{lk}][{ek}]")
        out[int(lk)] = row
    return out


def read_tracer_json(doc: dict[str, Any], where: str, n_expert: int | None = None,
                     k: int | None = None) -> ExpertCounts:
    """Counts of a tracer JSON document (already parsed); n_expert and k from the model when given."""
    tables, total = _tables(doc, where)
    layers = [l for tab in tables.values() for l in tab]
    experts = [e for tab in tables.values() for row in tab.values() for e in row]
    if not layers:
        raise InputError(f"{where}: no layers in the tracer statistics; nothing to read")
    M = int(n_expert) if n_expert else max(experts, default=-1) + 1
    if experts and max(experts) >= M:
        raise InputError(f"{where}: expert {max(experts)} but the model has {M} experts; pass the model the "
                         "statistics were made with")
    out = ExpertCounts.empty(max(layers) + 1, max(M, 1), k=k, source="tracer-json",
                             phase_known=PREFILL in tables)
    for ph, tab in tables.items():
        for l, row in tab.items():
            if row:
                out.counts[ph, l, list(row)] = list(row.values())
    _tokens(out, doc, where, tables, total, k)
    return out


def _tables(doc: dict[str, Any], where: str) -> tuple[dict[int, dict[int, dict[int, int]]], int | None]:
    """{phase: {layer: {expert: n}}} and total_tokens, of either shape."""
    tables: dict[int, dict[int, dict[int, int]]] = {}
    total = None
    if "per_layer" in doc:
        tables[DECODE] = _table(doc["per_layer"], f"{where}: per_layer")
        if "prefill_per_layer" in doc and "decode_per_layer" in doc:
            tables = {PREFILL: _table(doc["prefill_per_layer"], f"{where}: prefill_per_layer"),
                      DECODE: _table(doc["decode_per_layer"], f"{where}: decode_per_layer")}
        if "total_tokens" in doc:
            total = _int(doc["total_tokens"], f"{where}: total_tokens")
    else:
        t: dict[int, dict[int, int]] = {}
        for i, entry in enumerate(doc["layers"]):
            at = f"{where}: layers[{i}]"
            if not isinstance(entry.get("experts"), list) or "layer_id" not in entry:
                raise InputError(f"{at}: expected layer_id and experts [{{expert_id, activations}}]")
            row = t.setdefault(_int(entry["layer_id"], f"{at}.layer_id"), {})
            for j, e in enumerate(entry["experts"]):
                if not isinstance(e, dict) or "expert_id" not in e or "activations" not in e:
                    raise InputError(f"{at}.experts[{j}]: expected {{expert_id, activations}}")
                row[_int(e["expert_id"], f"{at}.experts[{j}].expert_id")] = _int(
                    e["activations"], f"{at}.experts[{j}].activations")
        tables[DECODE] = t
    return tables, total


def _tokens(out: ExpertCounts, doc: dict[str, Any], where: str, tables: dict[int, Any], total: int | None,
            k: int | None) -> None:
    """Tokens per (phase, layer): ours as written, else activations / k, else total_tokens."""
    tpl = doc.get("tokens_per_layer") if "per_layer" in doc else None
    if isinstance(tpl, dict):  # ours: {"<layer>": [prefill, decode]}
        for lk, v in tpl.items():
            if not str(lk).isdigit() or not isinstance(v, list) or len(v) != 2 or int(lk) >= out.n_layer:
                raise InputError(f"{where}: tokens_per_layer[{lk!r}] must be [prefill, decode] of a known layer")
            out.tokens[:, int(lk)] = [_int(x, f"{where}: tokens_per_layer[{lk}]") for x in v]
        return
    for ph in tables:
        if k:
            out.tokens[ph] = tokens_from_activations(out.counts[ph], k)
        elif total is not None and ph == DECODE and PREFILL not in tables:
            out.tokens[ph, out.counts[ph].sum(axis=1) > 0] = total


def tracer_document(c: ExpertCounts) -> dict[str, Any]:
    """The first shape, plus prefill_per_layer / decode_per_layer when the phases are known."""
    acts = c.activations
    layers = c.layers()

    def table(a: np.ndarray) -> dict[str, dict[str, int]]:
        return {str(l): {str(e): int(a[l, e]) for e in range(c.n_expert)} for l in layers.tolist()}

    doc: dict[str, Any] = {
        "total_tokens": int(c.tokens.sum(axis=0).max()) if c.tokens.size else 0,
        "expert_activations": {str(e): int(v) for e, v in enumerate(acts[layers].sum(axis=0).tolist())},
        "per_layer": table(acts),
    }
    doc["tokens_per_layer"] = {str(l): [int(c.tokens[0, l]), int(c.tokens[1, l])] for l in layers.tolist()}
    if c.phase_known:
        doc["prefill_per_layer"] = table(c.counts[PREFILL])
        doc["decode_per_layer"] = table(c.counts[DECODE])
    return doc


