"""fitz-tec's RTRACE01 router trace (``fitz_tec/tools/_trace_format.py``, written by llama-router-trace).

Layout (little-endian): ``b"RTRACE01"``, int32 n_experts, int32 header_version (0), then one record per
(token, layer): int32 token_idx, int32 layer_idx, float32 probs[n_experts] (the router's softmax over all
experts). It keeps no k, no phase, no sequence and no gate weights: k comes from the model and the selected
experts are the top-k of probs, as fitz-tec's pin-list builder takes them (exact for softmax routers without
a selection bias; deepseek2-style ``exp_probs_b`` selection is not in the probabilities). Rows keep file
order; pos = token_idx; everything counts as decode (phase unknown).

Because the whole distribution is there, the margin between the k-th and (k+1)-th probability tells how
close each choice was: near-ties are where a CPU and a GPU run can pick different experts.
"""
from __future__ import annotations

import os
import warnings
from typing import IO

import numpy as np

from ..errors import InputError
from ..trace.format import PHASE_DECODE, TraceData, TraceHeader, TraceRecoveryWarning
from ..gguf.fingerprint import ModelFingerprint

MAGIC = b"RTRACE01"
HEADER = 16
BLOCK_ROWS = 1 << 15


def _dtype(n_expert: int) -> np.dtype:
    return np.dtype([("token_idx", "<i4"), ("layer_idx", "<i4"), ("probs", "<f4", (n_expert,))])


def read_rtrace(path: str | os.PathLike[str], fp: ModelFingerprint) -> tuple[TraceData, np.ndarray]:
    """(TraceData, margin [rows] = p_k - p_(k+1)) of an RTRACE01 file, top-k taken with the model's k."""
    where = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER)
    if len(head) < HEADER or head[:8] != MAGIC:
        raise InputError(f"{where}: not an RTRACE01 file (magic {head[:8]!r}); pass a llama-router-trace output")
    n_expert, version = (int(v) for v in np.frombuffer(head[8:], "<i4"))
    if n_expert != fp.n_expert:
        raise InputError(f"{where}: RTRACE01 header says {n_expert} experts, the model has {fp.n_expert}; "
                         "pass the model the trace was made with")
    if version != 0:
        raise InputError(f"{where}: RTRACE01 header_version {version}; only 0 is known")
    dt = _dtype(n_expert)
    n = (size - HEADER) // dt.itemsize
    if (size - HEADER) % dt.itemsize:
        warnings.warn(TraceRecoveryWarning(
            f"{where}: truncated RTRACE01 record at byte {HEADER + n * dt.itemsize}; kept the {n} complete "
            f"records, dropped {(size - HEADER) % dt.itemsize} bytes"), stacklevel=2)
    rec = np.memmap(path, dtype=dt, mode="r", offset=HEADER, shape=(n,)) if n else np.zeros(0, dt)
    k = fp.n_expert_used
    layer = np.asarray(rec["layer_idx"], np.int32)
    tok = np.asarray(rec["token_idx"], np.int32)
    if n and (int(layer.min()) < 0 or int(layer.max()) >= fp.n_layer):
        raise InputError(f"{where}: layer_idx {int(layer.max())} outside the model's {fp.n_layer} layers")
    if n and int(tok.min()) < 0:
        raise InputError(f"{where}: negative token_idx {int(tok.min())}; the file is damaged")
    experts = np.empty((n, k), np.int32)
    margin = np.full(n, np.inf, np.float32)
    for s in range(0, n, BLOCK_ROWS):
        p = np.asarray(rec["probs"][s:s + BLOCK_ROWS], np.float32)
        if not np.isfinite(p).all():
            bad = s + int(np.argmin(np.isfinite(p).all(axis=1)))
            raise InputError(f"{where}: record {bad} (byte {HEADER + bad * dt.itemsize}) has non-finite "
                             "probabilities; the file is damaged")
        order = np.argsort(-p, axis=1, kind="stable")
        experts[s:s + BLOCK_ROWS] = order[:, :k]
        if n_expert > k:
            srt = np.take_along_axis(p, order[:, k - 1:k + 1], axis=1)
            margin[s:s + BLOCK_ROWS] = srt[:, 0] - srt[:, 1]
    header = TraceHeader(version=1, fingerprint=fp,
                         meta={"converted_from": where, "source_format": "rtrace", "phase_known": False})
    td = TraceData(seq=np.zeros(n, np.int32), phase=np.full(n, PHASE_DECODE, np.uint8), pos=tok,
                   token=np.full(n, -1, np.int32), layer=layer, experts=experts, weights=None, header=header,
                   n_records=n)
    return td, margin


def near_ties(layer: np.ndarray, margin: np.ndarray, n_layer: int, threshold: float) -> dict[str, np.ndarray]:
    """Per layer: rows, rows whose k-th/(k+1)-th margin is below threshold, their share, median margin."""
    rows = np.bincount(layer, minlength=n_layer)
    ties = np.bincount(layer[margin < threshold], minlength=n_layer)
    med = np.full(n_layer, np.nan)
    for l in np.flatnonzero(rows):  # one median per layer (tens)
        med[l] = float(np.median(margin[layer == l]))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(rows > 0, ties / np.maximum(rows, 1), np.nan)
    return {"rows": rows, "near_ties": ties, "share": share, "median_margin": med}


def token_index(td: TraceData) -> np.ndarray:
    """A global token index per row: rows of one (sequence, position) are one token, numbered in order of
    first appearance."""
    key = (td.seq.astype(np.int64) << 32) | (td.pos.astype(np.int64) & 0xFFFFFFFF)
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inv.reshape(-1)].astype(np.int32)


def write_rtrace(td: TraceData, fh: IO[bytes]) -> int:
    """Write RTRACE01 from a trace. A trace keeps only the selected experts (and their gate weights), so the
    probabilities written are those weights (a falling ramp without weights) on the selected experts and 0
    elsewhere: the top-k read back is the trace's, but margins and near-ties of such a file mean nothing."""
    fp = td.header.fingerprint
    M, k, n = fp.n_expert, td.k, len(td)
    fh.write(MAGIC + np.array([M, 0], "<i4").tobytes())
    if not n:
        return 0
    tok = token_index(td)
    ramp = (np.arange(k, 0, -1) / (k * (k + 1) / 2)).astype(np.float32)
    dt = _dtype(M)
    for s in range(0, n, BLOCK_ROWS):
        e = td.experts[s:s + BLOCK_ROWS]
        m = len(e)
        w = np.broadcast_to(ramp, e.shape).copy()
        if td.weights is not None:
            tw = td.weights[s:s + BLOCK_ROWS]
            ok = np.isfinite(tw).all(axis=1)
            w[ok] = np.maximum(tw[ok], np.float32(1e-30))  # selected experts stay above the unselected 0
        out = np.zeros(m, dt)
        out["token_idx"], out["layer_idx"] = tok[s:s + m], td.layer[s:s + m]
        np.put_along_axis(out["probs"], e.astype(np.int64), w, axis=1)
        fh.write(out.tobytes())
    return n
