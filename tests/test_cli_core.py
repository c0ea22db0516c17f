"""dump per format; bad input -> one stderr line and exit 2 (never a traceback, no big allocation, no
hang); the model file is never written; -o is atomic."""
from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from gguf_experts.gguf.types import GGMLType
from gguf_experts.gguf.writer import TensorSpec, encode_header, write_gguf, write_split

COLUMNS = "name,base_name,expert_id,layer,component,ggml_type,ne0,ne1,ne2,ne3,file,offset,size"
ARCH = {"general.architecture": "qwen3moe"}


def test_dump_csv(small_moe, run_cli) -> None:
    p = small_moe(n_layer=2, n_expert=4)
    r = run_cli("dump", p)
    assert r.rc == 0 and r.err == ""
    lines = r.out.splitlines()
    assert lines[0] == COLUMNS
    assert len(lines) == 1 + 1 + 2 * 6 + 2
    r = run_cli("dump", p, "--split-experts", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(r.out)))
    assert r.out.splitlines()[0] == COLUMNS and len(rows) == 1 + 2 * (3 + 3 * 4) + 2
    s = next(x for x in rows if x["name"] == "blk.1.ffn_down_exps.weight[3]")
    assert s == {"name": "blk.1.ffn_down_exps.weight[3]", "base_name": "blk.1.ffn_down_exps.weight",
                 "expert_id": "3", "layer": "1", "component": "ffn_down_exps", "ggml_type": "Q8_0",
                 "ne0": "32", "ne1": "64", "ne2": "1", "ne3": "1", "file": p.name,
                 "offset": s["offset"], "size": str(34 * 64)}
    first = next(x for x in rows if x["name"] == "blk.1.ffn_down_exps.weight[0]")
    assert int(s["offset"]) - int(first["offset"]) == 3 * 34 * 64
    top = next(x for x in rows if x["name"] == "output.weight")
    assert top["expert_id"] == "" and top["layer"] == ""


def test_dump_json_memory_map(small_moe, run_cli) -> None:
    p = small_moe(alignment=64)
    r = run_cli("dump", p, "--split-experts", "--format", "json")
    doc = json.loads(r.out)
    assert set(doc) == {"model", "tensors"}
    m = doc["model"]
    assert {"architecture", "name", "n_layer", "n_expert", "n_expert_used", "expert_ff_length", "files"} <= set(m)
    assert (m["architecture"], m["n_layer"], m["n_expert"], m["n_expert_used"], m["expert_ff_length"]) == \
        ("qwen3moe", 2, 4, 2, 32)
    assert m["files"] == [{"file": p.name, "size": p.stat().st_size, "data_offset": m["files"][0]["data_offset"],
                           "alignment": 64}]
    t = doc["tensors"][4]
    assert list(t) == ["name", "base_name", "expert_id", "layer", "component", "type", "shape", "file",
                       "offset_start", "size_bytes"]
    assert (t["name"], t["expert_id"], t["layer"], t["shape"], t["type"]) == \
        ("blk.0.ffn_gate_exps.weight[0]", 0, 0, [64, 32, 1, 1], "Q8_0")
    assert doc["tensors"][0]["expert_id"] is None and doc["tensors"][0]["offset_start"] == m["files"][0]["data_offset"]


def test_dump_table(small_moe, run_cli, tmp_path: Path) -> None:
    r = run_cli("dump", small_moe(), "--format", "table")
    assert r.rc == 0
    assert "bytes read per token at top-2" in r.out and "bytes per component" in r.out
    assert "routed_expert" in r.out and "bytes of one expert per layer" in r.out


def test_model_file_is_never_written(small_moe, run_cli, tmp_path: Path) -> None:
    p = small_moe()
    before = (p.read_bytes(), p.stat().st_mtime_ns, sorted(os.listdir(tmp_path)))
    for fmt in ("csv", "json", "table"):
        assert run_cli("dump", p, "--split-experts", "--format", fmt).rc == 0
    assert run_cli("check-overlaps", p).rc == 0
    assert (p.read_bytes(), p.stat().st_mtime_ns, sorted(os.listdir(tmp_path))) == before


def test_output_is_atomic(small_moe, run_cli, tmp_path: Path) -> None:
    p = small_moe()
    out = tmp_path / "out.csv"
    assert run_cli("dump", p, "-o", out).rc == 0
    good = out.read_text()
    assert good.startswith(COLUMNS)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(p.read_bytes()[:100])
    r = run_cli("dump", bad, "-o", out)
    assert r.rc == 2 and out.read_text() == good  # the old output survives an error
    r = run_cli("dump", bad, "-o", tmp_path / "new.csv")
    assert r.rc == 2 and not (tmp_path / "new.csv").exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# --- malformed files -----------------------------------------------------------------------------------

def header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def raw_tensors(*specs: TensorSpec) -> bytes:
    head, _, _ = encode_header(ARCH, list(specs))
    return head + b"\0" * 4096


PAD = b"\0" * 64  # enough bytes that the counts look possible, so the specific check is reached
BAD: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "empty file"),
    "bad_magic": (b"PK\x03\x04" + b"\0" * 60, "not a GGUF file"),
    "safetensors": (b"\x10\0\0\0\0\0\0\0{\"a\":1}" + b"\0" * 40, "not a GGUF file"),
    "v1": (header(0, 0, version=1), "version 1"),
    "v4": (header(0, 0, version=4), "unsupported GGUF version 4"),
    "only_magic": (b"GGUF", "truncated"),
    "removed_type": (raw_tensors(TensorSpec("w", (32, 2), GGMLType(31, "Q4_0_4_4", 32, 18))), "Q4_0_4_4 was removed"),
    "removed_q4_2": (raw_tensors(TensorSpec("w", (32, 2), GGMLType(4, "Q4_2", 32, 20))), "Q4_2"),
    "unknown_type": (raw_tensors(TensorSpec("w", (32, 2), GGMLType(43, "X", 1, 1))), "unknown ggml type id 43"),
    "huge_type": (raw_tensors(TensorSpec("w", (32, 2), GGMLType(2**32 - 1, "X", 1, 1))), "unknown ggml type id"),
    "five_dims": (raw_tensors(TensorSpec("w", (1, 1, 1, 1, 1), GGMLType(0, "F32", 1, 4))), "5 dimensions"),
    "zero_dims": (header(1, 0) + struct.pack("<Q", 1) + b"w" + struct.pack("<IIQ", 0, 0, 0) + b"\0" * 64,
                  "0 dimensions"),
    "ne0_not_block": (raw_tensors(TensorSpec.make("w", (33, 2), "Q8_0")), "not a multiple of Q8_0's block size 32"),
    "duplicate": (raw_tensors(TensorSpec.make("w", (4,), "F32"), TensorSpec.make("w", (4,), "F32")),
                  "duplicate tensor name 'w'"),
    "string_2e62": (header(0, 1) + struct.pack("<Q", 2**62) + b"key" + PAD, "claims 4611686018427387904 bytes"),
    "value_2e62": (header(0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IQ", 8, 2**62) + PAD, "claims"),
    "array_2e40": (header(0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**40) + PAD,
                   "claims 1099511627776 elements"),
    "strings_2e40": (header(0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2**40) + PAD, "claims"),
    "tensors_2e40": (header(2**40, 0) + b"\0" * 64, "tensor count 1099511627776 is impossible"),
    "kv_2e40": (header(0, 2**40) + b"\0" * 64, "metadata count 1099511627776 is impossible"),
    "bad_value_type": (header(0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 13) + PAD,
                       "unknown metadata value type 13"),
    "bad_alignment": (encode_header({"general.alignment": 48}, [])[0], "not a power of two"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_one_line_exit_2(tmp_path: Path, run_cli, case: str) -> None:
    data, what = BAD[case]
    p = tmp_path / f"{case}.gguf"
    p.write_bytes(data)
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        r = run_cli("dump", p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # a guard against hangs (2^40 iterations), not a speed test: generous for a loaded CI machine
    assert time.perf_counter() - t0 < 20.0, "absurd sizes must be refused before any work"
    assert peak < 16 * 2**20, f"{peak} bytes allocated for a {len(data)}-byte file"
    assert r.rc == 2 and r.out == ""
    assert r.err.count("\n") == 1 and r.err.startswith("gguf-experts: error: ") and what in r.err, r.err
    assert "Traceback" not in r.err and p.read_bytes() == data


def test_truncated_header_at_every_cut(tmp_path: Path, small_moe, run_cli) -> None:
    from gguf_experts.gguf.reader import read_header

    full = small_moe().read_bytes()
    h = read_header(tmp_path / "small.gguf")
    cuts = sorted(set(range(0, h.header_size, 7)) | {4, 7, 8, 15, 16, 23, 24, h.header_size - 1})
    for cut in cuts:
        p = tmp_path / "cut.gguf"
        p.write_bytes(full[:cut])
        r = run_cli("dump", p)
        assert r.rc == 2 and r.err.count("\n") == 1 and r.out == "", (cut, r.err)
        assert ("truncated" in r.err or "empty" in r.err or "claims" in r.err or "impossible" in r.err), (cut, r.err)


def test_missing_shard_cli(tmp_path: Path, run_cli) -> None:
    t = [TensorSpec.make(f"blk.{i}.ffn_up_exps.weight", (32, 2, 4), "Q8_0") for i in range(4)]
    paths = write_split(tmp_path, "Big", ARCH, t, 4)
    paths[2].unlink()
    r = run_cli("dump", paths[0])
    assert r.rc == 2 and "Big-00003-of-00004.gguf" in r.err and "missing" in r.err and r.err.count("\n") == 1


def test_directory_and_missing_path(tmp_path: Path, run_cli) -> None:
    r = run_cli("dump", tmp_path)
    assert r.rc == 2 and "directory" in r.err and r.err.count("\n") == 1
    r = run_cli("dump", tmp_path / "nope.gguf")
    assert r.rc == 2 and "no such file" in r.err and r.err.count("\n") == 1


@pytest.mark.parametrize("case", ["empty", "array_2e40", "removed_type"])
def test_real_entry_point_no_traceback(tmp_path: Path, case: str) -> None:
    data, what = BAD[case]
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    r = subprocess.run([sys.executable, "-m", "gguf_experts", "dump", str(p)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 2 and r.stdout == "" and what in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_valid_empty_model(tmp_path: Path, run_cli) -> None:
    p = write_gguf(tmp_path / "none.gguf", ARCH, [])
    r = run_cli("dump", p, "--split-experts")
    assert r.rc == 0 and r.out.strip() == COLUMNS
    assert run_cli("dump", p, "--format", "table").rc == 0
    assert json.loads(run_cli("dump", p, "--format", "json").out)["tensors"] == []


def test_big_endian_v2_dumps_like_little_endian(small_moe, run_cli) -> None:
    le = small_moe("le.gguf")
    be = small_moe("be.gguf", byteorder=">", version=2)
    a = run_cli("dump", le, "--split-experts").out
    b = run_cli("dump", be, "--split-experts").out
    assert a.replace("le.gguf", "X") == b.replace("be.gguf", "X") and len(a.splitlines()) == 34
    assert "GGUF v2 big-endian" in run_cli("dump", be, "--format", "table").out


def test_absurd_expert_count_cli(tmp_path: Path, run_cli) -> None:
    head, _, _ = encode_header(ARCH, [TensorSpec.make("blk.0.ffn_up_exps.weight", (1, 1, 2**40), "F32")])
    p = tmp_path / "absurd.gguf"
    p.write_bytes(head + b"\0" * 64)  # parses (a truncated file is check-overlaps' business), but ...
    assert run_cli("dump", p).rc == 0
    r = run_cli("dump", p, "--split-experts")  # ... 2^40 expert slices are refused, not allocated
    assert r.rc == 2 and "claims 1099511627776 experts" in r.err and r.err.count("\n") == 1
