"""trace.bin: writer/reader round trips, crash recovery, friendly errors, vectorised CRC, CSV logs, CLI."""
from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from waits import read_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_experts.cli import main
from gguf_experts.errors import InputError, ModelMismatchError, TraceFormatError
from gguf_experts.gguf.reader import open_model
from gguf_experts.gguf.fingerprint import fingerprint
from gguf_experts.gguf.fingerprint import ModelFingerprint, check_fingerprint
from gguf_experts.trace.format import TraceData, TraceRecoveryWarning
from gguf_experts.trace.writer import TraceWriter
from gguf_experts.trace.reader import iter_trace_chunks, read_trace, read_trace_header
from gguf_experts.formats.csvlog import encode_trace, infer_sequences, read_csv_log
from gguf_experts.trace.format import VEC_CRC_MAX_BYTES, VERSION, crc32_rows, record_length
from test_join import make_trace, tiny_model

FP = ModelFingerprint("qwen3moe", 48, 128, 8, "t" * 32, "q" * 32)
FIELDS = ("seq", "phase", "pos", "token", "layer", "experts")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def fp_k(k: int) -> ModelFingerprint:
    return ModelFingerprint("qwen3moe", 48, 128, k, "t" * 32, "q" * 32)


@st.composite
def records(draw: st.DrawFn) -> tuple[int, list[dict]]:
    """Random records: token counts from 1 to 9 (the writer refuses a record of no rows: see
    test_degenerate.py), weights in some records only."""
    k = draw(st.integers(1, 8))
    out = []
    for _ in range(draw(st.integers(0, 25))):
        n = draw(st.integers(1, 9))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        with_w = draw(st.booleans())
        out.append({"seq": draw(st.integers(-2**31, 2**31 - 1)), "phase": draw(st.integers(0, 1)),
                    "layer": draw(st.integers(0, 47)), "pos": rng.integers(-2**31, 2**31 - 1, n),
                    "tokens": rng.integers(0, 2**31 - 1, n), "experts": rng.integers(0, 128, (n, k)),
                    "weights": rng.standard_normal((n, k)).astype(np.float32) if with_w else None})
    return k, out


def expected(recs: list[dict], k: int) -> dict[str, np.ndarray]:
    def cat(key: str, per_record: bool = True) -> np.ndarray:
        """Row values: a per-record field repeated for each of its tokens, or the per-token arrays."""
        if not recs:
            return np.zeros(0)
        return np.concatenate([np.repeat(r[key], len(r["pos"])) if per_record else r[key] for r in recs])
    exp = {"seq": cat("seq"), "phase": cat("phase"), "layer": cat("layer"), "pos": cat("pos", False),
           "token": cat("tokens", False),
           "experts": np.concatenate([r["experts"] for r in recs]) if recs else np.zeros((0, k))}
    if any(r["weights"] is not None for r in recs):
        exp["weights"] = np.concatenate([r["weights"] if r["weights"] is not None
                                         else np.full((len(r["pos"]), k), np.nan, np.float32) for r in recs])
    return exp


def assert_trace(d: TraceData, exp: dict[str, np.ndarray]) -> None:
    assert len(d) == len(exp["seq"])
    for f in FIELDS:
        assert np.array_equal(getattr(d, f), exp[f].astype(getattr(d, f).dtype).reshape(getattr(d, f).shape)), f
    if "weights" in exp and len(d):
        assert d.weights is not None and np.array_equal(d.weights, exp["weights"], equal_nan=True)
    elif len(d):
        assert d.weights is None


@SETTINGS
@given(data=records(), max_rows=st.integers(1, 40))
def test_writer_reader_round_trip(tmp_path: Path, data: tuple[int, list[dict]], max_rows: int) -> None:
    k, recs = data
    path = tmp_path / "rt.bin"
    with TraceWriter(path, fp_k(k), {"prompts": ["a", "b"]}) as w:
        for r in recs:
            w.write(r["seq"], r["phase"], r["layer"], r["pos"], r["tokens"], r["experts"], r["weights"])
    d = read_trace(path)
    assert d.header.fingerprint == fp_k(k) and d.header.meta == {"prompts": ["a", "b"]}
    assert not d.recovered and d.n_records == len(recs)
    assert_trace(d, expected(recs, k))
    parts = list(iter_trace_chunks(path, max_rows=max_rows))
    assert all(len(p) <= max(max_rows, 9) for p in parts)
    lean = list(iter_trace_chunks(path, weights=False))
    assert all(p.weights is None for p in lean)
    assert np.array_equal(np.concatenate([p.experts for p in lean]).reshape(d.experts.shape), d.experts)
    joined = {f: np.concatenate([getattr(p, f) for p in parts]) for f in FIELDS}
    for f in FIELDS:
        assert np.array_equal(joined[f].reshape(getattr(d, f).shape), getattr(d, f))


@SETTINGS
@given(m=st.integers(0, 300), n=st.integers(1, 4), k=st.integers(1, 8), w=st.booleans(), seed=st.integers(0, 99))
def test_vectorised_write_many_equals_per_record_writes(tmp_path: Path, m: int, n: int, k: int, w: bool,
                                                       seed: int) -> None:
    rng = np.random.default_rng(seed)
    seq, phase, layer = rng.integers(0, 5, m), rng.integers(0, 2, m), rng.integers(0, 48, m)
    pos, tok, ex = rng.integers(0, 9999, (m, n)), rng.integers(0, 99999, (m, n)), rng.integers(0, 128, (m, n, k))
    wt = rng.random((m, n, k)).astype(np.float32) if w else None
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    with TraceWriter(a, fp_k(k)) as wa:
        wa.write_many(seq, phase, layer, pos, tok, ex, wt)
    with TraceWriter(b, fp_k(k)) as wb:
        for i in range(m):
            wb.write(seq[i], phase[i], layer[i], pos[i], tok[i], ex[i], None if wt is None else wt[i])
    assert a.read_bytes() == b.read_bytes()


@settings(max_examples=60, deadline=None)
@given(m=st.integers(0, 70), half=st.integers(0, 200), seed=st.integers(0, 2**32 - 1),
       const_cols=st.integers(0, 400))
def test_vectorised_crc_equals_zlib(m: int, half: int, seed: int, const_cols: int) -> None:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, (m, 2 * half), dtype=np.uint8)
    if m and half:
        cols = rng.choice(2 * half, size=min(const_cols, 2 * half), replace=False)
        rows[:, cols] = rows[0, cols]  # columns equal in every row take the constant path
    got = crc32_rows(rows)
    assert got.dtype == np.uint32
    assert got.tolist() == [zlib.crc32(r.tobytes()) for r in rows]


def test_vectorised_crc_on_many_rows_crosses_blocks() -> None:
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 4, (70_000, 68), dtype=np.uint8)
    rows[:40_000, :8] = 7
    got = crc32_rows(rows)
    idx = rng.integers(0, len(rows), 500)
    assert got[idx].tolist() == [zlib.crc32(rows[i].tobytes()) for i in idx]
    wide = rng.integers(0, 256, (3, VEC_CRC_MAX_BYTES + 2), dtype=np.uint8)
    assert crc32_rows(wide).tolist() == [zlib.crc32(r.tobytes()) for r in wide]


def _small_trace(path: Path, n_records: int = 12, weights: bool = True) -> list[int]:
    """Records of varying size; returns each record's end offset in the file."""
    rng = np.random.default_rng(3)
    ends = []
    with TraceWriter(path, FP) as w:
        for i in range(n_records):
            n = 5 if i < 4 else 1
            w.write(0, int(i >= 4), i % 4, np.arange(n) + i, np.arange(n), rng.integers(0, 128, (n, 8)),
                    rng.random((n, 8)).astype(np.float32) if weights else None)
            ends.append(path.stat().st_size)
    return ends


def _read_warned(path: Path) -> tuple[TraceData, list[str]]:
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        d = read_trace(path)
    return d, [str(w.message) for w in ws if issubclass(w.category, TraceRecoveryWarning)]


def test_truncated_trace_keeps_its_valid_prefix(tmp_path: Path) -> None:
    full = tmp_path / "full.bin"
    ends = _small_trace(full)
    raw = full.read_bytes()
    whole = read_trace(full)
    header_size = read_trace_header(full).size
    for cut in sorted({ends[-1] - 1, ends[-2] + 3, ends[6] + 1, ends[0] + 31, header_size + 1}):
        (tmp_path / "cut.bin").write_bytes(raw[:cut])
        d, msgs = _read_warned(tmp_path / "cut.bin")
        keep = sum(e <= cut for e in ends)
        rows = sum(5 if i < 4 else 1 for i in range(keep))
        assert d.recovered and d.n_records == keep and len(d) == rows
        assert d.dropped_bytes == cut - (ends[keep - 1] if keep else header_size)
        assert np.array_equal(d.experts, whole.experts[:rows])
        assert rows == 0 or np.array_equal(d.weights, whole.weights[:rows])
        assert len(msgs) == 1 and "truncated record" in msgs[0]
    (tmp_path / "exact.bin").write_bytes(raw[:ends[5]])
    d, msgs = _read_warned(tmp_path / "exact.bin")
    assert not d.recovered and msgs == [] and d.n_records == 6


def test_bit_flip_keeps_the_records_before_it(tmp_path: Path) -> None:
    full = tmp_path / "full.bin"
    ends = _small_trace(full)
    whole = read_trace(full)
    raw = bytearray(full.read_bytes())
    for rec, byte in ((7, 40), (2, 60), (9, 1), (5, 4)):  # body, body, marker, length field
        bad = bytearray(raw)
        bad[ends[rec - 1] + byte] ^= 0x10
        (tmp_path / "bad.bin").write_bytes(bad)
        d, msgs = _read_warned(tmp_path / "bad.bin")
        rows = sum(5 if i < 4 else 1 for i in range(rec))
        assert d.recovered and d.n_records == rec and len(d) == rows
        assert d.dropped_bytes == len(raw) - ends[rec - 1]
        assert np.array_equal(d.pos, whole.pos[:rows])
        assert len(msgs) == 1 and f"at byte {ends[rec - 1]}" in msgs[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), max_size=3),
       cut=st.floats(0, 1))
def test_any_damage_gives_a_prefix_never_a_crash(tmp_path: Path, flips: list[tuple[float, int]], cut: float) -> None:
    path = tmp_path / "fuzz.bin"
    if not path.exists():
        _small_trace(path, 16)
    raw = bytearray(path.read_bytes())
    whole = read_trace(path)
    start = read_trace_header(path).size
    for where, bit in flips:
        raw[start + int(where * (len(raw) - start))] ^= 1 << bit
    raw = raw[:start + int(cut * (len(raw) - start))]
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(raw))
    d, msgs = _read_warned(bad)
    n = len(d)
    for f in FIELDS:
        assert np.array_equal(getattr(d, f), getattr(whole, f)[:n]), f
    assert d.recovered == bool(msgs) and len(msgs) <= 1
    kept = len(raw) - start - d.dropped_bytes  # kept + dropped == every byte after the header
    assert kept == sum(record_length(5 if i < 4 else 1, 8, True) for i in range(d.n_records))


def test_killed_writer_loses_at_most_the_record_being_written(tmp_path: Path) -> None:
    path = tmp_path / "killed.bin"
    code = (
        "import sys, numpy as np\n"
        "from gguf_experts.trace.writer import TraceWriter\n"
        "from gguf_experts.gguf.fingerprint import ModelFingerprint\n"
        f"w = TraceWriter({str(path)!r}, ModelFingerprint('qwen3moe', 48, 128, 8, 't' * 32, 'q' * 32))\n"
        "e = np.arange(8 * 64).reshape(64, 8) % 128\n"
        "i = 0\n"
        "while True:\n"
        "    w.write(0, 1, i % 48, np.arange(64) + i, np.arange(64), e)\n"
        "    i += 1\n"
        "    if i == 200: print('ready', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    read_until(proc.stdout.fileno(), lambda out: b"ready\n" in out, timeout=60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    d, _ = _read_warned(path)
    assert d.n_records >= 200 and len(d) == 64 * d.n_records
    rec = record_length(64, 8, False)
    assert path.stat().st_size - read_trace_header(path).size - d.n_records * rec == d.dropped_bytes < rec
    assert (d.layer.reshape(-1, 64)[:, 0] == np.arange(d.n_records) % 48).all()


def test_bad_magic_and_newer_version_give_friendly_errors(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.bin"
    _small_trace(good, 3)
    raw = good.read_bytes()
    cases = {"magic": (b"GGUF\x03\x00\x00\x00" + raw[8:], "not a gguf-experts trace"),
             "version": (raw[:8] + struct.pack("<I", VERSION + 1) + raw[12:],
                         f"trace version {VERSION + 1} is newer than this gguf-experts (reads {VERSION}); upgrade"),
             "header": (raw[:20] + bytes([raw[20] ^ 1]) + raw[21:], "header checksum mismatch"),
             "short": (raw[:5], "truncated trace header")}
    for name, (data, msg) in cases.items():
        p = tmp_path / f"{name}.bin"
        p.write_bytes(data)
        with pytest.raises(TraceFormatError, match=re.escape(msg)):
            read_trace(p)
        assert main(["convert", str(p), str(tmp_path / "out.csv")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err and "Traceback" not in err
        assert not (tmp_path / "out.csv").exists()


def test_check_fingerprint() -> None:
    assert check_fingerprint(FP, FP) is None
    other_q = ModelFingerprint(**{**FP.to_dict(), "type_digest": "x" * 32})
    assert "another quantization" in (check_fingerprint(FP, other_q) or "")
    with pytest.raises(ModelMismatchError, match="n_layer: trace 48 vs model 61.*tensor_digest"):
        check_fingerprint(FP, ModelFingerprint(**{**FP.to_dict(), "n_layer": 61, "tensor_digest": "y"}))


def test_writer_refuses_bad_records(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "w.bin", FP) as w:
        with pytest.raises(InputError, match="experts has shape"):
            w.write(0, 0, 0, np.arange(2), np.arange(2), np.zeros((2, 7), int))
        with pytest.raises(InputError, match="phase"):
            w.write(0, 3, 0, np.arange(1), np.arange(1), np.zeros((1, 8), int))
        with pytest.raises(InputError, match="layer 48 outside"):
            w.write(0, 0, 48, np.arange(1), np.arange(1), np.zeros((1, 8), int))
        with pytest.raises(InputError, match="weights has shape"):
            w.write(0, 0, 0, np.arange(1), np.arange(1), np.zeros((1, 8), int), np.zeros((2, 8)))
    assert read_trace(tmp_path / "w.bin").n_records == 0


def test_empty_trace_reads_as_zero_rows(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "e.bin", FP):
        pass
    d = read_trace(tmp_path / "e.bin")
    assert len(d) == 0 and d.experts.shape == (0, 8) and not d.recovered


# --- CSV logs -------------------------------------------------------------------------------------

def test_plain_log_is_the_format_other_tracers_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model(tmp_path / "m.gguf")
    tr = tmp_path / "t.bin"
    with TraceWriter(tr, fingerprint(open_model(model))) as w:
        w.write(0, 0, 1, np.array([0, 1]), np.array([50, 51]), np.array([[3, 1], [0, 7]]))
        w.write(0, 1, 1, np.array([2]), np.array([52]), np.array([[6, 2]]), np.array([[0.75, 0.25]]))
    assert main(["convert", str(tr), str(tmp_path / "log.csv"), "-f", "table"]) == 0
    assert (tmp_path / "log.csv").read_text() == "# token_id,layer_id,expert_0,expert_1\n0,1,3,1\n1,1,0,7\n2,1,6,2\n"
    assert main(["convert", str(tr), str(tmp_path / "d.csv"), "--detail", "-f", "csv"]) == 0
    assert (tmp_path / "d.csv").read_text() == (
        "seq,phase,pos,token,layer,expert_0,expert_1,weight_0,weight_1\n"
        "0,0,0,50,1,3,1,nan,nan\n0,0,1,51,1,0,7,nan,nan\n0,1,2,52,1,6,2,0.75,0.25\n")
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("trace -> csv: 3 rows")  # the first run: the table asked for
    assert out.splitlines()[0].endswith(f"wrote {tmp_path / 'log.csv'}")
    assert out.splitlines()[1].startswith("input,output,direction,format,rows") and "detail" in out


@pytest.mark.parametrize("detail", [False, True])
def test_trace_round_trips_through_the_csv_log(tmp_path: Path, detail: bool,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model(tmp_path / "m.gguf")
    tr = make_trace(tmp_path / "t.bin", model, seqs=4, prompt=6, decode=4, weights=True)
    log, back = tmp_path / "log.csv", tmp_path / "back.bin"
    assert main(["convert", str(tr), str(log)] + (["--detail"] if detail else [])) == 0
    assert main(["convert", str(log), str(back), "--model", str(model), "-f", "json"]) == 0
    assert '"direction": "csv -> trace"' in capsys.readouterr().out
    a, b = read_trace(tr), read_trace(back)
    for f in ("seq", "pos", "layer", "experts"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    if detail:
        assert np.array_equal(a.phase, b.phase) and np.array_equal(a.token, b.token)
        assert np.array_equal(a.weights, b.weights) and a.n_records == b.n_records
    else:
        assert (b.phase == 1).all() and (b.token == -1).all() and b.weights is None
    assert b.header.fingerprint == a.header.fingerprint


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.lists(st.tuples(st.integers(-5, 5), st.integers(0, 1), st.integers(1, 2), st.integers(1, 4),
                               st.booleans(), st.integers(0, 99)), max_size=12))
def test_random_records_round_trip_through_the_detail_csv(tmp_path: Path, data: list[tuple]) -> None:
    """seq, phase, layer, tokens per record, weights or not: the detail CSV loses nothing row-wise."""
    model = tmp_path / "m.gguf"
    if not model.exists():
        tiny_model(model)
    fp = fingerprint(open_model(model))
    tr, log, back = tmp_path / "t.bin", tmp_path / "d.csv", tmp_path / "b.bin"
    with TraceWriter(tr, fp) as w:
        for seq, phase, layer, n, with_w, seed in data:
            rng = np.random.default_rng(seed)
            w.write(seq, phase, layer, rng.integers(0, 10**6, n), rng.integers(0, 10**6, n),
                    np.argsort(rng.random((n, 8)), axis=1)[:, :2],
                    rng.standard_normal((n, 2)).astype(np.float32) if with_w else None)
    assert main(["convert", str(tr), str(log), "--detail", "-o", str(tmp_path / "s.json"), "-f", "json"]) == 0
    assert main(["convert", str(log), str(back), "--model", str(model), "-o", str(tmp_path / "s.json")]) == 0
    a, b = read_trace(tr), read_trace(back)
    for f in FIELDS:
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert len(a) == 0 or (a.weights is None) == (b.weights is None)
    if len(a) and a.weights is not None:
        assert np.array_equal(a.weights, b.weights, equal_nan=True)


@SETTINGS
@given(prompts=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 4)), min_size=1, max_size=5),
       seed=st.integers(0, 999))
def test_sequence_inference_recovers_capture_shaped_sequences(prompts: list[tuple[int, int]], seed: int) -> None:
    """Rows in capture order (prefill ubatch per layer, then decode steps): sequences come back."""
    rng = np.random.default_rng(seed)
    seq, pos, layer, starts = [], [], [], []
    for s, (p, d) in enumerate(prompts):
        start = int(rng.integers(0, 3))  # a prompt may continue a cache: its first position need not be 0
        starts.append(start)
        steps = [np.arange(start, start + p)] + [np.array([start + p + i]) for i in range(d)]
        for step in steps:
            for lay in (1, 2, 3):
                seq += [s] * len(step)
                pos += step.tolist()
                layer += [lay] * len(step)
    got = infer_sequences(np.array(pos), np.array(layer))
    # a boundary is seen iff the next prompt's first position does not exceed this prompt's last one
    seen = [starts[s + 1] <= starts[s] + p + d - 1 for s, (p, d) in enumerate(prompts[:-1])]
    inferred_id = np.r_[0, np.cumsum(seen)]
    assert np.array_equal(got, inferred_id[np.array(seq)])
    if all(st_ == 0 for st_ in starts):
        assert np.array_equal(got, np.array(seq))


def test_bad_csv_logs_name_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model(tmp_path / "m.gguf")
    cases = {
        "word": ("# token_id,layer_id,expert_0,expert_1\n0,1,3,1\n1,1,x,7\n", "line 3: column expert_0 = 'x'"),
        "range": ("# token_id,layer_id,expert_0,expert_1\n0,1,3,1\n\n1,1,9,7\n", "line 4: expert id 9"),
        "fields": ("# token_id,layer_id,expert_0,expert_1\n0,1,3,1\n1,1,2,7,5\n", "malformed CSV"),
        "k": ("# token_id,layer_id,expert_0\n0,1,3\n", "line 1: header has 1 expert columns"),
        "other": ("hello,world\n", "line 1: not an expert log"),
        "short": ("# token_id,layer_id,expert_0,...,expert_k\n0,1,3,1\n1,1,2\n", "line 3: column expert_1"),
        "layer": ("# token_id,layer_id,expert_0,expert_1\n0,3,3,1\n", "line 2: layer id 3"),
        "phase": ("seq,phase,pos,token,layer,expert_0,expert_1\n0,1,0,5,1,3,1\n0,2,1,5,1,3,1\n",
                  "line 3: phase 2 is not 0"),
        "float": ("seq,phase,pos,token,layer,expert_0,expert_1\n0,1,0.5,5,1,3,1\n", "line 2: column pos = '0.5'"),
    }
    for name, (text, msg) in cases.items():
        p = tmp_path / f"{name}.csv"
        p.write_text(text)
        assert main(["convert", str(p), str(tmp_path / "o.bin"), "--model", str(model)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, (name, err)
        assert not (tmp_path / "o.bin").exists()
    assert main(["convert", str(tmp_path / "word.csv"), str(tmp_path / "o.bin")]) == 2
    assert "needs --model" in capsys.readouterr().err


@pytest.mark.parametrize("detail", [False, True])
def test_csv_log_conversion_streams_in_chunks(tmp_path: Path, detail: bool) -> None:
    """Chunk boundaries inside records and sequences change nothing: same bytes as one chunk."""
    model = tiny_model(tmp_path / "m.gguf")
    fp = fingerprint(open_model(model))
    tr = make_trace(tmp_path / "t.bin", model, seqs=3, prompt=5, decode=3, weights=detail)
    log = tmp_path / "log.csv"
    assert main(["convert", str(tr), str(log), "-f", "csv"] + (["--detail"] if detail else [])) == 0
    whole = b"".join(encode_trace(read_csv_log(log, fp), fp, {}))
    for rows in (1, 2, 7, 13):
        assert b"".join(encode_trace(read_csv_log(log, fp, chunk_rows=rows), fp, {})) == whole
    (tmp_path / "back.bin").write_bytes(whole)
    a, b = read_trace(tr), read_trace(tmp_path / "back.bin")
    assert np.array_equal(a.seq, b.seq) and np.array_equal(a.experts, b.experts)
    assert b.n_records == a.n_records == 3 * (1 + 3) * 2


def test_logs_of_other_tracers_with_an_unexpanded_header_convert(tmp_path: Path) -> None:
    """Tracers write '# token_id,layer_id,expert_0,...,expert_k' literally, token_id a running counter."""
    model = tiny_model(tmp_path / "m.gguf")
    log = tmp_path / "expert_selections.csv"
    log.write_text("# token_id,layer_id,expert_0,...,expert_k\n0,1,4,2\n0,2,1,0\n1,1,7,3\n1,2,5,6\n")
    assert main(["convert", str(log), str(tmp_path / "t.bin"), "--model", str(model)]) == 0
    d = read_trace(tmp_path / "t.bin")
    assert d.pos.tolist() == [0, 0, 1, 1] and d.layer.tolist() == [1, 2, 1, 2] and (d.seq == 0).all()
    assert d.experts.tolist() == [[4, 2], [1, 0], [7, 3], [5, 6]] and d.n_records == 4


def test_convert_prints_the_recovery_warning_as_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tr = tmp_path / "t.bin"
    ends = _small_trace(tr)
    tr.write_bytes(tr.read_bytes()[:ends[-1] - 3])
    assert main(["convert", str(tr), str(tmp_path / "o.csv"), "-f", "table"]) == 0
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and cap.err.startswith("gguf-experts: warning: ") and "dropped" in cap.err
    assert "trace -> csv: 27 rows" in cap.out  # 4 records of 5 tokens + 7 of the 8 one-token records
    assert len(pd.read_csv(tmp_path / "o.csv")) == 27


def test_select_keeps_the_masked_rows_of_every_column(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.gguf")
    d = read_trace(make_trace(tmp_path / "t.bin", model, weights=True))
    mask = (d.seq == 1) & (d.phase == 1)
    sub = d.select(mask)
    assert len(sub) == int(mask.sum()) > 0 and sub.header is d.header
    for f in FIELDS + ("weights",):
        assert np.array_equal(getattr(sub, f), getattr(d, f)[mask]), f
    idx = np.flatnonzero(mask)
    assert np.array_equal(d.select(idx).experts, sub.experts)
    assert len(d.select(np.zeros(len(d), bool))) == 0
    with pytest.raises(ValueError):
        d.select(mask[:-1])


def test_csv_logs_are_read_strictly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 8's cases: an extra field shifted the columns, 2^32 wrapped to 0, 20 digits raised
    OverflowError, 0xFF raised UnicodeDecodeError, a repeated expert converted fine and broke cache-sim."""
    model = tiny_model(tmp_path / "m.gguf")
    head = b"# token_id,layer_id,expert_0,expert_1\n0,1,3,1\n"
    detail = b"seq,phase,pos,token,layer,expert_0,expert_1\n0,0,0,5,1,3,1\n"
    cases = {
        "extra field": (head + b"1,1,2,7,5\n", "line 3: malformed CSV (5 fields, the header has 4)"),
        "extra field late": (head * 1 + b"1,1,2,7\n" * 3 + b"9,1,2,7,5\n", "line 6: malformed CSV"),
        "pos 2^32": (head + b"4294967296,1,2,7\n", "line 3: pos 4294967296 does not fit the trace's 32-bit field"),
        "token 2^31": (detail + b"0,0,1,2147483648,1,3,1\n", "line 3: token 2147483648 does not fit"),
        "20 digits": (head + b"1,1,2,99999999999999999999\n", "line 3: column expert_1 = '99999999999999999999'"),
        "0xFF": (head + b"1,1,2,7\n# \xff\n", "line 4: byte 0xFF is not UTF-8"),
        "0xFF in header": (b"# token_id,layer_id,expert_0,exp\xffert_1\n", "line 1: byte 0xFF is not UTF-8"),
        "binary": (head + b"\x00\x01\x02", "binary file"),
        "duplicate experts": (head + b"1,1,2,2\n", "line 3: expert ids [2, 2] repeat an expert"),
        "duplicate experts detail": (detail + b"0,0,1,5,1,6,6\n", "line 3: expert ids [6, 6] repeat an expert"),
    }
    for name, (raw, msg) in cases.items():
        p = tmp_path / "log.csv"
        p.write_bytes(raw)
        assert main(["convert", str(p), str(tmp_path / "o.bin"), "--model", str(model)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err and "Traceback" not in err, (name, err)
        assert not (tmp_path / "o.bin").exists()
    p.write_bytes(head + b"1,1,2,7\n\n2,1,0,7\n")  # the same log without damage converts
    assert main(["convert", str(p), str(tmp_path / "o.bin"), "--model", str(model)]) == 0
    assert read_trace(tmp_path / "o.bin").experts.tolist() == [[3, 1], [2, 7], [0, 7]]


def test_header_encoder_fills_a_given_size() -> None:
    """The one header encoder also rewrites a header in place (run's finalize): exactly ``size`` bytes, or
    HeaderSpaceError; the result decodes to the same fingerprint and meta."""
    from gguf_experts.trace.format import HeaderSpaceError, decode_header, encode_header, header_length

    fp = ModelFingerprint("qwen3moe", 4, 8, 2, "t" * 32, "q" * 32)
    short = encode_header(fp, {"a": 1})
    assert len(short) == header_length(len(short) - 20) and len(short) % 8 == 0
    raw = encode_header(fp, {"a": 1}, size=4112, version=1)
    assert len(raw) == 4112
    h = decode_header(raw, "t")
    assert (h.fingerprint, h.meta, h.size) == (fp, {"a": 1}, 4112)
    with pytest.raises(HeaderSpaceError):
        encode_header(fp, {"a": "x" * 5000}, size=4112)
    with pytest.raises(HeaderSpaceError):  # not a multiple of 8: records would not be aligned
        encode_header(fp, {"a": 1}, size=4113)
