"""The ggml type-traits table as data: id -> (name, block size, bytes per block).

Checked against libggml-base (``ggml_blck_size`` / ``ggml_type_size``) of llama-cpp-python 0.3.36; the tests
compare it with the installed libggml wherever llama-cpp-python is present, and with gguf-py's table,
listing the known differences (gguf-py says Q8_1 is 40 bytes per block, ggml says 36; gguf-py lacks Q2_0).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedTypeError


@dataclass(frozen=True)
class GGMLType:
    id: int
    name: str
    block_size: int
    type_size: int

    def row_size(self, ne0: int) -> int:
        """Bytes of one row of ne0 elements; ne0 must be a multiple of the block size."""
        return ne0 // self.block_size * self.type_size

    def nbytes(self, ne: tuple[int, ...] | list[int]) -> int:
        n = self.row_size(int(ne[0]))
        for d in ne[1:]:
            n *= int(d)
        return n


# id: (name, block size, type size). Keep in id order; gaps are removed ids (see REMOVED).
_LIVE: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}

# Removed ids: what they were and what to do. ggml's loader rejects them, so do we.
_REQUANT = "convert or quantize the model again with a current llama.cpp"
REMOVED: dict[int, tuple[str, str]] = {
    4: ("Q4_2", f"Q4_2 was removed from ggml in 2023; {_REQUANT}"),
    5: ("Q4_3", f"Q4_3 was removed from ggml in 2023; {_REQUANT}"),
    31: ("Q4_0_4_4", f"Q4_0_4_4 was removed from ggml (Q4_0 is now repacked at load time); {_REQUANT}"),
    32: ("Q4_0_4_8", f"Q4_0_4_8 was removed from ggml (Q4_0 is now repacked at load time); {_REQUANT}"),
    33: ("Q4_0_8_8", f"Q4_0_8_8 was removed from ggml (Q4_0 is now repacked at load time); {_REQUANT}"),
    36: ("IQ4_NL_4_4", f"IQ4_NL_4_4 was removed from ggml (IQ4_NL is now repacked at load time); {_REQUANT}"),
    37: ("IQ4_NL_4_8", f"IQ4_NL_4_8 was removed from ggml (IQ4_NL is now repacked at load time); {_REQUANT}"),
    38: ("IQ4_NL_8_8", f"IQ4_NL_8_8 was removed from ggml (IQ4_NL is now repacked at load time); {_REQUANT}"),
}

TYPE_COUNT = 43  # GGML_TYPE_COUNT: ids >= this are unknown

TYPES: dict[int, GGMLType] = {i: GGMLType(i, n, b, s) for i, (n, b, s) in _LIVE.items()}
BY_NAME: dict[str, GGMLType] = {t.name: t for t in TYPES.values()}


def ggml_type(type_id: int) -> GGMLType:
    """The traits of a type id, or an UnsupportedTypeError that says what happened and what to do."""
    t = TYPES.get(type_id)
    if t is not None:
        return t
    if type_id in REMOVED:
        name, advice = REMOVED[type_id]
        raise UnsupportedTypeError(f"ggml type id {type_id} ({name}) is not supported: {advice}")
    raise UnsupportedTypeError(
        f"unknown ggml type id {type_id} (this table knows 0..{TYPE_COUNT - 1}); "
        "the file may be corrupt or newer than gguf-experts: upgrade gguf-experts"
    )


def by_name(name: str) -> GGMLType:
    try:
        return BY_NAME[name.upper()]
    except KeyError:
        raise UnsupportedTypeError(f"unknown ggml type name {name!r}; known: {', '.join(BY_NAME)}") from None
