"""Tensor and per-expert byte ranges: where every byte of every expert lives in the model file(s).

A 3-D ``*_exps`` tensor {ne0, ne1, n_expert} holds expert e at base + e*nb2 with nb2 = row_size*ne1; a block
never crosses a row, so the slices tile the tensor exactly. Per-expert biases {n, n_expert} and scales
{n_expert} are split along their last axis too, so every byte of an expert is attributed to it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .errors import GGUFFormatError
from .fingerprint import fingerprint  # noqa: F401  (re-exported: its home is gguf_experts.fingerprint)
from .gguf_file import Model, TensorInfo

COLUMNS = ["name", "base_name", "expert_id", "layer", "component", "ggml_type",
           "ne0", "ne1", "ne2", "ne3", "file", "offset", "size"]

_NAME_RE = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<comp>.+?)(?:\.weight)?$")

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


def split_name(name: str) -> tuple[int | None, str]:
    """(layer, component) of a tensor name: blk.3.ffn_up_exps.weight -> (3, 'ffn_up_exps')."""
    m = _NAME_RE.match(name)
    if m:
        return int(m["layer"]), m["comp"]
    return None, name[:-len(".weight")] if name.endswith(".weight") else name


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


def byte_map(model: Model, split_experts: bool = False) -> pd.DataFrame:
    """One row per tensor (or per expert slice with split_experts), in file order; columns COLUMNS."""
    cols: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    parts: list[pd.DataFrame] = []

    def flush() -> None:
        if cols["name"]:
            parts.append(pd.DataFrame(cols))
            for v in cols.values():
                v.clear()

    for t in model.tensors:
        layer, comp = split_name(t.name)
        ne = tuple(t.ne) + (1,) * (4 - len(t.ne))
        if split_experts and is_expert_tensor(t):
            flush()
            sp = expert_split(t)
            e = np.arange(sp.n_expert, dtype=np.int64)
            parts.append(pd.DataFrame({
                "name": [f"{t.name}[{i}]" for i in range(sp.n_expert)],
                "base_name": t.name, "expert_id": e, "layer": layer, "component": comp,
                "ggml_type": t.type.name, "ne0": sp.slice_ne[0], "ne1": sp.slice_ne[1],
                "ne2": sp.slice_ne[2], "ne3": sp.slice_ne[3], "file": t.file.name,
                "offset": t.offset + e * sp.slice_size, "size": np.full(sp.n_expert, sp.slice_size, np.int64),
            }))
            continue
        for c, v in zip(COLUMNS, (t.name, t.name, None, layer, comp, t.type.name, *ne, t.file.name,
                                  t.offset, t.nbytes)):
            cols[c].append(v)
    flush()
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    df["expert_id"] = df["expert_id"].astype("Int64")
    df["layer"] = df["layer"].astype("Int64")
    for c in ("ne0", "ne1", "ne2", "ne3", "offset", "size"):
        df[c] = df[c].astype(np.int64)
    return df[COLUMNS]


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


def memory_map(model: Model, df: pd.DataFrame) -> dict[str, Any]:
    """The JSON memory map: model facts plus one entry per row of the byte map."""
    m = model.summary()
    model_doc = {k: m[k] for k in ("architecture", "name", "n_layer", "n_expert", "n_expert_used",
                                   "expert_ff_length", "n_expert_shared", "n_leading_dense", "file_type")}
    model_doc["files"] = [{k: f[k] for k in ("file", "size", "data_offset", "alignment")} for f in m["files"]]
    shape = df[["ne0", "ne1", "ne2", "ne3"]].to_numpy().tolist()
    eid = df["expert_id"].astype(object).where(df["expert_id"].notna(), None).tolist()
    lay = df["layer"].astype(object).where(df["layer"].notna(), None).tolist()
    tensors = [
        {"name": n, "base_name": b, "expert_id": e, "layer": la, "component": c, "type": ty, "shape": s,
         "file": f, "offset_start": o, "size_bytes": z}
        for n, b, e, la, c, ty, s, f, o, z in zip(
            df["name"].tolist(), df["base_name"].tolist(), eid, lay, df["component"].tolist(),
            df["ggml_type"].tolist(), shape, df["file"].tolist(), df["offset"].tolist(), df["size"].tolist())
    ]
    return {"model": model_doc, "tensors": tensors}
