"""Bad input, generalised (issue 17 item 5): every split.* key is checked against the files present, and
degenerate trace records (no rows) and traces (no rows at all) get an explicit rule: an error where we write,
a warning where we read, never silence. The rules are in README ("Split models") and docs/trace-format.md
("Degenerate records")."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gguf_experts.cli import main
from gguf_experts.errors import InputError, ShardError
from gguf_experts.gguf.metadata import MetadataError
from gguf_experts.gguf.fingerprint import ModelFingerprint
from gguf_experts.gguf.reader import ShardWarning, ValueType as V, open_model
from gguf_experts.gguf.writer import TensorSpec, write_gguf
from gguf_experts.trace.format import EmptyRecordsWarning
from gguf_experts.trace.reader import iter_trace_chunks, read_trace
from gguf_experts.trace.writer import TraceWriter, encode_records

ARCH = {"general.architecture": "qwen3moe", "qwen3moe.block_count": (V.UINT32, 6),
        "qwen3moe.expert_count": (V.UINT32, 4), "qwen3moe.expert_used_count": (V.UINT32, 2)}
TENSORS = [TensorSpec.make(f"blk.{i}.ffn_up_exps.weight", (64, 32, 4), "Q8_0") for i in range(6)]


def _split(tmp_path: Path, n: int = 3, keys: Callable[[int], dict[str, Any]] | None = None) -> list[Path]:
    """Shards as llama-gguf-split writes them (metadata in the first, the three split keys in each), with
    ``keys(i)`` merged into shard i's metadata (a value None removes the key)."""
    per = -(-len(TENSORS) // n)
    paths = []
    for i in range(n):
        kv: dict[str, Any] = {**(ARCH if i == 0 else {}), "split.no": (V.UINT16, i), "split.count": (V.UINT16, n),
                              "split.tensors.count": (V.INT32, len(TENSORS))}
        kv.update(keys(i) if keys else {})
        kv = {k: v for k, v in kv.items() if v is not None}
        paths.append(write_gguf(tmp_path / f"M-{i + 1:05d}-of-{n:05d}.gguf", kv, TENSORS[i * per:(i + 1) * per]))
    return paths


def _refused(paths: list[Path], match: str) -> None:
    """Every shard opens to the same error: the check does not depend on the file the user names."""
    for p in paths:
        with pytest.raises(ShardError, match=match):
            open_model(p)


def test_well_formed_split_opens_from_any_shard(tmp_path: Path) -> None:
    paths = _split(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(len(open_model(p).tensors) == 6 for p in paths)


def test_split_count_of_every_shard(tmp_path: Path) -> None:
    _refused(_split(tmp_path, keys=lambda i: {"split.count": (V.UINT16, 2)} if i == 2 else {}),
             r"M-00003-of-00003.gguf: split.count = 2 but the file names? says? 3 shards")


def test_first_shard_needs_split_count(tmp_path: Path) -> None:
    _refused(_split(tmp_path, keys=lambda i: {"split.count": None} if i == 0 else {}),
             r"M-00001-of-00003.gguf: the first shard has no split.count; llama.cpp would load it alone")


def test_later_shards_may_omit_split_count(tmp_path: Path) -> None:
    """llama.cpp reads split.count from the first shard only: a later shard without it loads."""
    paths = _split(tmp_path, keys=lambda i: {"split.count": None} if i else {})
    assert len(open_model(paths[1]).tensors) == 6


def test_every_shard_needs_split_no(tmp_path: Path) -> None:
    _refused(_split(tmp_path, keys=lambda i: {"split.no": None} if i == 1 else {}),
             r"M-00002-of-00003.gguf: shard 2 of 3 has no split.no")


def test_split_no_against_the_name(tmp_path: Path) -> None:
    _refused(_split(tmp_path, keys=lambda i: {"split.no": (V.UINT16, 0)} if i == 2 else {}),
             r"M-00003-of-00003.gguf: split.no = 0, expected 2")


def test_split_tensors_count_of_every_shard(tmp_path: Path) -> None:
    _refused(_split(tmp_path, keys=lambda i: {"split.tensors.count": (V.INT32, 5)} if i == 1 else {}),
             r"M-00002-of-00003.gguf: split.tensors.count = 5 but the shards hold 6 tensors")


def test_split_keys_have_llama_cpp_types(tmp_path: Path) -> None:
    """A wrong type is named as such, before any value is compared."""
    paths = _split(tmp_path, keys=lambda i: {"split.no": (V.UINT32, i)} if i == 1 else {})
    with pytest.raises(MetadataError, match=r"split.no = 1 is a u32, llama.cpp reads a u16"):
        open_model(paths[0])


def test_shard_of_another_model(tmp_path: Path) -> None:
    _refused(_split(tmp_path, keys=lambda i: {"general.architecture": "llama"} if i == 2 else {}),
             r"general.architecture = 'llama' but the first shard's is 'qwen3moe'")


def test_single_file_split_keys(tmp_path: Path) -> None:
    """A file not named as a shard: split.tensors.count must match its tensors (else it is one shard of a
    split model); split.no != 0 loads in llama.cpp but is said (warning)."""
    p = write_gguf(tmp_path / "one.gguf", {**ARCH, "split.tensors.count": (V.INT32, 12)}, TENSORS)
    with pytest.raises(ShardError, match=r"split.tensors.count = 12 but the file holds 6 tensors; it is one shard"):
        open_model(p)
    p = write_gguf(tmp_path / "two.gguf", {**ARCH, "split.no": (V.UINT16, 2), "split.count": (V.UINT16, 1)}, TENSORS)
    with pytest.warns(ShardWarning, match=r"split.no = 2 in a single file"):
        assert len(open_model(p).tensors) == 6
    p = write_gguf(tmp_path / "three.gguf", {**ARCH, "split.no": (V.UINT16, 0), "split.count": (V.UINT16, 1),
                                              "split.tensors.count": (V.INT32, 6)}, TENSORS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(open_model(p).tensors) == 6


def test_split_error_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _split(tmp_path, keys=lambda i: {"split.no": None} if i == 1 else {})
    assert main(["dump", str(paths[0])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no split.no" in err and "Traceback" not in err


# --- degenerate trace records -------------------------------------------------------------------------------

FP = ModelFingerprint("qwen3moe", 4, 8, 2, "t" * 32, "q" * 32)


def _rows(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.arange(n), np.arange(n) + 100, np.tile([1, 2], (n, 1))


def test_writer_refuses_records_of_no_rows(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "t.bin", FP) as w:
        with pytest.raises(InputError, match=r"record with no rows \(layer 1, sequence 3\)"):
            w.write(3, 0, 1, *_rows(0))
        with pytest.raises(InputError, match=r"2 trace records with no rows"):
            w.write_many(np.array([0, 0]), np.array([0, 0]), np.array([0, 1]), np.zeros((2, 0)), np.zeros((2, 0)),
                         np.zeros((2, 0, 2)))
        w.write_many(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3, 2)))
        assert w.records_written == 0  # zero records is no record, not an empty one


def _with_empty_records(path: Path) -> None:
    """A trace another writer made: an empty record inside sequence 0, and sequence 2 made only of them."""
    with TraceWriter(path, FP) as w:
        w.write(0, 0, 0, *_rows(3))
        w._put(encode_records(np.array([0, 2, 2]), np.array([0, 1, 1]), np.array([1, 0, 1]), np.zeros((3, 0)),
                              np.zeros((3, 0)), np.zeros((3, 0, 2)), None))
        w.write(1, 1, 0, *_rows(1))


def test_reader_skips_empty_records_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    _with_empty_records(path)
    with pytest.warns(EmptyRecordsWarning, match=r"3 records with no rows \(the first at byte \d+, sequences "
                      r"0, 2\) skipped") as caught:
        t = read_trace(path)
    assert len(caught) == 1 and len(t) == 4 and sorted(set(t.seq.tolist())) == [0, 1]
    assert not t.recovered  # well-formed records: nothing after them is dropped
    with pytest.warns(EmptyRecordsWarning):  # streaming in small chunks: still one warning, same rows
        parts = list(iter_trace_chunks(path, max_rows=1))
    assert sum(len(p) for p in parts) == 4


def test_trace_of_no_rows_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "h.bin"
    TraceWriter(path, FP).close()
    with pytest.warns(EmptyRecordsWarning, match=r"holds no rows \(a header and no records\)"):
        assert len(read_trace(path)) == 0
    assert main(["stats", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("gguf-experts: warning:") and "holds no rows" in err


def test_complete_trace_reads_without_warnings(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    with TraceWriter(path, FP) as w:
        w.write(0, 0, 0, *_rows(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_trace(path)) == 3


# --- the same rules for other tools' ordered logs ---------------------------------------------------------------

def _mblt(path: Path, records: list[tuple[int, int, list[int]]], n_expert: int = 8) -> Path:
    """An MBLT file: header (magic, version 1, n_expert), then (layer, k, n_tokens, ids[n*k]) records."""
    from gguf_experts.formats.mblt import MAGIC

    words = [MAGIC, 1, n_expert]
    for layer, k, ids in records:
        words += [layer, k, len(ids) // k, *ids]
    np.asarray(words, "<i4").tofile(path)
    return path


def test_mblt_records_of_no_rows_are_said(tmp_path: Path) -> None:
    from gguf_experts.formats.mblt import read_mblt

    path = _mblt(tmp_path / "t.mblt", [(0, 2, [1, 2, 3, 4]), (1, 2, []), (1, 2, [5, 6])])
    with pytest.warns(EmptyRecordsWarning, match=r"1 record with no rows \(the first at byte 40\) skipped"):
        t = read_mblt(path, FP)
    assert len(t) == 3 and t.layer.tolist() == [0, 0, 1]


def test_empty_foreign_logs_are_said(tmp_path: Path) -> None:
    """An MBLT of no records reads as empty with the model's top-k (it used to be refused as 'top-1'); an
    RTRACE01 of no records too; both with the no-rows warning, never silently."""
    from gguf_experts.demo.tinymodel import make_tiny_model
    from gguf_experts.formats.load import load_trace
    from gguf_experts.formats.write import write_ordered
    from gguf_experts.gguf.fingerprint import fingerprint
    from gguf_experts.trace.format import TraceData, TraceHeader

    model = make_tiny_model(tmp_path / "m.gguf")
    fp = fingerprint(open_model(model))
    empty = TraceData.empty(TraceHeader(version=1, fingerprint=fp))
    for fmt in ("mblt", "rtrace"):
        path = tmp_path / f"e.{fmt}"
        write_ordered(fmt, empty, path)
        with pytest.warns(EmptyRecordsWarning, match=r"holds no rows"):
            t = load_trace(path, model)
        assert len(t) == 0 and t.header.fingerprint.n_expert_used == fp.n_expert_used


# --- fuzz: any combination of split keys either opens a complete model or is refused in one line ------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_KEY_VALUES = st.one_of(st.none(), st.just("keep"), st.integers(0, 4))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 3), changes=st.lists(st.tuples(_KEY_VALUES, _KEY_VALUES, _KEY_VALUES), min_size=3,
                                             max_size=3))
def test_fuzz_split_keys(tmp_path_factory: pytest.TempPathFactory, n: int,
                         changes: list[tuple[Any, Any, Any]]) -> None:
    """Each shard's split.no / split.count / split.tensors.count kept, removed or set to a small number: the
    model opens with all its tensors and consistent keys, or a ShardError names what is wrong."""
    tmp = tmp_path_factory.mktemp("fuzz")

    def keys(i: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, vt, change in zip(("split.no", "split.count", "split.tensors.count"),
                                   (V.UINT16, V.UINT16, V.INT32), changes[i]):
            if change != "keep":
                out[key] = None if change is None else (vt, change)
        return out

    paths = _split(tmp, n, keys)
    for p in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                model = open_model(p)
        except ShardError as e:
            assert str(e).count("\n") == 0 and str(paths[0].parent) in str(e)
            continue
        assert len(model.tensors) == len(TENSORS) and [s.path for s in model.shards] == paths
        for i, h in enumerate(model.shards):
            assert h.get("split.no") in (None, i) and h.get("split.count") in (None, n)
            assert h.get("split.tensors.count") in (None, len(TENSORS))
            if n > 1:
                assert h.get("split.no") == i and model.shards[0].get("split.count") == n


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 3), max_size=12))
def test_fuzz_empty_records_among_others(tmp_path_factory: pytest.TempPathFactory, sizes: list[int]) -> None:
    """Records of 0..3 rows in any order (the empty ones written as another writer would): every row of the
    others is read, and there is one warning exactly when some record has no rows or there is no record."""
    path = tmp_path_factory.mktemp("fuzz") / "t.bin"
    with TraceWriter(path, FP) as w:
        for i, n in enumerate(sizes):
            if n:
                w.write(i, 0, i % 4, *_rows(n))
            else:
                w._put(encode_records(np.array([i]), np.array([0]), np.array([0]), np.zeros((1, 0)),
                                      np.zeros((1, 0)), np.zeros((1, 0, 2)), None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = read_trace(path)
    said = [w for w in caught if issubclass(w.category, EmptyRecordsWarning)]
    assert len(t) == sum(sizes) and sorted(set(t.seq.tolist())) == [i for i, n in enumerate(sizes) if n]
    assert len(said) == (1 if 0 in sizes or not sizes else 0)
