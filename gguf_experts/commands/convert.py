"""gguf-experts convert: a trace to the CSV expert log other llama.cpp tracers write, to other tools' formats
(MBLT, moe-trace CSV, RTRACE01, tracer/REAP JSON, imatrix), and back."""
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
from ..formats.csvlog import encode_trace, read_csv_log, write_csv_chunks
from ..trace.format import TraceData, TraceRecoveryWarning
from ..trace.reader import iter_trace_chunks, read_trace_header

NAME = "convert"
HELP = ("convert between trace.bin, CSV expert logs and other tools' formats (MBLT, moe-trace CSV, RTRACE01, "
        "vLLM/SGLang routed experts; "
        "tracer/REAP JSON and imatrix for counts)")
DESCRIPTION = (HELP + ". The input's format is read from its content; the output's is --to, else the output "
               "name (.mblt, .rtrace, .npz/.npy = routed-npy, .gguf = imatrix, .bin = trace), else: a trace.bin "
               "gives a CSV log (--detail: with seq, phase, token, weights), any other ordered log gives a trace.bin. "
               "routed-npy writes [tokens, layers, k] int32 as vLLM and SGLang return it (layer N = blk.N, -1 = no "
               "routing). Going to a trace needs --model (its fingerprint goes into the header). Logs without "
               "sequences or phases get them inferred (see README, 'Formats other tools write').")
TO = ("trace", "csv", "moe-trace-csv", "mblt", "rtrace", "routed-npy", "tracer-json", "reap-json", "imatrix")
EXTENSIONS = {".mblt": "mblt", ".rtrace": "rtrace", ".gguf": "imatrix", ".bin": "trace", ".npz": "routed-npy",
              ".npy": "routed-npy"}
ORDER = 40


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="trace.bin, a CSV log (plain '# token_id,layer_id,...' or --detail form), or "
                                 "another tool's file (MBLT, moe-trace CSV, RTRACE01, tracer/REAP JSON, imatrix)")
    p.add_argument("--to", choices=TO, help="output format (default: from the output name, see above)")
    p.add_argument("dest", metavar="OUTPUT", help="the converted file (written atomically)")
    p.add_argument("--detail", action="store_true",
                   help="trace -> CSV: write seq,phase,pos,token,layer,expert_0..,weight_0.. (lossless)")
    p.add_argument("--model", "-m", metavar="MODEL.gguf",
                   help="the model the log was captured from: needed to write a trace, to read logs that do not "
                        "say k (CSV, RTRACE01) and to write an imatrix")
    add_output_options(p)


def _target(fmt_in: str, args: argparse.Namespace) -> str:
    """The output format: --to, else the output name's extension, else the usual direction."""
    from ..formats.load import FORMATS

    if args.to:
        return str(args.to)
    ext = Path(args.dest).suffix.lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    if fmt_in == "trace":
        return "csv"
    if FORMATS[fmt_in][1]:
        return "trace"
    raise InputError(f"{args.input} holds counts only; say which count format to write with --to "
                     "(tracer-json, reap-json, imatrix)")


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
    from ..gguf.reader import open_model
    from ..gguf.fingerprint import fingerprint

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


def _convert(args: argparse.Namespace, fmt_in: str, to: str) -> dict[str, Any]:
    """Every conversion other than trace <-> CSV log: through a TraceData (ordered) or ExpertCounts."""
    from ..formats.load import load_counts, load_trace
    from ..formats.write import write_counts, write_ordered
    from ..formats.load import FORMATS

    info: dict[str, Any] = {"input": args.input, "output": args.dest, "direction": f"{fmt_in} -> {to}", "format": to}
    if to in ("tracer-json", "reap-json", "imatrix"):
        counts = load_counts(args.input, args.model)
        write_counts(to, counts, args.dest, model=args.model)
        info["rows"] = int(counts.activations.sum())
        return info
    if not FORMATS[fmt_in][1]:
        raise InputError(f"{args.input} is a {FORMATS[fmt_in][0]}: counts only, no token order, so it cannot "
                         f"become a {to} log; convert it --to tracer-json, reap-json or imatrix")
    if to == "trace" and not args.model:
        raise InputError(f"{args.input}: converting to a trace needs --model MODEL.gguf (the model the log was "
                         "captured from: its fingerprint goes into the trace header)")
    td = load_trace(args.input, args.model)
    if to == "trace":
        rows = {"seq": td.seq, "phase": td.phase, "pos": td.pos, "token": td.token, "layer": td.layer,
                "experts": td.experts, "weights": td.weights}
        meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "converted_from": str(args.input),
                "source_format": fmt_in, "model": Path(args.model).name, "weights": td.weights is not None,
                "phase_known": bool(td.header.meta.get("phase_known", True)),
                "command": " ".join(sys.argv) if sys.argv else ""}
        with atomic_write(args.dest, "wb") as fh:
            for blob in encode_trace([rows], td.header.fingerprint, meta):
                fh.write(blob)
        info["rows"] = len(td)
    elif to == "csv":
        with atomic_write(args.dest, "w") as fh:
            info["rows"] = write_csv_chunks([td], fh, args.detail, td.k, args.detail and td.weights is not None)
    else:
        info["rows"] = write_ordered(to, td, args.dest)
    info["sequences"] = int(len(np.unique(td.seq))) if len(td) else 0
    return info


#: output name endings and the formats they can hold: an output named for another format is refused
TEXT_SUFFIXES = {".csv": ("csv", "moe-trace-csv"), ".tsv": ("csv", "moe-trace-csv"), ".txt": ("csv", "moe-trace-csv"),
                 ".json": ("tracer-json", "reap-json"), ".jsonl": ()}


def _check_output(args: argparse.Namespace, to: str) -> None:
    """Refuse to overwrite the input, and an output name whose extension says another format than the one
    written (``convert log.csv back.csv`` wrote a binary trace named .csv)."""
    dest = Path(args.dest)
    if dest.exists() and os.path.samefile(args.input, dest):
        raise OutputError(f"{args.dest}: is the input; convert writes a new file, give another output name")
    ext = dest.suffix.lower()
    fits = TEXT_SUFFIXES.get(ext, (EXTENSIONS[ext],) if ext in EXTENSIONS else None)
    if fits is not None and to not in fits:
        want = next((e for e, f in EXTENSIONS.items() if f == to), ".csv" if to in ("csv", "moe-trace-csv")
                    else ".json" if to.endswith("json") else None)
        raise OutputError(f"{args.dest}: the output is a {to}, but the name ends in {ext}; "
                          + (f"name it {want}" if want else "give a name that fits") + " (or pick --to)")


def run(args: argparse.Namespace) -> int:
    from ..formats.load import detect_format

    fmt_in = detect_format(args.input)
    to = _target(fmt_in, args)
    _check_output(args, to)
    if args.detail and to != "csv":
        raise InputError("--detail applies to a CSV log output; a CSV log's form is read from its header line")
    if fmt_in == "trace" and to == "csv":
        info = _trace_to_csv(args)
    elif fmt_in == "csv" and to == "trace":
        info = _csv_to_trace(args)
    elif fmt_in == to == "trace":
        raise InputError(f"{args.input} is already a trace; nothing to convert")
    else:
        info = _convert(args, fmt_in, to)
    emit(Output({k: [v] for k, v in info.items()}, document=info,
                text=f"{info['direction']}: {info['rows']} rows from {info['input']}; wrote {info['output']}\n"),
         args.format, args.output)
    return 0
