"""Tensor and per-expert byte ranges: where every byte of every expert lives in the model file(s).

A 3-D ``*_exps`` tensor {ne0, ne1, n_expert} holds expert e at base + e*nb2 with nb2 = row_size*ne1; a block
never crosses a row, so the slices tile the tensor exactly. Per-expert biases {n, n_expert} and scales
{n_expert} are split along their last axis too, so every byte of an expert is attributed to it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import GGUFFormatError
from .names import split_name
from .reader import Model, TensorInfo

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["name", "base_name", "expert_id", "layer", "component", "ggml_type",
           "ne0", "ne1", "ne2", "ne3", "file", "offset", "size"]

# component pattern -> kind, first match wins (gguf-py-style declarative table).
KIND_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"_exps\b"), "routed_expert"),
    (re.compile(r"_shexp\b"), "shared_expert"),
    (re.compile(r"^ffn_gate_inp\b|^exp_probs_b\b"), "router"),
    (re.compile(r"^(ffn_gate|ffn_up|ffn_down)\b"), "dense_ffn"),
    (re.compile(r"^(attn|ssm|time_mix|channel_mix|wkv)"), "attention"),
    (re.compile(r"norm"), "norm"),
    (re.compile(r"^token_embd"), "token_embd"),
    (re.compile(r"^output$"), "output"),
]


def kind_of(component: str) -> str:
    for pat, kind in KIND_PATTERNS:
        if pat.search(component):
            return kind
    return "other"


def is_expert_tensor(t: TensorInfo) -> bool:
    """Per-expert tensors: *_exps with the expert on the last axis (1-D only where a block is one element)."""
    _, comp = split_name(t.name)
    if kind_of(comp) != "routed_expert":
        return False
    return len(t.ne) >= 2 or t.type.block_size == 1


@dataclass(frozen=True)
class ExpertSplit:
    n_expert: int
    slice_size: int
    slice_ne: tuple[int, int, int, int]


MAX_EXPERTS = 1 << 16  # real models have up to a few hundred; more means a corrupt shape, not a model


def expert_split(t: TensorInfo) -> ExpertSplit:
    ne = tuple(t.ne) + (1,) * (4 - len(t.ne))
    last = len(t.ne) - 1
    n = int(t.ne[last])
    if n > MAX_EXPERTS:
        raise GGUFFormatError(f"{t.file}: tensor {t.name!r} shape {list(t.ne)} claims {n} experts (more than "
                              f"{MAX_EXPERTS}); the file is corrupt: download or convert it again")
    row_ne = [1, 1, 1, 1]
    for d in range(last):
        row_ne[d] = int(ne[d])
    size = t.nbytes // n if n else 0
    return ExpertSplit(n, size, tuple(row_ne))  # type: ignore[arg-type]


def byte_columns(model: Model, split_experts: bool = False) -> dict[str, list[Any]]:
    """The byte map as plain column lists (COLUMNS; None where a tensor has no layer or expert id).

    Pandas-free on purpose: ``dump`` writes these directly, so a shell loop over shards does not pay for
    importing pandas; :func:`byte_map` makes the DataFrame library users get from the same columns.
    """
    cols: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    (names, bases, eids, layers, comps, types, ne0, ne1, ne2, ne3, files, offsets, sizes) = cols.values()
    for t in model.tensors:
        layer, comp = split_name(t.name)
        if split_experts and is_expert_tensor(t):
            sp = expert_split(t)
            n = sp.n_expert
            names.extend([f"{t.name}[{i}]" for i in range(n)])
            eids.extend(range(n))
            offsets.extend(range(t.offset, t.offset + n * sp.slice_size, sp.slice_size) if sp.slice_size
                           else [t.offset] * n)
            ne = sp.slice_ne
            for col, v in ((bases, t.name), (layers, layer), (comps, comp), (types, t.type.name), (ne0, ne[0]),
                           (ne1, ne[1]), (ne2, ne[2]), (ne3, ne[3]), (files, t.file.name), (sizes, sp.slice_size)):
                col.extend([v] * n)
            continue
        shape = tuple(t.ne) + (1,) * (4 - len(t.ne))
        for col, v in zip(cols.values(), (t.name, t.name, None, layer, comp, t.type.name, *shape, t.file.name,
                                          t.offset, t.nbytes)):
            col.append(v)
    return cols


def byte_map(model: Model, split_experts: bool = False) -> pd.DataFrame:
    """One row per tensor (or per expert slice with split_experts), in file order; columns COLUMNS."""
    import numpy as np
    import pandas as pd

    cols = byte_columns(model, split_experts)
    if not cols["name"]:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    data: dict[str, Any] = dict(cols)
    for c in ("expert_id", "layer"):
        data[c] = pd.array(cols[c], dtype="Int64")
    for c in ("ne0", "ne1", "ne2", "ne3", "offset", "size"):
        data[c] = np.asarray(cols[c], dtype=np.int64)
    return pd.DataFrame(data, columns=COLUMNS)


def expert_slices(model: Model) -> pd.DataFrame:
    """Only the per-expert slices (rows with an expert_id), for join and analysis."""
    parts = []
    for t in model.tensors:
        if is_expert_tensor(t):
            parts.append(t)
    sub = Model(model.shards, parts)
    df = byte_map(sub, split_experts=True)
    return df[df["expert_id"].notna()].reset_index(drop=True)


def expert_bytes(model: Model) -> pd.DataFrame:
    """Bytes of each (layer, expert) summed over its slices: what one activation reads."""
    s = expert_slices(model)
    g = s.groupby(["layer", "expert_id"], sort=True)["size"].sum().reset_index()
    return g.rename(columns={"expert_id": "expert", "size": "bytes"})


def component_summary(model: Model) -> pd.DataFrame:
    """Bytes per component kind, for people."""
    import pandas as pd

    rows = []
    for t in model.tensors:
        _, comp = split_name(t.name)
        rows.append((kind_of(comp), t.nbytes))
    df = pd.DataFrame(rows, columns=["kind", "bytes"])
    g = df.groupby("kind")["bytes"].agg(["count", "sum"]).reset_index()
    g.columns = ["kind", "tensors", "bytes"]
    total = g["bytes"].sum()
    g["share"] = g["bytes"] / total if total else 0.0
    return g.sort_values("bytes", ascending=False, ignore_index=True)


def per_token_bytes(model: Model, eb: pd.DataFrame | None = None) -> dict[str, int]:
    """Weight bytes one token reads at top-k: all non-expert weights (one row of token_embd), k experts
    per MoE layer; versus the whole model."""
    total = sum(t.nbytes for t in model.tensors)
    dense = 0
    for t in model.tensors:
        _, comp = split_name(t.name)
        if is_expert_tensor(t):
            continue
        if kind_of(comp) == "token_embd":
            dense += t.row_size
        else:
            dense += t.nbytes
    if eb is None:  # callers that already have expert_bytes(model) pass it in
        eb = expert_bytes(model)
    k = model.expert_used_count
    experts_per_token = int(eb.groupby("layer")["bytes"].mean().sum() * k) if len(eb) else 0
    all_experts = int(eb["bytes"].sum()) if len(eb) else 0
    return {"model_bytes": total, "nonexpert_bytes_per_token": dense, "expert_bytes_per_token": experts_per_token,
            "bytes_per_token": dense + experts_per_token, "all_expert_bytes": all_experts, "n_expert_used": k}


def memory_map(model: Model, cols: dict[str, list[Any]]) -> dict[str, Any]:
    """The JSON memory map: model facts plus one entry per row of the byte map (:func:`byte_columns`)."""
    m = model.summary()
    model_doc = {k: m[k] for k in ("architecture", "name", "n_layer", "n_expert", "n_expert_used",
                                   "expert_ff_length", "n_expert_shared", "n_leading_dense", "file_type")}
    model_doc["files"] = [{k: f[k] for k in ("file", "size", "data_offset", "alignment")} for f in m["files"]]
    shape = [list(s) for s in zip(cols["ne0"], cols["ne1"], cols["ne2"], cols["ne3"])]
    tensors = [
        {"name": n, "base_name": b, "expert_id": e, "layer": la, "component": c, "type": ty, "shape": s,
         "file": f, "offset_start": o, "size_bytes": z}
        for n, b, e, la, c, ty, s, f, o, z in zip(
            cols["name"], cols["base_name"], cols["expert_id"], cols["layer"], cols["component"],
            cols["ggml_type"], shape, cols["file"], cols["offset"], cols["size"])
    ]
    return {"model": model_doc, "tensors": tensors}
