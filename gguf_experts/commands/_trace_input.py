"""What the analysis commands share: streaming a trace's chunks and, with --model, the bytes of each
expert (checked against the trace's fingerprint)."""
from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np

from ..errors import InputError
from ..fingerprint import check_fingerprint
from ..trace.format import TraceData, TraceHeader
from ..trace.reader import iter_trace_chunks, read_trace_header

DEFAULT_CHUNK_ROWS = 1 << 16  # rows read per step; the LRU pass splits them into cache-sized pieces


def add_trace_arguments(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    p.add_argument("trace", help="trace.bin written by `gguf-experts capture` (or `convert`)")
    p.add_argument("--model", "-m", metavar="MODEL.gguf", required=model_required,
                   help="the model the trace was captured from: adds bytes (sum of each expert's slices)")


def open_trace(path: str, max_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[TraceHeader, Iterator[TraceData]]:
    """The header, and the chunks (bounded memory whatever the trace size); a trace of a pruned model
    is given in the original model's expert ids (prune_map)."""
    from ..prune_map import to_original, translate_header

    return translate_header(read_trace_header(path)), to_original(iter_trace_chunks(path, max_rows=max_rows))


def expert_bytes(model_path: str | None, header: TraceHeader, trace_name: str) -> np.ndarray | None:
    """[n_layer, n_expert] bytes per expert of the model (None without --model)."""
    if not model_path:
        return None
    from ..gguf_file import open_model
    from ..join import check_model
    from ..layout import expert_bytes as eb_frame
    from ..prune_map import mapping_of

    model = open_model(model_path)
    pruned = mapping_of(model.kv)
    if pruned is None:
        check_model(header.fingerprint, model, trace_name)
    else:  # bytes of the kept experts under their original ids
        check_fingerprint(header.fingerprint, pruned.source_fp(), trace_name=trace_name, model_name=model_path)
    fp = header.fingerprint
    df = eb_frame(model)
    if pruned is not None and len(df):
        df = df.assign(expert=pruned.lut(int(df["layer"].max()) + 1)[df["layer"].to_numpy(np.int64),
                                                                      df["expert"].to_numpy(np.int64)])
    out = np.zeros((fp.n_layer, fp.n_expert), np.float64)
    if len(df):
        out[df["layer"].to_numpy(np.int64), df["expert"].to_numpy(np.int64)] = df["bytes"].to_numpy(np.float64)
    return out


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
