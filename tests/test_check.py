"""check-overlaps: planted overlaps, truncation, misalignment, untiled slices, gaps and loader-offset
violations are found (and nothing on clean files); third-party CSVs; exit codes 0/1/2."""
from __future__ import annotations

import json
import os
from pathlib import Path

import ggml_ref
import pandas as pd
import pytest

from gguf_experts.gguf.check import check, check_paths, load_ranges
from gguf_experts.gguf.writer import TensorSpec, write_gguf
from shapes import SHAPES

HAVE_GGML = ggml_ref.installed()


def ggml_accepts(p: Path) -> bool:
    """Whether libggml's own GGUF loader accepts the file (it checks each tensor's offset)."""
    return ggml_ref.read_ref(p) is not None

E = 4
Q8 = 34 * 2 * 16  # one expert of a {64, 16, E} Q8_0 tensor


def specs() -> list[TensorSpec]:
    return [TensorSpec.make("blk.0.attn_q.weight", (64, 8), "F32"),  # 2048 bytes
            TensorSpec.make("blk.0.ffn_up_exps.weight", (64, 16, E), "Q8_0"),  # 4 x 1088 bytes
            TensorSpec.make("blk.0.ffn_norm.weight", (40,), "F32")]  # 160 bytes


def write(tmp_path: Path, offsets: list[int] | None = None, name: str = "m.gguf", alignment: int = 32) -> Path:
    return write_gguf(tmp_path / name, {"general.architecture": "qwen3moe", "qwen3moe.expert_count": E,
                                            "qwen3moe.expert_used_count": 2}, specs(),
                      offsets=offsets, alignment=alignment)


def kinds(df: pd.DataFrame) -> dict[str, int]:
    return df["kind"].value_counts().to_dict() if len(df) else {}


def test_clean_model_and_its_maps(tmp_path: Path, run_cli) -> None:
    p = write(tmp_path)
    assert kinds(check_paths([str(p)])) == {}
    if HAVE_GGML:
        assert ggml_accepts(p)
    r = run_cli("check-overlaps", p, "-f", "table")
    assert r.rc == 0 and r.out.startswith("clean") and r.err == ""
    for fmt in ("csv", "json"):
        out = tmp_path / f"map.{fmt}"
        assert run_cli("dump", p, "--split-experts", "--format", fmt, "-o", out).rc == 0
        r = run_cli("check-overlaps", out, "--format", "json")
        doc = json.loads(r.out)
        assert r.rc == 0 and doc.pop("not_run") and doc == {"clean": True, "findings": []}
        r = run_cli("check-overlaps", out, "-f", "table")  # a map does not say all a GGUF does: the table says
        # what did not run
        assert r.rc == 0 and not r.out.startswith("clean") and "loader_offset" in r.out and "pass the GGUF" in r.out
        assert ("misaligned (no alignment" in r.out) == (fmt == "csv")  # the JSON map lists files and alignment
        r = run_cli("check-overlaps", out, "--alignment", "32", "--file-size", p.stat().st_size, "-f", "json")
        assert json.loads(r.out)["not_run"] == [f"{out}: not checked: loader_offset (needs the GGUF's "
                                                "tensor-info order); pass the GGUF instead"]


def test_planted_overlap(tmp_path: Path, run_cli) -> None:
    p = write(tmp_path, offsets=[0, 2048 - 100, 2048 + 4 * Q8])  # the expert tensor starts 100 bytes early
    f = check_paths([str(p)])
    ov = f[f["kind"] == "overlap"]
    assert len(ov) == 1
    r = ov.iloc[0]
    assert (r["name"], r["other"]) == ("blk.0.ffn_up_exps.weight[0]", "blk.0.attn_q.weight")
    assert r["bytes"] == 100 and r["end"] - r["start"] == 100
    assert "loader_offset" in kinds(f) and "misaligned" in kinds(f)
    res = run_cli("check-overlaps", p, "--format", "csv")
    assert res.rc == 1 and "overlap" in res.out and "blk.0.attn_q.weight" in res.out


def test_truncated_download(tmp_path: Path, run_cli) -> None:
    p = write(tmp_path)
    dump = tmp_path / "m.csv"
    assert run_cli("dump", p, "--split-experts", "-o", dump).rc == 0
    size = p.stat().st_size
    os.truncate(p, size - 1000)
    for src in (p, dump):  # the GGUF itself and a byte map next to it
        f = check_paths([str(src)])
        pe = f[f["kind"] == "past_eof"]
        assert pe["name"].tolist() == ["blk.0.ffn_up_exps.weight[3]", "blk.0.ffn_norm.weight"], src
        assert pe["bytes"].sum() == 1000 and "truncated" in pe["detail"].iloc[0]
    assert run_cli("check-overlaps", p).rc == 1


def test_misaligned_and_gap_and_loader_order(tmp_path: Path) -> None:
    a = 2048 + 4 * Q8
    f = check_paths([str(write(tmp_path, offsets=[0, 2048 + 8, a + 64]))])  # +8: misaligned, then a gap
    k = kinds(f)
    assert k["misaligned"] == 1 and f.loc[f["kind"] == "misaligned", "name"].iloc[0] == "blk.0.ffn_up_exps.weight[0]"
    assert "gap" in k and k["loader_offset"] == 2
    g = check_paths([str(write(tmp_path, offsets=[0, 2048, a + 4096], name="gap.gguf"))])
    assert kinds(g) == {"gap": 1, "loader_offset": 1}
    gap = g[g["kind"] == "gap"].iloc[0]
    assert (gap["name"], gap["bytes"], gap["end"] - gap["start"]) == ("blk.0.ffn_norm.weight", 4096, 4096)
    # data in another order than the tensor infos: no overlap, no gap, but llama.cpp refuses it
    sw = write(tmp_path, offsets=[160, 160 + 2048, 0], name="sw.gguf")
    assert kinds(check_paths([str(sw)])) == {"loader_offset": 2}
    if HAVE_GGML:  # llama.cpp's loader agrees: it refuses every file we flag with loader_offset
        assert not ggml_accepts(sw) and not ggml_accepts(tmp_path / "gap.gguf")


def test_untiled_slices_in_a_byte_map(tmp_path: Path, run_cli) -> None:
    p = write(tmp_path)
    dump = tmp_path / "m.csv"
    assert run_cli("dump", p, "--split-experts", "-o", dump).rc == 0
    df = pd.read_csv(dump)
    bad = df[df["name"] != "blk.0.ffn_up_exps.weight[2]"]  # a slice left out
    bad.to_csv(tmp_path / "missing.csv", index=False)
    f = check_paths([str(tmp_path / "missing.csv")])
    nt = f[f["kind"] == "not_tiled"]
    assert nt["name"].tolist() == ["blk.0.ffn_up_exps.weight[3]"] and "missing" in nt["detail"].iloc[0]
    assert "gap" in kinds(f)
    resized = df.copy()  # a dumper that got the slice size wrong (2 bytes/element): overlaps + untiled
    m = resized["expert_id"].notna()
    resized.loc[m, "offset"] = resized.loc[m, "offset"].min() + resized.loc[m, "expert_id"] * 64 * 16 * 2
    resized.loc[m, "size"] = 64 * 16 * 2
    resized.to_csv(tmp_path / "resized.csv", index=False)
    f = check_paths([str(tmp_path / "resized.csv")])
    assert set(kinds(f)) == {"overlap", "past_eof"}  # slices tile each other; without the model only this shows
    assert run_cli("check-overlaps", tmp_path / "resized.csv").rc == 1


def test_slices_against_the_model(tmp_path: Path) -> None:
    rs = load_ranges(write(tmp_path))
    sl = rs.ranges["expert_id"].notna()
    rs.ranges.loc[sl, "size"] = rs.ranges.loc[sl, "size"] - 2  # slices tile each other but not the tensor
    eid = rs.ranges.loc[sl, "expert_id"].astype(int)
    rs.ranges.loc[sl, "offset"] = rs.ranges.loc[sl, "offset"].min() + eid * (Q8 - 2)
    f = check(rs)
    assert f.loc[f["kind"] == "not_tiled", "name"].tolist() == ["blk.0.ffn_up_exps.weight"]


def test_third_party_csv(tmp_path: Path, run_cli) -> None:
    ok = tmp_path / "ok.csv"
    ok.write_text("Name,Offset,Size\na,0,100\nb,128,50\n")
    assert run_cli("check-overlaps", ok).rc == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("name,offset,size\na,0,100\nb,64,100\nc[0],170,10\nc[1],180,10\nc[3],200,10\n")
    f = check_paths([str(bad)])
    assert kinds(f) == {"overlap": 1, "not_tiled": 1}
    ov = f[f["kind"] == "overlap"].iloc[0]
    assert (ov["name"], ov["other"], ov["start"], ov["end"]) == ("b", "a", 64, 100)
    r = run_cli("check-overlaps", bad, ok, "--format", "json")
    assert r.rc == 1 and {x["source"] for x in json.loads(r.out)["findings"]} == {str(bad)}


@pytest.mark.parametrize("content,what", [
    ("name,size\na,1\n", "missing column"), ("name,offset,size\na,x,1\n", "not a byte count"),
    ("name,offset,size\na,999999999999999999999,1\n", "not a byte count"),
    ("name,offset,size\na,0,1.5\n", "not a byte count"), ("name,offset,size\na,0,-4\n", "not a byte count"),
    ("name,offset,size,expert_id\na,0,1,2.5\n", "not an expert index"),
    ("name,offset,size\na[99999999999999999999999],0,1\n", "not an expert index"),
    ('{"nothing": 1}', "no 'tensors' list"), ("{broken", "not valid JSON"), ("", "empty file"),
])
def test_unreadable_inputs_exit_2(tmp_path: Path, run_cli, content: str, what: str) -> None:
    p = tmp_path / "in.csv"
    p.write_text(content)
    r = run_cli("check-overlaps", p)
    assert r.rc == 2 and r.out == "" and what in r.err and r.err.count("\n") == 1


def test_missing_input_exit_2(tmp_path: Path, run_cli) -> None:
    r = run_cli("check-overlaps", tmp_path / "nope.gguf")
    assert r.rc == 2 and "no such file" in r.err and r.err.count("\n") == 1


def test_realistic_shapes_are_clean(tmp_path: Path) -> None:
    paths = [str(SHAPES[k]().write(tmp_path)) for k in ("gpt-oss-20b", "deepseek-v3")]
    assert kinds(check_paths(paths)) == {}


def test_a_third_party_map_says_what_it_could_not_check(tmp_path: Path, run_cli) -> None:
    """name,offset,size with a misaligned row: not called clean; with --alignment the row is found."""
    p = tmp_path / "third.csv"
    p.write_text("name,offset,size\na,0,100\nb,100,28\n")
    r = run_cli("check-overlaps", p, "-f", "table")
    assert r.rc == 0 and "clean" not in r.out and "misaligned (no alignment" in r.out and "past_eof" in r.out
    r = run_cli("check-overlaps", p, "--alignment", "32", "--file-size", "120", "-f", "json")
    doc = json.loads(r.out)
    assert r.rc == 1 and {f["kind"] for f in doc["findings"]} == {"misaligned", "past_eof"}
    for bad, what in ((["--alignment", "24"], "power of two"), (["--file-size", "-1"], "must be >= 0")):
        r = run_cli("check-overlaps", p, *bad)
        assert r.rc == 2 and what in r.err and r.err.count("\n") == 1


MAP = {"model": {"files": [{"file": "m.gguf", "size": 4096, "data_offset": 64, "alignment": 32}]},
       "tensors": [{"name": "a", "offset_start": 64, "size_bytes": 32}]}


@pytest.mark.parametrize("content,what", [
    ("[[1, 2, 3]]", "tensors[0] is a list"),
    (json.dumps({**MAP, "model": "m"}), "'model' is a str"),
    (json.dumps({**MAP, "model": {"files": "x"}}), "model.files is not a list"),
    (json.dumps({**MAP, "model": {"files": [{"file": "m.gguf", "alignment": "32"}]}}), "alignment = '32'"),
    (json.dumps({**MAP, "model": {"files": [{"file": "m.gguf", "alignment": 24}]}}), "power of two"),
    (json.dumps({**MAP, "model": {"files": [{"file": "m.gguf", "size": True}]}}), "size = True"),
    (json.dumps({**MAP, "tensors": [{"name": "a", "offset_start": "x", "size_bytes": 32}]}), "not a byte count"),
    (json.dumps({**MAP, "tensors": [{"name": "a", "offset_start": [1], "size_bytes": 32}]}), "not a byte count"),
    (json.dumps({**MAP, "tensors": [{"name": "a", "offset_start": 0, "size_bytes": {"a": 1}}]}), "not a byte count"),
    ('{"tensors": [{"name": "a", "offset": 1' + "0" * 25 + ', "size": 1}]}', "26 digits"),
    ('{"tensors": [], "tensors": []}', "duplicate key"),
    ("name,offset,start,size\na,0,0,4\n", "both mean 'offset'"),
    ("name,name,offset,size\na,b,0,4\n", "both mean 'name'"),
    ("name,offset,size\na,0,4,extra\n", "line 2: malformed CSV (4 fields, the header has 3)"),
    ("name,offset,size\na,0,4\nb,4\n", "line 3: malformed CSV (2 fields"),
    ('name,offset,size\n"a,b",0,4\n"c",4\n', "line 3: malformed CSV (2 fields"),
    ("name,offset,size\na,True,4\n", "not a byte count"),
])
def test_malformed_maps_are_one_line(tmp_path: Path, run_cli, content: str, what: str) -> None:
    p = tmp_path / "in.map"
    p.write_text(content)
    r = run_cli("check-overlaps", p)
    assert r.rc == 2 and r.out == "" and what in r.err and r.err.count("\n") == 1 and str(p) in r.err, r.err


def test_non_utf8_and_binary_maps(tmp_path: Path, run_cli) -> None:
    p = tmp_path / "latin1.csv"
    p.write_bytes(b"name,offset,size\ncaf\xe9,0,4\n")
    r = run_cli("check-overlaps", p)
    assert r.rc == 2 and "line 2: byte 0xE9 is not UTF-8" in r.err and r.err.count("\n") == 1
    p.write_bytes(b"name,offset,size\n\x00\x01")
    r = run_cli("check-overlaps", p)
    assert r.rc == 2 and "binary file" in r.err
