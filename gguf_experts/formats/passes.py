"""Ordered logs without sequences or phases (MBLT, moe-trace CSV): records of (layer, n_tokens x k ids) in
graph order, turned into a TraceData and back.

A forward pass is a run of records whose layer increases; a layer that does not increase starts the next
pass (so a model with a single MoE layer cannot be split into passes). A pass where some layer routes more
than one token is prefill, else decode; a prefill pass right after a decode pass starts a new sequence.
Positions count the tokens of the passes of a sequence; a record with fewer rows than its pass (the last
layer after llama.cpp drops rows without outputs) holds the pass's last tokens. What cannot be told from such
a log: a one-token prompt reads as decode, and two prompts without decode between them read as one sequence.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..trace.format import PHASE_DECODE, PHASE_PREFILL, TraceData, TraceHeader
from ..gguf.fingerprint import ModelFingerprint


def records_to_trace(rec_layer: np.ndarray, rec_n: np.ndarray, ids: np.ndarray, fp: ModelFingerprint,
                     meta: dict[str, Any] | None = None) -> TraceData:
    """TraceData from records: rec_layer/rec_n [R], ids [sum(rec_n), k] rows in record order."""
    rec_layer = np.asarray(rec_layer, np.int64)
    rec_n = np.asarray(rec_n, np.int64)
    header = TraceHeader(version=1, fingerprint=fp, meta=dict(meta or {}))
    keep = rec_n > 0
    rec_layer, rec_n = rec_layer[keep], rec_n[keep]
    if not len(rec_n):
        return TraceData.empty(header)
    start = np.r_[True, rec_layer[1:] <= rec_layer[:-1]]
    starts = np.flatnonzero(start)
    pid = np.cumsum(start) - 1
    ntok = np.maximum.reduceat(rec_n, starts)
    phase = np.where(ntok > 1, PHASE_PREFILL, PHASE_DECODE).astype(np.uint8)
    new_seq = np.r_[True, (phase[1:] == PHASE_PREFILL) & (phase[:-1] == PHASE_DECODE)]
    seq = np.cumsum(new_seq) - 1
    before = np.cumsum(ntok) - ntok  # tokens of all earlier passes
    pos0 = before - before[np.flatnonzero(new_seq)][seq]
    rec_pos0 = pos0[pid] + ntok[pid] - rec_n
    total = int(rec_n.sum())
    row_start = np.cumsum(rec_n) - rec_n
    within = np.arange(total) - np.repeat(row_start, rec_n)
    return TraceData(seq=np.repeat(seq[pid], rec_n).astype(np.int32),
                     phase=np.repeat(phase[pid], rec_n), pos=(np.repeat(rec_pos0, rec_n) + within).astype(np.int32),
                     token=np.full(total, -1, np.int32), layer=np.repeat(rec_layer, rec_n).astype(np.int32),
                     experts=np.ascontiguousarray(ids, dtype=np.int32).reshape(total, -1), weights=None,
                     header=header, n_records=len(rec_n))


def trace_records(td: TraceData) -> tuple[np.ndarray, np.ndarray]:
    """(record start row, rows) of a trace: runs of consecutive rows of one sequence, phase and layer, as a
    capture writes them (one record per ubatch and layer)."""
    n = len(td)
    if not n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.r_[True, (td.layer[1:] != td.layer[:-1]) | (td.seq[1:] != td.seq[:-1])
                   | (td.phase[1:] != td.phase[:-1])]
    starts = np.flatnonzero(change)
    return starts, np.diff(np.r_[starts, n])
