"""mbolt's MBLT v1 binary routing trace (``mbolt/trace.py`` of the mbolt package).

Little-endian int32 stream: header ``MAGIC 0x544C424D ("MBLT"), version 1, n_expert``, then records
``layer, k, n_tokens, ids[n_tokens * k]`` (token-major) in graph order. No sequences, phases, positions,
token ids or weights: see ``passes`` for what is inferred. mbolt drops a truncated last record; so do we,
with a warning.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from ..errors import InputError
from ..gguf.fingerprint import ModelFingerprint
from ..trace.format import TraceData, TraceRecoveryWarning, warn_empty_records
from .passes import records_to_trace, trace_records

MAGIC = 0x544C424D
MAGIC_BYTES = b"MBLT"
VERSION = 1
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS


def read_records(path: str | os.PathLike[str]) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """(n_expert, k, rec_layer, rec_n, ids [rows, k]) of an MBLT file."""
    raw = np.fromfile(path, dtype="<i4")
    where = str(path)
    if len(raw) < 3 or int(raw[0]) != MAGIC:
        raise InputError(f"{where}: not an MBLT trace (no 'MBLT' magic and header); pass an mbolt trace")
    if int(raw[1]) != VERSION:
        raise InputError(f"{where}: MBLT version {int(raw[1])}; only version {VERSION} is known")
    n_expert = int(raw[2])
    if not 0 < n_expert <= 1024:
        raise InputError(f"{where}: MBLT header says {n_expert} experts; the header is damaged")
    layers, ns, spans = [], [], []
    pos, size, k = 3, len(raw), None
    empty, first_empty = 0, -1
    while pos + 3 <= size:
        layer, kk, n = int(raw[pos]), int(raw[pos + 1]), int(raw[pos + 2])
        at = pos * 4
        if k is None:
            k = kk
        if kk != k or not 0 < kk <= n_expert or not 0 <= layer < MAX_LAYERS or n < 0:
            raise InputError(f"{where}: damaged MBLT record at byte {at} (layer {layer}, k {kk}, n_tokens {n}; "
                             f"expected k {k} of {n_expert} experts); the file is not a complete MBLT trace")
        end = pos + 3 + n * kk
        if end > size:
            break
        if n == 0:  # a degenerate record: skipped and said (docs/trace-format.md, "Degenerate records")
            empty, first_empty = empty + 1, at if first_empty < 0 else first_empty
        else:
            layers.append(layer)
            ns.append(n)
            spans.append((pos + 3, end))
        pos = end
    if pos < size:
        warnings.warn(TraceRecoveryWarning(f"{where}: truncated MBLT record at byte {pos * 4}; kept the "
                                           f"{len(ns)} complete records before it, dropped {(size - pos) * 4} bytes"),
                      stacklevel=2)
    if empty:
        warn_empty_records(where, empty, first_empty, [])
    kk = int(k or 0)  # 0: no record says (an empty file); read_mblt takes the model's
    ids = (np.concatenate([raw[a:b] for a, b in spans]) if spans else np.zeros(0, np.int32)).reshape(-1, max(kk, 1))
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n_expert):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise InputError(f"{where}: expert id {bad} outside [0, {n_expert}); the MBLT file is damaged")
    return n_expert, kk, np.asarray(layers, np.int64), np.asarray(ns, np.int64), ids


def read_mblt(path: str | os.PathLike[str], fp: ModelFingerprint | None = None) -> TraceData:
    """An MBLT file as a TraceData; ``fp`` (the model's) is checked against the file, else made from it."""
    from ..gguf.fingerprint import fingerprint_for

    n_expert, k, rec_layer, rec_n, ids = read_records(path)
    if not k:  # no records: top-k is the model's (EmptyRecordsWarning from open_input says the file is empty)
        k = fp.n_expert_used if fp is not None else 1
        ids = ids.reshape(0, k)
    n_layer = int(rec_layer.max()) + 1 if len(rec_layer) else 0
    fpr = fingerprint_for(str(path), fp, n_layer, n_expert, k)
    return records_to_trace(rec_layer, rec_n, ids, fpr, {"converted_from": str(path), "source_format": "mblt"})


def encode_mblt(td: TraceData) -> bytes:
    """MBLT bytes of a trace: one record per run of rows of one (sequence, phase, layer)."""
    fp = td.header.fingerprint
    starts, lens = trace_records(td)
    k = td.k
    parts = [np.array([MAGIC, VERSION, fp.n_expert], "<i4")]
    for s, n in zip(starts.tolist(), lens.tolist()):
        parts.append(np.array([int(td.layer[s]), k, n], "<i4"))
        parts.append(td.experts[s:s + n].astype("<i4").ravel())
    return np.concatenate(parts).tobytes()
