"""Fuzz with well-typed wrong values (not random bytes): every metadata key we read, every trace header
and record field, every byte-map / expert-log column and JSONL value.

The bar for each example: exit 0/1 (a valid input or findings) or exit 2 with one line; never another
exception; under 20 s; allocations (tracemalloc's peak, numpy included) under 400 MB. The module runs in
CI with a fixed number of examples per test (about a minute in all on 2 cores)."""
from __future__ import annotations

import json
import math
import os
import struct
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_experts.cli import main
from gguf_experts.errors import GGUFExpertsError
from gguf_experts.gguf.fingerprint import fingerprint
from gguf_experts.gguf.reader import ValueType, open_model
from gguf_experts.gguf.writer import write_gguf
from gguf_experts.gguf.metadata import KEYS
from gguf_experts.trace.live.prompts import jsonl_texts
from gguf_experts.trace.format import MAGIC, REC_MARKER, RECORD_FIXED
from conftest import small_moe_kv, small_moe_tensors
from gguf_mutate import rewrite

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")), deadline=None,
                derandomize="FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_BYTES = 400 << 20
MAX_SECONDS = 20.0

U32_EDGES = [0, 1, 2, 3, 4, 511, 512, 513, 1023, 1024, 1025, 2**31 - 1, 2**31, 2**32 - 1]
INTS = st.one_of(st.sampled_from(U32_EDGES), st.integers(-(2**63), 2**64 - 1))
FLOATS = st.one_of(st.just(math.nan), st.just(math.inf), st.floats(allow_nan=False, allow_infinity=False, width=32))
TEXT = st.text(max_size=12)


def bounded(fn: Callable[[], Any]) -> Any:
    """Run fn under the bar: time and allocation peak; returns fn's result."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert time.perf_counter() - t0 < MAX_SECONDS
        assert peak < MAX_BYTES, peak


def cli(capsys: pytest.CaptureFixture[str], *argv: Any, ok: tuple[int, ...] = (0,)) -> int:
    """Exit ok (0, or 0/1 for check-overlaps) or 2 with one line; an exception fails the test."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:  # another package's warning is a line on stderr too
        warnings.simplefilter("always")
        rc = bounded(lambda: main([str(a) for a in argv]))
    assert not [w for w in caught if not w.category.__module__.startswith("gguf_experts")], \
        [str(w.message) for w in caught]
    lines = capsys.readouterr().err.splitlines()
    # documented: damaged tails etc., and "wrote FILE" for each file written
    warned = [ln for ln in lines if ln.startswith(("gguf-experts: warning: ", "wrote "))]
    errors = [ln for ln in lines if ln not in warned]
    one_error = len(errors) == 1 and errors[0].startswith("gguf-experts: error: ")
    assert (rc in ok and not errors) or (rc == 2 and one_error), (rc, lines)
    return rc


# --- metadata: every key of metadata.KEYS, well-typed values of every GGUF type --------------------------
def typed_value() -> st.SearchStrategy[tuple[ValueType, Any]]:
    return st.one_of(
        st.tuples(st.just(ValueType.UINT32), st.sampled_from(U32_EDGES) | st.integers(0, 2**32 - 1)),
        st.tuples(st.just(ValueType.INT32), st.integers(-(2**31), 2**31 - 1)),
        st.tuples(st.just(ValueType.UINT64), st.integers(0, 2**64 - 1)),
        st.tuples(st.just(ValueType.UINT16), st.integers(0, 2**16 - 1)),
        st.tuples(st.just(ValueType.FLOAT32), FLOATS),
        st.tuples(st.just(ValueType.BOOL), st.booleans()),
        st.tuples(st.just(ValueType.STRING), TEXT),
        st.tuples(st.just(ValueType.ARRAY), st.tuples(st.just(ValueType.UINT32),
                                                      st.lists(st.integers(0, 2**32 - 1), max_size=5))),
    )


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fz")
    return write_gguf(d / "base.gguf", small_moe_kv(2, 4), small_moe_tensors(2, 4))


@FUZZ
@given(changes=st.dictionaries(st.sampled_from([k.name.replace("{arch}", "qwen3moe") for k in KEYS
                                                if not k.name.startswith("split.")]),
                               typed_value(), min_size=1, max_size=3))
def test_metadata_values(base_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         changes: dict[str, tuple[ValueType, Any]]) -> None:
    p = rewrite(base_model, tmp_path / "fz.gguf", changes)
    for argv in (["dump", p, "--split-experts", "-o", tmp_path / "o.csv"], ["check-overlaps", p]):
        cli(capsys, *argv, ok=(0, 1))


# --- trace header fields and record fields -------------------------------------------------------------
FP_FIELDS = ("architecture", "n_layer", "n_expert", "n_expert_used", "tensor_digest", "type_digest")
JSON_VALUE = st.one_of(INTS, FLOATS.filter(math.isfinite), TEXT, st.booleans(), st.none(),
                       st.lists(st.integers(), max_size=3))


def trace_bytes(fp: dict[str, Any], records: list[tuple[int, ...]]) -> bytes:
    body = json.dumps({"format": "gguf-experts trace", "fingerprint": fp, "meta": {}}).encode()
    body += b" " * ((-(16 + len(body) + 4)) % 8)
    head = MAGIC + struct.pack("<II", 1, len(body)) + body
    out = head + struct.pack("<I", zlib.crc32(head))
    for marker, length, seq, phase, flags, layer, n, k, payload in records:
        rec = RECORD_FIXED.pack(marker, length, seq, phase, flags, 0, layer, n, k) + b"\1\0\0\0" * payload
        out += rec + struct.pack("<I", zlib.crc32(rec))  # the CRC is valid whatever the fields say
    return out


U32 = st.one_of(st.sampled_from(U32_EDGES), st.integers(0, 2**32 - 1))
RECORD = st.tuples(st.sampled_from([REC_MARKER, REC_MARKER, 0]), U32, st.integers(-(2**31), 2**31 - 1),
                   st.integers(0, 255), st.integers(0, 255), st.integers(-(2**31), 2**31 - 1), U32,
                   st.sampled_from([2, 2, 0, 1, 3, 2**31]), st.integers(0, 40))


@FUZZ
@given(fp_changes=st.dictionaries(st.sampled_from(FP_FIELDS), JSON_VALUE, max_size=2),
       records=st.lists(RECORD, max_size=4))
def test_trace_header_and_record_fields(base_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        fp_changes: dict[str, Any], records: list[tuple[int, ...]]) -> None:
    p = tmp_path / "fz.bin"
    good = fingerprint(open_model(base_model)).to_dict()  # the model's: join-trace gets past the fingerprint
    p.write_bytes(trace_bytes({**good, **fp_changes}, records))
    for argv in (["stats", p], ["convert", p, tmp_path / "o.csv"], ["reuse", p],
                 ["join-trace", p, "--model", base_model]):
        cli(capsys, *argv)


# --- byte-map columns (CSV and JSON) ---------------------------------------------------------------------
CELL = st.one_of(INTS.map(str), FLOATS.map(str), TEXT.filter(lambda s: "," not in s and "\n" not in s
                                                             and "\r" not in s and '"' not in s),
                 st.just(""), st.just("1" * 25))
COLS = ["name", "offset", "size", "expert_id", "file", "base_name", "start", "nbytes"]


@FUZZ
@given(cols=st.lists(st.sampled_from(COLS), min_size=1, max_size=5),
       rows=st.lists(st.lists(CELL, min_size=0, max_size=6), max_size=5))
def test_byte_map_csv_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str], cols: list[str],
                              rows: list[list[str]]) -> None:
    p = tmp_path / "m.csv"
    p.write_text(",".join(cols) + "\n" + "".join(",".join(r) + "\n" for r in rows))
    cli(capsys, "check-overlaps", p, ok=(0, 1))


@FUZZ
@given(tensors=st.lists(st.dictionaries(st.sampled_from(["name", "offset_start", "size_bytes", "expert_id",
                                                         "file", "offset", "size"]), JSON_VALUE), max_size=4),
       files=st.lists(st.dictionaries(st.sampled_from(["file", "size", "data_offset", "alignment"]), JSON_VALUE),
                      max_size=2),
       wrap=st.sampled_from(["doc", "list", "model-str"]))
def test_byte_map_json_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str], tensors: list[dict],
                              files: list[dict], wrap: str) -> None:
    doc: Any = {"model": {"files": files}, "tensors": tensors}
    if wrap == "list":
        doc = tensors
    elif wrap == "model-str":
        doc = {"model": "m", "tensors": tensors}
    p = tmp_path / "m.json"
    p.write_text(json.dumps(doc))
    cli(capsys, "check-overlaps", p, ok=(0, 1))


# --- expert-log columns ------------------------------------------------------------------------------------
@FUZZ
@given(detail=st.booleans(), rows=st.lists(st.lists(CELL, min_size=1, max_size=9), max_size=6))
def test_expert_log_columns(base_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], detail: bool,
                            rows: list[list[str]]) -> None:
    head = "seq,phase,pos,token,layer,expert_0,expert_1" if detail else "# token_id,layer_id,expert_0,expert_1"
    p = tmp_path / "log.csv"
    p.write_text(head + "\n" + "".join(",".join(r) + "\n" for r in rows))
    cli(capsys, "convert", p, tmp_path / "o.bin", "--model", base_model)


# --- JSONL records -------------------------------------------------------------------------------------------
RECORD_VALUE = st.recursive(JSON_VALUE, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.sampled_from(["role", "content"]), inner, max_size=2), max_leaves=6)


@FUZZ
@given(lines=st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["prompt", "response", "instruction", "input", "text", "messages", "answer"]),
                    RECORD_VALUE, max_size=3).map(json.dumps),
    st.sampled_from(['"\\ud800"', "[" * 5000, "9" * 5001, '{"prompt": "a", "prompt": "b"}', "{", "null"]),
), min_size=1, max_size=4))
def test_jsonl_values(tmp_path: Path, lines: list[str]) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    try:
        texts = bounded(lambda: jsonl_texts(p))
    except GGUFExpertsError as e:
        assert "\n" not in str(e) and str(p) in str(e)
    else:
        assert all(isinstance(t, str) and t.encode("utf-8") is not None for t in texts)
