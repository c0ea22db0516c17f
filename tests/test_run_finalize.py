"""Finalising a trace written by `run`'s C tracer: the fingerprint filled from the model path, the sequence
sidecar folded into the header (in place, or by rewriting the file when it does not fit), torn sidecar lines."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gguf_experts.demo import tinymodel
from gguf_experts.trace.writer import TraceWriter
from gguf_experts.trace.reader import read_trace, read_trace_header
from gguf_experts.gguf.fingerprint import ModelFingerprint, model_fingerprint
from gguf_experts.trace.pending import read_sequences
from gguf_experts.trace.preload.run import finalize


def pending_trace(tmp_path: Path, model: Path, n_seq_lines: int) -> tuple[Path, ModelFingerprint]:
    real = model_fingerprint(model)
    fp = ModelFingerprint(real.architecture, real.n_layer, real.n_expert, real.n_expert_used, "", "")
    t = tmp_path / "t.bin"
    meta = {"tool": "gguf-experts run", "fingerprint_pending": True, "model_path": str(model),
            "sequences_file": "t.bin.seqs"}
    rng = np.random.default_rng(0)
    with TraceWriter(t, fp, meta) as w:
        for s in range(3):
            for layer in range(fp.n_layer):
                ids = rng.integers(0, fp.n_expert, (5, fp.n_expert_used))
                w.write(s, 0, layer, np.arange(5), np.arange(5) + 7, ids)
    lines = "".join(f"{i}\t0\t{i % 2}\t{i // 2}\t{i}\n" for i in range(n_seq_lines))
    (tmp_path / "t.bin.seqs").write_text(lines + "99\t0\t1")  # a torn last line (killed program)
    return t, real


@pytest.mark.parametrize("n_lines", [3, 2000])
def test_finalize_fills_fingerprint_and_sequences(tmp_path: Path, n_lines: int) -> None:
    model = tinymodel.make_tiny_model(tmp_path / "m.gguf")
    t, real = pending_trace(tmp_path, model, n_lines)
    before = read_trace(t)  # the reader fills the header in memory
    assert before.header.fingerprint == real and before.header.meta["fingerprint_pending"] is False
    assert len(before.header.meta["sequences"]) == n_lines  # the torn line is dropped
    h = finalize(t, {"command": ["prog"]})
    assert h.fingerprint == real and h.meta["command"] == ["prog"]
    assert h.meta["sequences"][1] == [1, 0, 1, 0, 1]
    assert not (tmp_path / "t.bin.seqs").exists()
    after = read_trace(t)
    assert not after.recovered
    for f in ("seq", "pos", "token", "layer", "experts"):
        assert np.array_equal(getattr(after, f), getattr(before, f))
    assert read_trace_header(t).meta["fingerprint_pending"] is False


def test_read_sequences_skips_damage(tmp_path: Path) -> None:
    p = tmp_path / "x.seqs"
    p.write_text("0\t0\t0\t0\t0\ngarbage\n1\t0\t1\t0\t3\n2\t0")
    assert [r["seq"] for r in read_sequences(p)] == [0, 1]
    assert read_sequences(tmp_path / "missing.seqs") == []


def test_a_moved_model_leaves_the_digests_pending(tmp_path: Path) -> None:
    model = tinymodel.make_tiny_model(tmp_path / "m.gguf")
    t, _ = pending_trace(tmp_path, model, 1)
    model.unlink()
    h = read_trace_header(t)
    assert h.meta["fingerprint_pending"] is True and h.fingerprint.tensor_digest == ""
    from gguf_experts.errors import InputError
    with pytest.raises(InputError, match="cannot be read any more"):
        finalize(t)
