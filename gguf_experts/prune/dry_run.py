"""What a prune would do (`prune --dry-run`): kept and dropped experts and bytes per layer, and, given a trace
of the source, the selections that would hit dropped experts and the bytes read per token before and after."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..gguf.reader import Model
from ..gguf.layout import kind_of
from ..gguf.names import split_name
from .cut import PrunePlan, out_tensors, routing_semantics


def iter_layer_rows(model: Model, plan: PrunePlan) -> Iterator[dict[str, Any]]:
    """Per MoE layer: kept and dropped ids, and the bytes of all the layer's tensors before and after."""
    before: dict[int, int] = {}
    after: dict[int, int] = {}
    for src in model.tensors:
        layer = split_name(src.name)[0]
        if layer in plan.keep:
            before[layer] = before.get(layer, 0) + src.nbytes
    for t in out_tensors(model, plan):
        layer = split_name(t.source.name)[0]
        if layer in plan.keep:
            after[layer] = after.get(layer, 0) + t.entry.nbytes
    for layer, kept in sorted(plan.keep.items()):
        yield {"layer": layer, "kept": len(kept), "dropped": plan.n_expert - len(kept),
               "dropped_ids": " ".join(map(str, plan.dropped(layer).tolist())),
               "kept_ids": " ".join(map(str, kept.tolist())),
               "bytes_before": before.get(layer, 0), "bytes_after": after.get(layer, 0)}


def dry_run(model: Model, plan: PrunePlan, trace: str | os.PathLike[str] | None = None
            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What a prune would do: per layer the kept and dropped experts and bytes; with a trace of the source,
    the share of selections that hit dropped experts and of tokens whose routing would change, and bytes
    read per token at top-k before and after."""
    from ..gguf.layout import expert_bytes, per_token_bytes

    rows = list(iter_layer_rows(model, plan))
    outs = out_tensors(model, plan)
    routing = routing_semantics(model)
    summary: dict[str, Any] = {
        "source": model.path.name, "architecture": model.architecture, "method": plan.method,
        "experts_before": plan.n_expert, "experts_after": plan.n_keep, "n_expert_used": model.expert_used_count,
        "model_bytes_before": sum(t.nbytes for t in model.tensors),
        "model_bytes_after": sum(t.entry.nbytes for t in outs),
        "routing_changes": routing.changes, "routing": routing.text}
    if trace is None:
        return rows, summary
    from ..gguf.fingerprint import check_model
    from ..trace.reader import iter_trace_chunks, read_trace_header

    header = read_trace_header(trace)
    check_model(header.fingerprint, model, str(trace))
    L, n, k = header.fingerprint.n_layer, plan.n_expert, model.expert_used_count
    dropped = np.zeros((L, n), bool)
    for layer in plan.keep:
        dropped[layer, plan.dropped(layer)] = True
    eb = np.zeros((L, n))
    ebf = expert_bytes(model)
    if len(ebf):
        eb[ebf["layer"].to_numpy(np.int64), ebf["expert"].to_numpy(np.int64)] = ebf["bytes"].to_numpy(np.float64)
    sel, sel_dropped, lrows, lchanged = (np.zeros(L, np.int64) for _ in range(4))
    read_bytes = np.zeros(L)
    changed: list[np.ndarray] = []
    for c in iter_trace_chunks(trace, weights=False):
        if not len(c):
            continue
        lay = c.layer.astype(np.int64)
        hit = dropped[lay[:, None], c.experts]
        sel += np.bincount(lay, weights=np.full(len(lay), c.experts.shape[1]), minlength=L).astype(np.int64)
        sel_dropped += np.bincount(lay, weights=hit.sum(axis=1), minlength=L).astype(np.int64)
        lrows += np.bincount(lay, minlength=L)
        row_hit = hit.any(axis=1)
        lchanged += np.bincount(lay, weights=row_hit, minlength=L).astype(np.int64)
        read_bytes += np.bincount(lay, weights=eb[lay[:, None], c.experts].sum(axis=1), minlength=L)
        key = (c.seq.astype(np.int64) << 32) | c.pos.astype(np.int64)
        changed.append(np.unique(key[row_hit]))
    n_tok = int(lrows.max()) if lrows.size else 0
    for r in rows:
        la = r["layer"]
        r.update(selections=int(sel[la]), dropped_selection_share=sel_dropped[la] / sel[la] if sel[la] else 0.0,
                 changed_token_share=lchanged[la] / lrows[la] if lrows[la] else 0.0)
    ptb = per_token_bytes(model, ebf)
    per_expert_tensors = {t.source.name for t in outs if t.entry.nbytes != t.source.nbytes}
    router_saved = sum(t.source.nbytes - t.entry.nbytes for t in outs if t.source.name in per_expert_tensors
                       and kind_of(split_name(t.source.name)[1]) != "routed_expert")
    kept_mean = sum(float(eb[la, ids].mean()) for la, ids in plan.keep.items())
    summary.update(
        trace=Path(trace).name, tokens=n_tok, selections=int(sel.sum()),
        dropped_selection_share=float(sel_dropped.sum() / sel.sum()) if sel.sum() else 0.0,
        changed_token_share=(len(np.unique(np.concatenate(changed))) / n_tok) if n_tok and changed else 0.0,
        # per layer over its own rows: qwen3moe's last layer sees only the output rows
        bytes_per_token_before=ptb["nonexpert_bytes_per_token"] + float((read_bytes / np.maximum(lrows, 1)).sum()),
        bytes_per_token_after=ptb["nonexpert_bytes_per_token"] - router_saved + k * kept_mean)
    return rows, summary

