"""GGUF tensor names, parsed in one place: ``blk.N.<rest>`` is read here and nowhere else, so the reader, the
metadata check, the byte map, prune and the imatrix format agree on what a layer's tensor is."""
from __future__ import annotations

import re

_BLOCK = re.compile(r"blk\.(\d+)\.")
_LEGACY_EXPERT = re.compile(r"(ffn_gate|ffn_down|ffn_up)\.(\d+)\.weight")
_EXPS_WEIGHT = re.compile(r"(ffn_\w*_exps)\.weight")


def split_block(name: str) -> tuple[int | None, str]:
    """(layer, the rest of the name) for ``blk.N.rest``; (None, name) for a tensor outside the blocks."""
    m = _BLOCK.match(name)
    if m is None or m.end() == len(name):
        return None, name
    return int(m.group(1)), name[m.end():]


def layer_of(name: str) -> int | None:
    """The block (layer) a tensor belongs to: blk.3.ffn_up_exps.weight -> 3; None outside the blocks."""
    return split_block(name)[0]


def split_name(name: str) -> tuple[int | None, str]:
    """(layer, component) of a tensor name: blk.3.ffn_up_exps.weight -> (3, 'ffn_up_exps')."""
    layer, rest = split_block(name)
    return layer, rest[:-len(".weight")] if rest.endswith(".weight") and rest != ".weight" else rest


def legacy_expert(name: str) -> tuple[int, str, int] | None:
    """(layer, ffn, expert) of an old Mixtral-style per-expert tensor (blk.N.ffn_up.E.weight), else None."""
    layer, rest = split_block(name)
    m = _LEGACY_EXPERT.fullmatch(rest) if layer is not None else None
    return None if m is None else (layer, m.group(1), int(m.group(2)))  # type: ignore[return-value]


def exps_weight(name: str, suffix: str = "") -> tuple[int, str] | None:
    """(layer, component) of a merged expert weight ``blk.N.ffn_*_exps.weight`` + suffix (imatrix data adds
    ``.counts``, ``.in_sum2``), else None."""
    layer, rest = split_block(name)
    if layer is None or not rest.endswith(suffix):
        return None
    m = _EXPS_WEIGHT.fullmatch(rest[:len(rest) - len(suffix)])
    return None if m is None else (layer, m.group(1))
