"""Measured I/O in traces (version 2): measurement records round-trip through the writer and reader, interleaved
with expert records (periodic decode runs included), damaged ones follow the recovery rules, version-1 traces
still read, and stats / report show the numbers (or say they are absent)."""
from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_experts.cli import main
from gguf_experts.gguf.fingerprint import ModelFingerprint
from gguf_experts.trace.format import TraceRecoveryWarning
from gguf_experts.trace.reader import iter_trace_chunks, read_trace
from gguf_experts.trace.writer import TraceWriter
from gguf_experts.trace.format import MAGIC, MEAS_LEN, VERSION, TraceData, record_length
from gguf_experts.trace.iostat import IoCounters, file_resident, io_start, mem_available, read_ahead_kb
from gguf_experts.trace.writer import encode_measurement, encode_records

FP = ModelFingerprint("qwen3moe", 4, 16, 2, "t" * 32, "q" * 32)


def write_ubatches(path: Path, ubatches: list[tuple[int, int, int]], seed: int = 0,
                   measure: bool = True) -> list[dict[str, int]]:
    """Ubatches (seq, phase, n_tokens) as a capture writes them: every layer's record (the last layer only the
    last row, as llama.cpp computes output rows only), then the measurement. Returns the measurements."""
    rng = np.random.default_rng(seed)
    out = []
    rows = 0
    pos = 0
    with TraceWriter(path, FP, {"io_start": {"model_size": 123}}) as w:
        for seq, phase, n in ubatches:
            for layer in range(FP.n_layer):
                m = n if layer < FP.n_layer - 1 else 1
                p = np.arange(pos + n - m, pos + n)
                w.write(seq, phase, layer, p, p + 7, rng.integers(0, 16, (m, 2)))
                rows += m
            pos += n
            meas = {"seq": seq, "phase": phase, "n_tokens": n, "read_bytes": int(rng.integers(0, 1 << 40)),
                    "majflt": int(rng.integers(0, 1 << 33)), "wall_ns": int(rng.integers(1, 1 << 50)), "row": rows}
            if measure:
                w.write_measurement(meas["seq"], meas["phase"], n, meas["read_bytes"], meas["majflt"],
                                    meas["wall_ns"])
            out.append(meas)
    return out


def io_dict(d: TraceData) -> dict[str, list[int]]:
    assert d.io is not None
    return {f: getattr(d.io, f).tolist() for f in ("seq", "phase", "n_tokens", "read_bytes", "majflt", "wall_ns",
                                                    "row")}


def expect(ms: list[dict[str, int]]) -> dict[str, list[int]]:
    return {f: [m[f] for m in ms] for f in ("seq", "phase", "n_tokens", "read_bytes", "majflt", "wall_ns", "row")}


UBATCHES = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(1, 5)), min_size=0, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ub=UBATCHES, max_rows=st.integers(1, 64))
def test_measurements_round_trip_in_any_chunking(tmp_path: Path, ub: list[tuple[int, int, int]],
                                                 max_rows: int) -> None:
    path = tmp_path / "m.bin"
    ms = write_ubatches(path, ub)
    d = read_trace(path)
    assert d.header.version == VERSION == 2 and not d.recovered
    assert len(d) == sum(n * (FP.n_layer - 1) + 1 for _, _, n in ub)
    if ub:
        assert io_dict(d) == expect(ms)
        # every ubatch's rows lie between the previous measurement's row and its own, with its seq and phase
        starts = np.concatenate([[0], d.io.row[:-1]])
        for s, e, seq, ph in zip(starts, d.io.row, d.io.seq, d.io.phase):
            assert (d.seq[s:e] == seq).all() and (d.phase[s:e] == ph).all()
    else:
        assert d.io is None
    parts = list(iter_trace_chunks(path, max_rows=max_rows))
    ios = [p.io for p in parts if p.io is not None]
    got = {f: np.concatenate([getattr(i, f) for i in ios]).tolist() for f in ("row", "read_bytes")} if ios else {}
    assert got == ({"row": [m["row"] for m in ms], "read_bytes": [m["read_bytes"] for m in ms]} if ub else {})


def test_decode_stretch_is_read_as_one_periodic_run(tmp_path: Path) -> None:
    """300 one-token decode steps: the reader must not fall back to a run per ubatch (a Python step each)."""
    from gguf_experts.trace import reader

    path = tmp_path / "dec.bin"
    ms = write_ubatches(path, [(0, 0, 5)] + [(0, 1, 1)] * 300)
    calls = []
    orig = reader._periodic

    def spy(*a: object, **k: object) -> object:
        res = orig(*a, **k)  # type: ignore[arg-type]
        calls.append(res)
        return res
    reader._periodic = spy  # type: ignore[assignment]
    try:
        d = read_trace(path)
    finally:
        reader._periodic = orig  # type: ignore[assignment]
    assert io_dict(d) == expect(ms)
    found = [r for c in calls if c is not None for r in c[0] if r.meas and r.per]
    assert max(r.count for r in found) >= 299  # one run of (4 records + measurement) x 299 or 300


def test_unknown_counters_read_as_minus_one(tmp_path: Path) -> None:
    path = tmp_path / "u.bin"
    with TraceWriter(path, FP) as w:
        w.write(0, 1, 0, [3], [3], [[1, 2]])
        w.write_measurement(0, 1, 1, -1, 5, 10)
        w.write_measurement(-1, 2, 4, 7, -1, 11)
    d = read_trace(path)
    assert d.io is not None
    assert d.io.read_bytes.tolist() == [-1, 7] and d.io.majflt.tolist() == [5, -1]
    assert d.io.seq.tolist() == [0, -1] and d.io.phase.tolist() == [1, 2] and d.io.row.tolist() == [1, 1]


def _read_warned(path: Path) -> tuple[TraceData, list[str]]:
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        d = read_trace(path)
    return d, [str(w.message) for w in ws if issubclass(w.category, TraceRecoveryWarning)]


def _offsets(ub: list[tuple[int, int, int]], header: int) -> list[tuple[str, int, int]]:
    """(kind, start, end) of every record in file order."""
    out, o = [], header
    for _, _, n in ub:
        for layer in range(FP.n_layer):
            m = n if layer < FP.n_layer - 1 else 1
            ln = record_length(m, FP.n_expert_used, False)
            out.append(("rec", o, o + ln))
            o += ln
        out.append(("meas", o, o + MEAS_LEN))
        o += MEAS_LEN
    return out


@pytest.mark.parametrize("where", ["crc", "marker_len", "phase", "flags", "reserved", "cut"])
@pytest.mark.parametrize("which", [0, 5, 11])
def test_damaged_measurement_ends_the_valid_prefix(tmp_path: Path, where: str, which: int) -> None:
    """Every check of a measurement record (length, phase <= 2, known flags, reserved = 0, CRC, cut off) ends the
    trace there, as for expert records: the records before it are kept, the rest dropped with one warning."""
    ub = [(0, 0, 3)] + [(0, 1, 1)] * 11
    path = tmp_path / "ok.bin"
    ms = write_ubatches(path, ub)
    raw = bytearray(path.read_bytes())
    header = read_trace(path).header.size
    recs = _offsets(ub, header)
    meas = [r for r in recs if r[0] == "meas"][which]
    o = meas[1]
    if where == "crc":
        raw[o + 30] ^= 0x40
    elif where == "marker_len":
        raw[o + 4] = 44
    elif where == "phase":
        raw[o + 12] = 3
    elif where == "flags":
        raw[o + 13] = 0x80
    elif where == "reserved":
        raw[o + 15] = 1
    else:
        raw = raw[:o + 20]
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(raw))
    d, msgs = _read_warned(bad)
    assert d.recovered and len(msgs) == 1 and f"at byte {o}" in msgs[0]
    assert d.dropped_bytes == len(raw) - o
    kept_rows = ms[which]["row"]
    assert len(d) == kept_rows and (d.io is None if which == 0 else io_dict(d) == expect(ms[:which]))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), max_size=3),
       cut=st.floats(0, 1))
def test_any_damage_keeps_a_prefix_of_rows_and_measurements(tmp_path: Path, flips: list[tuple[float, int]],
                                                             cut: float) -> None:
    path = tmp_path / "fuzz.bin"
    ub = [(0, 0, 4), (0, 1, 1), (0, 1, 1), (1, 0, 2)] + [(1, 1, 1)] * 20
    if not path.exists():
        write_ubatches(path, ub)
    whole = read_trace(path)
    raw = bytearray(path.read_bytes())
    start = whole.header.size
    for at, bit in flips:
        raw[start + int(at * (len(raw) - start))] ^= 1 << bit
    raw = raw[:start + int(cut * (len(raw) - start))]
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(raw))
    d, msgs = _read_warned(bad)
    assert np.array_equal(d.experts, whole.experts[:len(d)])
    n_io = 0 if d.io is None else len(d.io)
    assert whole.io is not None and io_dict(d) == {k: v[:n_io] for k, v in io_dict(whole).items()} if n_io else True
    assert d.recovered == bool(msgs)
    kept = [r for r in _offsets(ub, start) if r[2] <= len(raw) - d.dropped_bytes]
    assert sum(r[0] == "meas" for r in kept) == n_io


def v1_trace(path: Path, m: int = 6) -> None:
    """A trace exactly as version 1 wrote it: header version 1, expert records only."""
    from gguf_experts.trace.format import encode_header

    rng = np.random.default_rng(1)
    body = encode_records(np.zeros(m), np.ones(m), np.arange(m) % 4, np.arange(m)[:, None], np.zeros((m, 1)),
                          rng.integers(0, 16, (m, 1, 2)), None)
    path.write_bytes(encode_header(FP, {"n_ctx": 64}, version=1) + body)


def test_version_1_traces_still_read_and_say_they_have_no_measurements(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "v1.bin"
    v1_trace(path)
    d = read_trace(path)
    assert d.header.version == 1 and len(d) == 6 and d.io is None and not d.recovered
    assert main(["stats", str(path), "--format", "table"]) == 0
    assert "no measured I/O in this trace" in capsys.readouterr().out
    assert main(["stats", str(path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["io"]["measured"] is False
    assert main(["stats", str(path), "--by", "io"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no measured I/O" in err
    # a measurement record in a version-1 trace is damage, not data
    bad = tmp_path / "v1bad.bin"
    bad.write_bytes(path.read_bytes() + encode_measurement(0, 1, 1, 5, 5, 5))
    d, msgs = _read_warned(bad)
    assert d.recovered and len(d) == 6 and d.io is None and "damaged record header" in msgs[0]


def test_newer_version_is_refused_with_the_upgrade_hint(tmp_path: Path) -> None:
    from gguf_experts.errors import TraceFormatError

    path = tmp_path / "v3.bin"
    write_ubatches(path, [(0, 0, 2)])
    raw = path.read_bytes()
    path.write_bytes(MAGIC + struct.pack("<I", VERSION + 1) + raw[12:])
    with pytest.raises(TraceFormatError, match=f"trace version {VERSION + 1} is newer than this gguf-experts "
                                               f"\\(reads {VERSION}\\); upgrade gguf-experts"):
        read_trace(path)


def test_measurement_record_layout_is_the_documented_one() -> None:
    raw = encode_measurement(7, 2, 3, (5 << 32) + 9, 11, 13)
    assert len(raw) == MEAS_LEN == 48
    assert raw[:4] == b"GEXM" and struct.unpack_from("<IiBBHI", raw, 4) == (48, 7, 2, 0, 0, 3)
    assert struct.unpack_from("<QQQ", raw, 20) == ((5 << 32) + 9, 11, 13)
    assert struct.unpack_from("<I", raw, 44)[0] == zlib.crc32(raw[:44])
    assert raw[13] == 0 and encode_measurement(0, 0, 1, -1, -1, 1)[13] == 3  # unknown-counter flags


def test_stats_per_phase_and_sequence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.bin"
    ub = [(0, 0, 4), (0, 1, 1), (0, 1, 1), (1, 0, 2), (1, 1, 1)]
    ms = write_ubatches(path, ub)
    assert main(["stats", str(path), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)["io"]
    assert doc["measured"] and doc["io_start"] == {"model_size": 123}
    ph = {r["phase"]: r for r in doc["phases"]}
    for name, code in (("prefill", 0), ("decode", 1)):
        sel = [m for m in ms if m["phase"] == code]
        tok = sum(m["n_tokens"] for m in sel)
        assert ph[name]["tokens"] == tok and ph[name]["read_bytes"] == sum(m["read_bytes"] for m in sel)
        assert ph[name]["read_bytes_per_token"] == pytest.approx(sum(m["read_bytes"] for m in sel) / tok)
        assert ph[name]["majflt_per_token"] == pytest.approx(sum(m["majflt"] for m in sel) / tok)
    seqs = {(r["seq"], r["phase"]): r for r in doc["sequences"]}
    assert set(seqs) == {(0, "prefill"), (0, "decode"), (1, "prefill"), (1, "decode")}
    assert seqs[0, "decode"]["read_bytes"] == ms[1]["read_bytes"] + ms[2]["read_bytes"]
    assert main(["stats", str(path), "--by", "io", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("seq,phase,ubatches,tokens,read_bytes,majflt") and len(lines) == 5
    assert main(["stats", str(path), "--format", "table"]) == 0
    out = capsys.readouterr().out
    assert "measured I/O" in out and "read_bytes_per_token" in out and "per sequence (request)" in out


def test_iostat_probes_agree_with_the_kernel(tmp_path: Path) -> None:
    """Residency by mincore follows posix_fadvise eviction and a read; read_bytes is a monotonic counter."""
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(64 * mmap.PAGESIZE))
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        before = file_resident(f)
        os.pread(fd, 8 * mmap.PAGESIZE, 0)
        after = file_resident(f)
    finally:
        os.close(fd)
    assert before is not None and after is not None and after[1] == before[1] == f.stat().st_size
    assert after[0] >= 8 * mmap.PAGESIZE > before[0]
    c = IoCounters()
    a, b = c.snapshot(), c.snapshot()
    c.close()
    assert b.read_bytes >= a.read_bytes >= 0 and b.majflt >= a.majflt >= 0 and b.ns >= a.ns
    avail = mem_available()
    assert avail is not None and 0 < avail <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ra = read_ahead_kb(f)
    assert ra is None or ra >= 0
    st = io_start(f)
    assert st["model_size"] == f.stat().st_size and st["page_size"] == mmap.PAGESIZE
    assert set(st) == {"mem_available", "model_resident", "model_size", "read_ahead_kb", "page_size", "read_bytes",
                       "majflt"}


@settings(max_examples=40, deadline=None)
@given(g=st.integers(0, 40), c=st.integers(1, 60), half=st.integers(0, 120), seed=st.integers(0, 2**32 - 1))
def test_crc_of_strided_groups_equals_zlib(g: int, c: int, half: int, seed: int) -> None:
    """crc32_rows on [g, c, n] views (the records of a periodic run, with a gap after each group)."""
    from gguf_experts.trace.format import crc32_rows

    rng = np.random.default_rng(seed)
    n = 2 * half
    buf = rng.integers(0, 3, (g, c * n + 48), dtype=np.uint8)  # few values: constant columns happen
    view = buf[:, :c * n].reshape(g, c, n)
    got = crc32_rows(view)
    assert got.tolist() == [zlib.crc32(view[i, j].tobytes()) for i in range(g) for j in range(c)]
