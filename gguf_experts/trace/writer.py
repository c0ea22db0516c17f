"""Append-only trace writer: one record per (ubatch, MoE layer), handed to the OS as soon as it is written.

The trace is written in place (not through atomic_write): it is append-only and every record carries its
own CRC32, so a crash loses at most the record being written and the reader keeps the valid prefix.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .format import (
    CRC_BYTES,
    FIXED_WORDS,
    FLAG_WEIGHTS,
    MEAS_FIXED,
    MEAS_LEN,
    MEAS_MARKER,
    MEAS_PHASES,
    PHASES,
    REC_MARKER,
    RECORD_FIXED,
    crc32_rows,
    encode_header,
    record_length,
)
from ..gguf.fingerprint import ModelFingerprint

_CRC = struct.Struct("<I")


def _as_i4(a: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(a)
    if arr.shape != shape:
        raise InputError(f"trace record: {name} has shape {arr.shape}, expected {shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise InputError(f"trace record: {name} must be integers, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype="<i4")


def encode_records(seq: np.ndarray, phase: np.ndarray, layer: np.ndarray, pos: np.ndarray,
                   tokens: np.ndarray, experts: np.ndarray, weights: np.ndarray | None) -> bytes:
    """Many records with the same n_tokens at once: pos/tokens [m, n], experts/weights [m, n, k].

    Vectorised (CRC included), so converting a CSV log or generating a benchmark trace with millions
    of one-token decode records needs no Python loop per record.
    """
    m, n = pos.shape
    k = experts.shape[2]
    has_w = weights is not None
    length = record_length(n, k, has_w)
    words = np.zeros((m, length // 4), "<u4")
    words[:, 0] = REC_MARKER
    words[:, 1] = length
    words[:, 2] = seq.astype("<i4").view("<u4")
    words[:, 3] = phase.astype("<u4") | ((FLAG_WEIGHTS if has_w else 0) << 8)
    words[:, 4] = layer.astype("<i4").view("<u4")
    words[:, 5] = n
    words[:, 6] = k
    c = FIXED_WORDS
    words[:, c:c + n] = pos.astype("<i4").view("<u4")
    words[:, c + n:c + 2 * n] = tokens.astype("<i4").view("<u4")
    e = c + 2 * n
    words[:, e:e + n * k] = experts.reshape(m, n * k).astype("<i4").view("<u4")
    if weights is not None:
        words[:, e + n * k:e + 2 * n * k] = weights.reshape(m, n * k).astype("<f4").view("<u4")
    raw = words.view(np.uint8).reshape(m, length)
    words[:, -1] = crc32_rows(np.ascontiguousarray(raw[:, :length - CRC_BYTES]))
    return words.tobytes()


def encode_measurement(seq: int, phase: int, n_tokens: int, read_bytes: int, majflt: int, wall_ns: int) -> bytes:
    """One measurement record (48 bytes); a negative read_bytes or majflt (unknown) sets its flag and stores 0."""
    if int(phase) not in MEAS_PHASES:
        raise InputError(f"trace measurement: phase {phase} is not 0 (prefill), 1 (decode) or 2 (mixed)")
    flags = (1 if read_bytes < 0 else 0) | (2 if majflt < 0 else 0)
    body = MEAS_FIXED.pack(MEAS_MARKER, MEAS_LEN, int(seq), int(phase), flags, 0, max(0, int(n_tokens)),
                           max(0, int(read_bytes)), max(0, int(majflt)), max(0, int(wall_ns)))
    return body + _CRC.pack(zlib.crc32(body))


class TraceWriter:
    """Write a trace: ``with TraceWriter(path, fingerprint, meta) as w: w.write(...)``.

    Each ``write`` issues one unbuffered write() of a whole record, so a killed process leaves complete
    records plus at most one torn one; ``close`` fsyncs once.
    """

    def __init__(self, path: str | os.PathLike[str], fingerprint: ModelFingerprint,
                 meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint.checked(f"{self.path}: the model's")
        self.k = int(fingerprint.n_expert_used)
        self.records_written = 0
        self.rows_written = 0
        self.measurements_written = 0
        self._f = open(self.path, "wb", buffering=0)
        try:
            self._put(encode_header(fingerprint, meta))
        except BaseException:
            self._f.close()
            raise

    def _put(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = self._f.write(view)
            view = view[done:]

    def write(self, seq: int, phase: int, layer: int, pos: np.ndarray, tokens: np.ndarray,
              experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Append one record (one ubatch x one MoE layer); rows of pos/tokens/experts are its tokens."""
        if self._f.closed:
            raise InputError(f"{self.path}: trace writer is closed")
        pos_a = np.asarray(pos).reshape(-1)
        n = pos_a.shape[0]
        if n == 0:
            raise InputError(f"{self.path}: a trace record with no rows (layer {layer}, sequence {seq}) records "
                             "nothing; write records of the rows a layer computed, skip empty ones")
        if int(phase) not in PHASES:
            raise InputError(f"trace record: phase {phase} is not 0 (prefill) or 1 (decode)")
        if not 0 <= int(layer) < self.fingerprint.n_layer:
            raise InputError(f"trace record: layer {layer} outside [0, {self.fingerprint.n_layer}) of the model")
        pos_a = _as_i4(pos_a, "pos", (n,))
        tok_a = _as_i4(np.asarray(tokens).reshape(-1), "tokens", (n,))
        exp_a = _as_i4(experts, "experts", (n, self.k))
        flags = 0
        parts = [b"", pos_a.tobytes(), tok_a.tobytes(), exp_a.tobytes()]
        if weights is not None:
            w = np.asarray(weights)
            if w.shape != (n, self.k):
                raise InputError(f"trace record: weights has shape {w.shape}, expected {(n, self.k)}")
            parts.append(np.ascontiguousarray(w, dtype="<f4").tobytes())
            flags = FLAG_WEIGHTS
        length = record_length(n, self.k, flags == FLAG_WEIGHTS)
        parts[0] = RECORD_FIXED.pack(REC_MARKER, length, int(seq), int(phase), flags, 0, int(layer), n, self.k)
        body = b"".join(parts)
        self._put(body + _CRC.pack(zlib.crc32(body)))
        self.records_written += 1
        self.rows_written += n

    def write_measurement(self, seq: int, phase: int, n_tokens: int, read_bytes: int, majflt: int,
                          wall_ns: int) -> None:
        """Append the measurement of one ubatch (after its expert records): docs/trace-format.md."""
        if self._f.closed:
            raise InputError(f"{self.path}: trace writer is closed")
        self._put(encode_measurement(seq, phase, n_tokens, read_bytes, majflt, wall_ns))
        self.measurements_written += 1

    def write_many(self, seq: np.ndarray, phase: np.ndarray, layer: np.ndarray, pos: np.ndarray,
                   tokens: np.ndarray, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Append m records of equal n_tokens at once (pos/tokens [m, n], experts [m, n, k]): vectorised."""
        pos = np.asarray(pos)
        if pos.ndim != 2:
            raise InputError(f"trace records: pos must be [records, tokens], got shape {pos.shape}")
        m, n = pos.shape
        if m and n == 0:
            raise InputError(f"{self.path}: {m} trace records with no rows record nothing; skip empty records")
        exp = np.asarray(experts)
        if exp.shape != (m, n, self.k):
            raise InputError(f"trace records: experts has shape {exp.shape}, expected {(m, n, self.k)}")
        phase_a = np.asarray(phase).reshape(m)
        if m and not np.isin(phase_a, PHASES).all():
            raise InputError("trace records: phase must be 0 (prefill) or 1 (decode)")
        layer_a = np.asarray(layer).reshape(m)
        if m and (layer_a.min() < 0 or layer_a.max() >= self.fingerprint.n_layer):
            raise InputError(f"trace records: layers must be in [0, {self.fingerprint.n_layer}) of the model")
        if m == 0:
            return
        self._put(encode_records(np.asarray(seq).reshape(m), phase_a, layer_a, pos,
                                 np.asarray(tokens).reshape(m, n), exp,
                                 None if weights is None else np.asarray(weights).reshape(m, n, self.k)))
        self.records_written += m
        self.rows_written += m * n

    def close(self) -> None:
        if not self._f.closed:
            try:
                os.fsync(self._f.fileno())
            except OSError:
                pass
            self._f.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

