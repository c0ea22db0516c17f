"""gguf-experts convert: a trace to the CSV expert log other llama.cpp tracers write, and back."""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from itertools import chain
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from ..atomic import atomic_write
from ..errors import InputError, OutputError
from ..reporters.tabular import Output, add_output_options, emit
from ..trace.csvlog import PLAIN_PREFIX, encode_trace, read_csv_log, write_csv_chunks
from ..trace.format import MAGIC, TraceData, TraceRecoveryWarning
from ..trace.reader import iter_trace_chunks, read_trace_header

NAME = "convert"
HELP = "convert trace.bin to a CSV expert log (--detail: with seq, phase, token, weights), or a CSV log back"
DESCRIPTION = (HELP + ". The direction follows the input: a trace.bin gives CSV; a CSV log gives a trace and "
               "needs --model (the plain log has no sequences, phases or token ids: sequences are inferred, "
               "rows count as decode, token ids are -1).")
ORDER = 40


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="trace.bin, or a CSV log (plain '# token_id,layer_id,...' or --detail form)")
    p.add_argument("dest", metavar="OUTPUT", help="the converted file (written atomically)")
    p.add_argument("--detail", action="store_true",
                   help="trace -> CSV: write seq,phase,pos,token,layer,expert_0..,weight_0.. (lossless)")
    p.add_argument("--model", metavar="MODEL.gguf", help="CSV -> trace: the model the log was captured from")
    add_output_options(p)


def _is_csv_log(args: argparse.Namespace) -> bool:
    """The input's direction: by its first bytes, else by --model / a .csv name (for the error message)."""
    with open(args.input, "rb") as f:
        head = f.read(len(PLAIN_PREFIX))
    if head.startswith(MAGIC[:4]):
        return False
    if head.startswith(b"# token_id") or head.startswith(b"seq,"):
        return True
    return bool(args.model) or str(args.input).lower().endswith(".csv")


def _trace_to_csv(args: argparse.Namespace) -> dict[str, Any]:
    header = read_trace_header(args.input)
    k = header.fingerprint.n_expert_used
    weights = False
    if args.detail:
        # the weight columns must be known before the first row: from the capture's meta, else one pass
        weights = bool(header.meta["weights"]) if "weights" in header.meta else any(
            c.weights is not None for c in _quiet(iter_trace_chunks(args.input)))
    with atomic_write(args.dest, "w") as fh:
        rows = write_csv_chunks(iter_trace_chunks(args.input), fh, args.detail, k, weights)
    return {"input": args.input, "output": args.dest, "direction": "trace -> csv",
            "format": "detail" if args.detail else "plain", "rows": rows}


def _quiet(chunks: Iterator[TraceData]) -> Iterator[TraceData]:
    """The chunks without their recovery warning (the writing pass warns once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TraceRecoveryWarning)
        yield from chunks


def _csv_to_trace(args: argparse.Namespace) -> dict[str, Any]:
    if not args.model:
        raise InputError(f"{args.input}: converting a CSV log to a trace needs --model MODEL.gguf (the model "
                         "the log was captured from: its fingerprint goes into the trace header)")
    from ..gguf_file import open_model
    from ..layout import fingerprint

    model = open_model(args.model)
    fp = fingerprint(model)
    chunks = read_csv_log(args.input, fp)
    first = next(chunks, None)
    stats: dict[str, Any] = {"rows": 0, "seqs": set()}

    def counted() -> Iterator[dict[str, Any]]:
        for rows in chain([first] if first is not None else [], chunks):
            stats["rows"] += len(rows["seq"])
            stats["seqs"].update(np.unique(rows["seq"]).tolist())
            yield rows

    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "converted_from": str(args.input),
            "model": model.path.name, "weights": first is not None and first["weights"] is not None,
            "command": " ".join(sys.argv) if sys.argv else ""}
    with atomic_write(args.dest, "wb") as fh:
        for blob in encode_trace(counted(), fp, meta):
            fh.write(blob)
    return {"input": args.input, "output": args.dest, "direction": "csv -> trace", "format": "trace",
            "rows": stats["rows"], "sequences": len(stats["seqs"])}


#: output name endings that say the other format (a CSV named .bin, a trace named .csv)
CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".jsonl")
BINARY_SUFFIXES = (".bin", ".trace", ".gguf")


def _check_output(args: argparse.Namespace, to_csv: bool) -> None:
    """Refuse to overwrite the input, and an output name whose extension says the other format."""
    dest = Path(args.dest)
    if dest.exists() and os.path.samefile(args.input, dest):
        raise OutputError(f"{args.dest}: is the input; convert writes a new file, give another output name")
    suffix = dest.suffix.lower()
    if to_csv and suffix in BINARY_SUFFIXES:
        raise OutputError(f"{args.dest}: a trace converts to a CSV log, but the name ends in {suffix}; "
                          "name it .csv")
    if not to_csv and suffix in CSV_SUFFIXES:
        raise OutputError(f"{args.dest}: a CSV log converts to a binary trace, but the name ends in {suffix}; "
                          "name it .bin")


def run(args: argparse.Namespace) -> int:
    import pandas as pd  # here, not at import: the CLI builds every command's parser at start-up

    work = _csv_to_trace if _is_csv_log(args) else _trace_to_csv
    _check_output(args, to_csv=work is _trace_to_csv)
    if args.detail and work is _csv_to_trace:
        raise InputError("--detail applies to trace -> CSV; a CSV log's form is read from its header line")
    info = work(args)
    emit(Output(pd.DataFrame([info]), document=info,
                text=f"{info['direction']}: {info['rows']} rows from {info['input']}; wrote {info['output']}\n"),
         args.format, args.output)
    return 0
