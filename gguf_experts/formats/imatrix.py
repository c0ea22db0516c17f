"""llama-imatrix's GGUF output (tools/imatrix/imatrix.cpp, ``save_imatrix``) as expert counts.

Per matrix ``<tensor>`` the file holds ``<tensor>.in_sum2`` F32 {n_cols, n_mat} and ``<tensor>.counts`` F32
{1, n_mat}, names sorted, plus ``general.type = "imatrix"``, ``imatrix.datasets`` (string array),
``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32). For a ``*_exps`` tensor (a MUL_MAT_ID) n_mat is
n_expert and ``counts[e]`` is the number of (token, top-k slot) rows routed to expert e, taken from the
strided ids, for every token of every chunk (llama-imatrix requests all outputs). gate, up and down of a
layer see the same ids, so their counts are equal. Every chunk is one prefill: BOS at its first position.
Counts are stored as F32: exact up to 2^24 per expert.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import GGUFFormatError, InputError
from ..gguf.names import exps_weight
from .counts import PREFILL, ExpertCounts

PREFERRED = ("ffn_down_exps", "ffn_gate_up_exps", "ffn_up_exps", "ffn_gate_exps")


def is_imatrix(kv: dict[str, Any], names: list[str]) -> bool:
    return kv.get("general.type") == "imatrix" or "imatrix.chunk_count" in kv or any(
        n.endswith(".in_sum2") for n in names)


def _f32(path: str, offset: int, count: int, byteorder: str) -> np.ndarray:
    return np.fromfile(path, dtype=np.dtype(byteorder + "f4"), count=count, offset=offset)


def read_imatrix(path: str | os.PathLike[str], k: int | None = None) -> ExpertCounts:
    """Per (layer, expert) routing counts of an imatrix GGUF; tokens per layer = counts / k (k from the
    model), else chunk_count x chunk_size."""
    from ..gguf.reader import read_header

    where = str(path)
    h = read_header(path)
    if not is_imatrix(h.kv, [t.name for t in h.tensors]):
        raise InputError(f"{where}: a GGUF without imatrix data; pass llama-imatrix's output (or the model as "
                         "--model)")
    per: dict[int, dict[str, np.ndarray]] = {}
    for t in h.tensors:
        m = exps_weight(t.name, ".counts")
        if m is None:
            continue
        if t.type.name != "F32" or len(t.ne) < 2 or t.ne[0] != 1:
            raise GGUFFormatError(f"{where}: {t.name} is {t.type.name} {list(t.ne)}, expected F32 [1, n_expert]")
        n = int(np.prod(t.ne))
        if t.offset + 4 * n > h.file_size:
            raise GGUFFormatError(f"{where}: {t.name} data runs past the end of the file; the file is truncated")
        v = _f32(where, t.offset, n, h.byteorder)
        if not np.isfinite(v).all() or (v < 0).any() or (v != np.rint(v)).any():
            raise InputError(f"{where}: {t.name} holds values that are not counts (negative, fractional or "
                             "not finite); the file is damaged")
        per.setdefault(m[0], {})[m[1]] = v.astype(np.int64)
    if not per:
        raise InputError(f"{where}: imatrix has no *_exps.counts tensors (a dense model, or a legacy "
                         "imatrix without per-expert counts); nothing to say about experts")
    sizes = {len(v) for d in per.values() for v in d.values()}
    if len(sizes) != 1 or 1 in sizes:
        raise InputError(f"{where}: *_exps.counts tensors have {sorted(sizes)} entries; per-expert counts need "
                         "one entry per expert in every layer (legacy imatrix files have one)")
    n_expert = sizes.pop()
    n_layer = max(per) + 1
    out = ExpertCounts.empty(n_layer, n_expert, k=k, source="imatrix", phase_known=True)
    chunks, csize = int(h.kv.get("imatrix.chunk_count", 0) or 0), int(h.kv.get("imatrix.chunk_size", 0) or 0)
    for layer, comps in per.items():
        name = next(c for c in PREFERRED + tuple(sorted(comps)) if c in comps)
        ref = comps[name]
        for c, v in comps.items():
            if not np.array_equal(v, ref):
                raise InputError(f"{where}: blk.{layer}.{c} and blk.{layer}.{name} counts differ; their experts "
                                 "saw the same ids, so the file is inconsistent (merged from other models?)")
        out.counts[PREFILL, layer] = ref
        out.tokens[PREFILL, layer] = int(ref.sum()) // k if k else chunks * csize
    ds: Any = h.kv.get("imatrix.datasets") or []
    out.meta = {"chunk_count": chunks, "chunk_size": csize,
                "datasets": [str(d) for d in (ds.load() if hasattr(ds, "load") else ds)]}
    return out


def write_imatrix(path: str | os.PathLike[str], counts: ExpertCounts, model: Any, chunk_size: int = 0,
                  datasets: list[str] | None = None) -> None:
    """An imatrix GGUF with the model's *_exps tensors and these counts, laid out as llama-imatrix does.

    A routing trace has no activations, so ``in_sum2`` is set to the counts (mean square 1 for every column:
    a neutral importance, the same as quantizing without an imatrix); only the counts carry information."""
    from ..gguf.writer import TensorSpec, write_gguf

    kv_w: dict[str, Any] = {}
    exps = sorted((t for t in model.tensors if exps_weight(t.name) is not None
                   and len(t.ne) == 3), key=lambda t: t.name)
    if not exps:
        raise InputError(f"{model.path}: no *_exps expert tensors; an imatrix of expert counts needs a MoE model")
    tensors = []
    acts = counts.activations
    for t in exps:
        layer = int(t.name.split(".")[1])
        c = acts[layer].astype(np.float32) if layer < counts.n_layer else np.zeros(t.ne[2], np.float32)
        if len(c) != t.ne[2]:
            raise InputError(f"{t.name}: {t.ne[2]} experts in the model, {len(c)} in the counts")
        sum2 = np.repeat(c[:, None], t.ne[0], axis=1)  # {n_cols, n_expert}: row e is expert e
        tensors.append(TensorSpec.make(t.name + ".in_sum2", (t.ne[0], t.ne[2]), "F32", sum2.astype("<f4").tobytes()))
        tensors.append(TensorSpec.make(t.name + ".counts", (1, t.ne[2]), "F32", c.astype("<f4").tobytes()))
    tok = int(counts.tokens.sum(axis=0).max()) if counts.tokens.size else 0
    size = int(chunk_size) or max(tok, 1)
    kv_w["general.type"] = "imatrix"
    kv_w["imatrix.datasets"] = list(datasets or [counts.source or "gguf-experts"])
    kv_w["imatrix.chunk_count"] = tok // size
    kv_w["imatrix.chunk_size"] = size
    write_gguf(path, kv_w, tensors)
