"""One validation of the MoE metadata every command reads, before anything else touches the model.

A declarative table (gguf-py constants style) says which keys gguf-experts reads, the GGUF type
llama.cpp's loader demands for each (it refuses any other: ``key ... has wrong type``) and the range
llama.cpp accepts. The cross-field rules repeat the GGML_ASSERTs of ``llama_model::load_hparams``
(src/llama-model.cpp), so that ``capture`` never hands llama.cpp a file that aborts the process, and
``dump``/``check-overlaps`` do not silently accept a file llama.cpp cannot load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import GGUFFormatError
from .names import layer_of

if TYPE_CHECKING:
    from .reader import GGUFHeader, Model

#: src/llama-hparams.h of the llama.cpp that llama-cpp-python vendors (checked: 0.3.36)
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
U32_MAX = (1 << 32) - 1

# GGUF value type ids (gguf_file.ValueType; repeated here so this table is importable on its own)
UINT16, UINT32, INT32, STRING, ARRAY = 2, 4, 5, 8, 9
_TYPE_NAMES = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool", 8: "string",
               9: "array", 10: "u64", 11: "i64", 12: "f64"}


class MetadataError(GGUFFormatError):
    """Model metadata of the wrong type, out of llama.cpp's range, or inconsistent with the tensors."""


@dataclass(frozen=True)
class Key:
    """One metadata key: its name ({arch} = general.architecture), GGUF type and inclusive range."""

    name: str
    type: int
    lo: int | None = None
    hi: int | None = None
    why: str = ""


#: every key gguf-experts reads, with the type llama.cpp requires and the values it accepts
KEYS: tuple[Key, ...] = (
    Key("general.architecture", STRING),
    Key("general.name", STRING),
    Key("general.file_type", UINT32),
    Key("general.alignment", UINT32, 1, U32_MAX, "a power of two"),
    Key("{arch}.block_count", UINT32, 1, LLAMA_MAX_LAYERS, "LLAMA_MAX_LAYERS"),
    Key("{arch}.expert_count", UINT32, 0, LLAMA_MAX_EXPERTS, "LLAMA_MAX_EXPERTS"),
    Key("{arch}.expert_used_count", UINT32, 0, LLAMA_MAX_EXPERTS, "at most expert_count"),
    Key("{arch}.expert_feed_forward_length", UINT32, 0, U32_MAX),
    Key("{arch}.expert_shared_count", UINT32, 0, LLAMA_MAX_EXPERTS),
    Key("{arch}.leading_dense_block_count", UINT32, 0, LLAMA_MAX_LAYERS, "at most block_count"),
    Key("{arch}.embedding_length", UINT32, 0, U32_MAX),
    Key("{arch}.nextn_predict_layers", UINT32, 0, LLAMA_MAX_LAYERS, "at most block_count"),
    Key("{arch}.expert_group_count", UINT32, 0, LLAMA_MAX_EXPERTS, "less than expert_count"),
    Key("{arch}.expert_group_used_count", UINT32, 0, LLAMA_MAX_EXPERTS, "less than expert_group_count"),
    Key("split.no", UINT16),
    Key("split.count", UINT16),
    Key("split.tensors.count", INT32, 0, (1 << 31) - 1),
)


def _fail(where: str, what: str) -> MetadataError:
    return MetadataError(f"{where}: {what}; llama.cpp refuses or aborts on this file: fix the metadata "
                         "(gguf-py's gguf_set_metadata) or convert the model again")


def _show(v: Any) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def check_header(h: GGUFHeader) -> None:
    """Types and ranges of the keys in KEYS, in one file's header (each shard is checked)."""
    arch = h.kv.get("general.architecture")
    where = str(h.path)
    if "general.architecture" in h.kv and h.kv_types.get("general.architecture") != STRING:
        raise _fail(where, f"general.architecture is a {_TYPE_NAMES.get(h.kv_types['general.architecture'], '?')}, "
                    "not a string")
    for k in KEYS:
        if "{arch}" in k.name and not isinstance(arch, str):
            continue
        name = k.name.format(arch=arch)
        if name not in h.kv:
            continue
        vt, v = h.kv_types.get(name), h.kv[name]
        if vt == ARRAY and k.name == "{arch}.expert_used_count":
            raise MetadataError(f"{where}: {name} is a per-layer array; gguf-experts reads one top-k for all "
                                "layers and does not support this model yet")
        if vt != k.type:
            raise _fail(where, f"{name} = {_show(v)} is a {_TYPE_NAMES.get(vt or -1, str(vt))}, "
                        f"llama.cpp reads a {_TYPE_NAMES[k.type]}")
        if k.lo is not None and k.hi is not None and not k.lo <= v <= k.hi:
            raise _fail(where, f"{name} = {v} is outside [{k.lo}, {k.hi}]" + (f" ({k.why})" if k.why else ""))


def check_model(model: Model) -> None:
    """The cross-field rules llama.cpp asserts (load_hparams), and the metadata against the tensors."""
    for h in model.shards:
        check_header(h)
    where = str(model.path)
    arch = model.architecture
    kv = model.kv

    def get(key: str) -> int | None:
        v = kv.get(f"{arch}.{key}")
        return None if v is None else int(v)

    n_layer, n_expert, n_used = get("block_count"), get("expert_count") or 0, get("expert_used_count") or 0
    has_experts_key = f"{arch}.expert_count" in kv
    groups, group_used = get("expert_group_count") or 0, get("expert_group_used_count") or 0
    if n_used > n_expert:
        raise _fail(where, f"{arch}.expert_used_count = {n_used} exceeds {arch}.expert_count = {n_expert}")
    if n_expert and not n_used:
        raise _fail(where, f"{arch}.expert_count = {n_expert} but {arch}.expert_used_count is 0 or missing")
    if n_expert:
        if groups and groups >= n_expert:
            raise _fail(where, f"{arch}.expert_group_count = {groups} is not less than expert_count = {n_expert}")
        if groups > 1 and (n_expert % groups or not 0 < group_used < groups):
            raise _fail(where, f"{arch}.expert_group_count = {groups} / expert_group_used_count = {group_used}: "
                        "expert_count must be a multiple of the groups and 0 < used groups < groups")
    elif groups:
        raise _fail(where, f"{arch}.expert_group_count = {groups} in a model without experts")
    if n_layer is not None:
        for key in ("leading_dense_block_count", "nextn_predict_layers"):
            v = get(key)
            if v is not None and v > n_layer:
                raise _fail(where, f"{arch}.{key} = {v} exceeds {arch}.block_count = {n_layer}")
    _check_tensors(model, n_layer, n_expert if has_experts_key else None)


def _check_tensors(model: Model, n_layer: int | None, n_expert: int | None) -> None:
    """Layers and expert counts that the tensors imply must match the metadata where it states them (join
    sizes its arrays by it); a byte map needs only the tensors, so a file without the keys is not refused."""
    arch = model.architecture
    for t in model.tensors:
        layer = layer_of(t.name)
        if n_layer is not None and layer is not None and layer >= n_layer:
            raise _fail(str(t.file), f"tensor {t.name!r} is in layer {layer} but {arch}.block_count = {n_layer}")
        if n_expert is not None and len(t.ne) >= 3 and "_exps." in t.name and t.ne[2] != n_expert:
            raise _fail(str(t.file), f"tensor {t.name!r} holds {t.ne[2]} experts (ne[2]) but "
                        f"{arch}.expert_count = {n_expert}")
