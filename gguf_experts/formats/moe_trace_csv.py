"""The CSV of llama.cpp PR #28544's ``llama-moe-trace`` (examples/moe-trace): one ``layer,expert`` row per
routed activation, no header, in graph order (per ubatch, per MoE layer, token by token, k rows per token).

The file says neither k nor the expert count: both come from the model (--model). Note: that tool copies
``ffn_moe_topk`` as if it were contiguous, but it is a strided view of the argsort, so its rows for
multi-token (prefill) ubatches are not the selected experts; decode rows are right. We read what is written.
"""
from __future__ import annotations

import os
import re
from typing import IO

import numpy as np
import pandas as pd

from ..errors import InputError
from ..gguf.fingerprint import ModelFingerprint
from ..trace.format import TraceData
from .passes import records_to_trace, trace_records

LINE = re.compile(rb"^\s*\d+\s*,\s*-?\d+\s*$")
#: a fork of the PR (Cartaz/llama.cpp-vulkan-moe) adds a header and phase/token/rank columns
FORK_HEADER = b"phase,token,layer,rank,expert"


def looks_like(head: bytes) -> bool:
    """Content check: the first non-empty line is two integers, or the fork's header."""
    for line in head.splitlines()[:2]:
        if line.strip():
            return bool(LINE.match(line)) or line.strip() == FORK_HEADER
    return False


def _read_fork(path: str, fp: ModelFingerprint) -> TraceData:
    """The fork's 'phase,token,layer,rank,expert' rows (phase 'prefill'/'decode', token a running index, k
    rows per token and layer in rank order): phases are real here; one sequence, pos = token."""
    from ..trace.format import TraceHeader

    try:
        df = pd.read_csv(path, dtype={"phase": str, "token": np.int64, "layer": np.int64, "rank": np.int64,
                                      "expert": np.int64}, engine="c")
    except (ValueError, pd.errors.ParserError) as e:
        raise InputError(f"{path}: malformed moe-trace CSV ({str(e).strip().splitlines()[0]}); rows must be "
                         "phase,token,layer,rank,expert") from None
    k, n = fp.n_expert_used, len(df)
    phase = df["phase"].map({"prefill": 0, "decode": 1})
    if phase.isna().any():
        bad = int(np.argmax(phase.isna().to_numpy()))
        raise InputError(f"{path}: line {bad + 2}: phase {df['phase'].iloc[bad]!r} is not prefill or decode")
    rank = df["rank"].to_numpy()
    if n % k or not np.array_equal(rank, np.tile(np.arange(k), n // k)):
        raise InputError(f"{path}: ranks do not run 0..{k - 1} for every token and layer (k = {k}, the model's); "
                         "the file is cut or from another model")
    head = np.arange(0, n, k)
    layer, expert = df["layer"].to_numpy()[head], df["expert"].to_numpy()
    if (layer < 0).any() or (layer >= fp.n_layer).any() or (expert < 0).any() or (expert >= fp.n_expert).any():
        raise InputError(f"{path}: a layer or expert id outside the model ({fp.n_layer} layers, {fp.n_expert} "
                         "experts); pass the model the trace was made with")
    m = len(head)
    header = TraceHeader(version=1, fingerprint=fp, meta={"converted_from": path, "source_format": "moe-trace-csv"})
    return TraceData(seq=np.zeros(m, np.int32), phase=phase.to_numpy()[head].astype(np.uint8),
                     pos=df["token"].to_numpy()[head].astype(np.int32), token=np.full(m, -1, np.int32),
                     layer=layer.astype(np.int32), experts=expert.reshape(m, k).astype(np.int32), weights=None,
                     header=header, n_records=m)


def read_moe_trace_csv(path: str | os.PathLike[str], fp: ModelFingerprint) -> TraceData:
    """A moe-trace CSV as a TraceData of the model ``fp`` (k and the expert count come from it)."""
    where = str(path)
    with open(path, "rb") as f:
        if f.readline().strip() == FORK_HEADER:
            return _read_fork(where, fp)
    try:
        df = pd.read_csv(path, header=None, names=["layer", "expert"], dtype=np.int64, skip_blank_lines=True,
                         engine="c")
    except (ValueError, pd.errors.ParserError) as e:
        raise InputError(f"{where}: not a moe-trace CSV: every line must be 'layer,expert' "
                         f"(two integers) ({str(e).strip().splitlines()[0]})") from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{where}: empty moe-trace CSV; trace some tokens first") from None
    layer = df["layer"].to_numpy()
    expert = df["expert"].to_numpy()
    k, M = fp.n_expert_used, fp.n_expert
    if len(layer) and (int(layer.min()) < 0 or int(layer.max()) >= fp.n_layer):
        bad = int(np.argmax((layer < 0) | (layer >= fp.n_layer)))
        raise InputError(f"{where}: line {bad + 1}: layer {int(layer[bad])} outside the model's {fp.n_layer} "
                         "layers; pass the model the trace was made with")
    if len(expert) and (int(expert.min()) < 0 or int(expert.max()) >= M):
        bad = int(np.argmax((expert < 0) | (expert >= M)))
        raise InputError(f"{where}: line {bad + 1}: expert {int(expert[bad])} outside [0, {M}); "
                         "pass the model the trace was made with")
    starts = np.flatnonzero(np.r_[True, layer[1:] != layer[:-1]]) if len(layer) else np.zeros(0, np.int64)
    lens = np.diff(np.r_[starts, len(layer)])
    odd = np.flatnonzero(lens % k)
    if len(odd):
        s = int(starts[odd[0]])
        raise InputError(f"{where}: line {s + 1}: a run of {int(lens[odd[0]])} rows of layer {int(layer[s])} is not "
                         f"a multiple of k = {k} (the model's experts per token); the file is cut or from "
                         "another model")
    return records_to_trace(layer[starts], lens // k, expert.reshape(-1, k), fp,
                            {"converted_from": where, "source_format": "moe-trace-csv"})


def write_moe_trace_csv(td: TraceData, fh: IO[str]) -> int:
    """Write ``layer,expert`` rows (token-major, top-k order); returns the rows written."""
    if not len(td):
        return 0
    starts, lens = trace_records(td)
    del starts, lens  # rows are already in record order: one row per (token, slot)
    rows = np.column_stack([np.repeat(td.layer, td.k), td.experts.reshape(-1)])
    pd.DataFrame(rows).to_csv(fh, header=False, index=False, lineterminator="\n")
    return int(rows.shape[0])
