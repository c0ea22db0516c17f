"""What the analysis commands share: loading any input (trace.bin or another tool's file, detected by content,
see gguf_experts.formats), streaming a trace's chunks and, with --model, the bytes of each expert (checked
against the trace's fingerprint)."""
from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np

from ..errors import InputError
from ..gguf.fingerprint import check_fingerprint
from ..formats.load import Input, open_input
from ..gguf.fingerprint import ModelFingerprint
from ..trace.format import TraceData, TraceHeader

DEFAULT_CHUNK_ROWS = 1 << 16  # rows read per step; the LRU pass splits them into cache-sized pieces


MANY_HELP = ("; several traces or quoted globs (one trace per server) combine: counts add, a cache is simulated "
             "per trace and reported per trace and pooled, sequences keep their origin (README, 'Many traces')")


def add_trace_arguments(p: argparse.ArgumentParser, model_required: bool = False, many: bool = False) -> None:
    what = ("trace.bin written by `gguf-experts capture` (or `convert`), or another tool's file: llama-imatrix "
            "GGUF, tracer/REAP JSON, moe-trace CSV, MBLT, RTRACE01, vLLM/SGLang routed experts")
    if many:
        p.add_argument("trace", nargs="+", metavar="TRACE", help=what + MANY_HELP)
    else:
        p.add_argument("trace", help=what)
    p.add_argument("--model", "-m", metavar="MODEL.gguf", required=model_required,
                   help="the model the trace was captured from: adds bytes (sum of each expert's slices); "
                        "needed for files that do not say k (moe-trace CSV, RTRACE01, CSV logs)")


def open_any(path: str, model: str | None = None, max_rows: int = DEFAULT_CHUNK_ROWS) -> Input:
    """Any supported input: an ordered trace (chunks) or counts (see gguf_experts.formats); a trace of a
    pruned model is given in the original model's expert ids (prune_map)."""
    from ..gguf.expert_ids import original_input

    return original_input(open_input(path, model, max_rows=max_rows))


def open_trace(path: str, max_rows: int = DEFAULT_CHUNK_ROWS, model: str | None = None
               ) -> tuple[TraceHeader, Iterator[TraceData]]:
    """The header, and the chunks (bounded memory for trace.bin). Count-only inputs are refused with the
    reason (NeedsTraceError): the caller replays tokens in order."""
    inp = open_any(path, model, max_rows=max_rows)
    inp.require_order()
    assert inp.header is not None and inp.chunks is not None
    return inp.header, inp.chunks


def expert_bytes(model_path: str | None, header: TraceHeader | ModelFingerprint, trace_name: str
                 ) -> np.ndarray | None:
    """[n_layer, n_expert] bytes per expert of the model (None without --model). A fingerprint made from a
    foreign file (no tensor digest) is checked by shape only."""
    if not model_path:
        return None
    from ..gguf.fingerprint import fingerprint_for
    from ..gguf.reader import open_model
    from ..gguf.fingerprint import check_model
    from ..gguf.layout import expert_bytes as eb_frame
    from ..gguf.fingerprint import fingerprint
    from ..gguf.expert_ids import mapping_of

    model = open_model(model_path)
    fp = header.fingerprint if isinstance(header, TraceHeader) else header
    pruned = mapping_of(model.kv)
    if pruned is not None and fp.tensor_digest:  # a pruned model: bytes of the kept experts, original ids
        check_fingerprint(fp, pruned.source_fp(), trace_name=trace_name, model_name=model_path)
    elif fp.tensor_digest:
        check_model(fp, model, trace_name)
    else:
        fingerprint_for(trace_name, fingerprint(model), fp.n_layer, fp.n_expert, fp.n_expert_used)
    df = eb_frame(model)
    if pruned is not None and fp.tensor_digest and len(df):
        df = df.assign(expert=pruned.lut(int(df["layer"].max()) + 1)[df["layer"].to_numpy(np.int64),
                                                                      df["expert"].to_numpy(np.int64)])
    out = np.zeros((max(fp.n_layer, model.block_count), fp.n_expert), np.float64)
    if len(df):
        out[df["layer"].to_numpy(np.int64), df["expert"].to_numpy(np.int64)] = df["bytes"].to_numpy(np.float64)
    return out[:fp.n_layer]


def parse_int_list(text: str | None, what: str) -> list[int] | None:
    """'8,16,32' -> [8, 16, 32]; suffixes K/M/G (binary) allowed for byte sizes."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        p = part.strip().upper().removesuffix("B").removesuffix("I")
        mult = 1
        if p and p[-1] in "KMGT":
            mult = 1024 ** ("KMGT".index(p[-1]) + 1)
            p = p[:-1]
        try:
            v = float(p) * mult
        except ValueError:
            raise InputError(f"{what}: {part!r} is not a number; give e.g. 8,16,32 or 4G") from None
        if v <= 0 or v != int(v):
            raise InputError(f"{what}: {part!r} must be a positive whole number")
        out.append(int(v))
    return out
