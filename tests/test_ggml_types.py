"""The ggml type table against libggml (ground truth) and gguf-py (with its known differences listed)."""
from __future__ import annotations

import os
from pathlib import Path

import ggml_ref
import pytest

from gguf_experts.errors import GGUFExpertsError, UnsupportedTypeError
from gguf_experts.gguf.types import REMOVED, TYPE_COUNT, TYPES, by_name, ggml_type

needs_ggml = pytest.mark.skipif(not ggml_ref.installed(), reason="llama_cpp (libggml-base) is not importable")


def test_table_covers_every_id_once() -> None:
    assert TYPE_COUNT == 43
    assert set(TYPES) | set(REMOVED) == set(range(TYPE_COUNT))
    assert not set(TYPES) & set(REMOVED)
    assert sorted(REMOVED) == [4, 5, 31, 32, 33, 36, 37, 38]


@needs_ggml
@pytest.mark.parametrize("type_id", range(TYPE_COUNT))
def test_every_id_matches_libggml(type_id: int) -> None:
    name, blck, size = ggml_ref.type_traits(type_id)
    if type_id in REMOVED:
        assert blck == 0, "libggml marks removed ids with block size 0"
        with pytest.raises(UnsupportedTypeError):
            ggml_type(type_id)
        return
    t = ggml_type(type_id)
    assert (t.name.lower(), t.block_size, t.type_size) == (name.lower(), blck, size)


@needs_ggml
def test_removed_ids_are_the_ones_libggml_calls_removed() -> None:
    for type_id in range(TYPE_COUNT):
        name, blck, _ = ggml_ref.type_traits(type_id)
        assert (blck == 0) == (type_id in REMOVED), (type_id, name)
        if "REMOVED" in name:  # libggml's own words name the type we name
            assert REMOVED[type_id][0] in name


@pytest.mark.parametrize("type_id", sorted(REMOVED))
def test_removed_id_message_says_what_to_do(type_id: int) -> None:
    with pytest.raises(UnsupportedTypeError) as ei:
        ggml_type(type_id)
    msg = str(ei.value)
    assert str(type_id) in msg and REMOVED[type_id][0] in msg
    assert "removed" in msg and "llama.cpp" in msg and ("convert" in msg or "quantize" in msg)
    assert isinstance(ei.value, GGUFExpertsError)


@pytest.mark.parametrize("type_id", [43, 44, 100, 2**31 - 1, 2**32 - 1])
def test_unknown_id_names_the_id(type_id: int) -> None:
    with pytest.raises(UnsupportedTypeError, match=f"unknown ggml type id {type_id}") as ei:
        ggml_type(type_id)
    assert "upgrade" in str(ei.value)


def test_known_sizes_by_hand() -> None:
    # the ones a home-made dumper got wrong: MXFP4 is 17 bytes per 32 elements, not 2 or 4 bytes per element
    assert ggml_type(39).nbytes((2880, 2880, 32)) == 2880 // 32 * 17 * 2880 * 32
    assert by_name("q8_1").type_size == 36
    assert by_name("NVFP4").row_size(128) == 2 * 36
    assert by_name("Q2_0").block_size == 64 and by_name("Q1_0").block_size == 128
    with pytest.raises(UnsupportedTypeError, match="unknown ggml type name"):
        by_name("Q4_2")


# gguf-py 0.19's table differs from ggml here; everything else must agree.
GGUF_PY_DIFFERENCES = {
    "Q8_1": "gguf-py says (32, 40); ggml's block_q8_1 is 2 fp16 + 32 int8 = 36 bytes",
    "Q2_0": "missing from gguf-py (GGUFReader raises on type id 42)",
}


def test_against_gguf_py_with_known_differences() -> None:
    gguf = pytest.importorskip("gguf")
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    py_ids = {t.value: t for t in GGMLQuantizationType}
    found: dict[str, str] = {}
    for type_id, t in TYPES.items():
        qt = py_ids.get(type_id)
        if qt is None:
            found[t.name] = "missing"
            continue
        assert qt.name == t.name
        if GGML_QUANT_SIZES[qt] != (t.block_size, t.type_size):
            found[t.name] = f"{GGML_QUANT_SIZES[qt]}"
    assert found == {"Q8_1": "(32, 40)", "Q2_0": "missing"}, found
    assert set(found) == set(GGUF_PY_DIFFERENCES)
    # gguf-py also dropped the removed ids from its enum, as ggml did
    assert not set(REMOVED) & set(py_ids)
    assert gguf is not None


def test_the_oracle_is_the_library_llama_cpp_loads() -> None:
    """ggml_ref finds libggml-base where llama-cpp-python loads libllama from (its _base_path), and it is the
    very file mapped into this process."""
    import llama_cpp.llama_cpp as llama_lib

    path = ggml_ref.lib_path()
    assert path.parent.samefile(llama_lib._base_path) and path.name.startswith("libggml-base.so")
    assert any(path.samefile(m) for m in ggml_ref._mapped("ggml-base"))


def test_the_oracle_fails_loudly_when_the_library_is_elsewhere(tmp_path: Path) -> None:
    """LLAMA_CPP_LIB_PATH pointing at a directory without the libraries: an OracleMissing error, not a None
    that would turn the cross-checks off."""
    import subprocess
    import sys

    code = ("import ggml_ref\ntry:\n    ggml_ref.lib_path()\nexcept ggml_ref.OracleMissing as e:\n"
            "    print('missing:', e)\nelse:\n    print('found')\n")
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(tmp_path), "PYTHONPATH": str(Path(__file__).parent)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("missing:"), (r.stdout, r.stderr)
