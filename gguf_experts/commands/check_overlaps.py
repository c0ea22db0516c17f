"""gguf-experts check-overlaps: prove a byte map sound (exit 0 clean, 1 with findings, 2 unreadable)."""
from __future__ import annotations

import argparse
import warnings

from ..gguf.check import check_inputs
from ..errors import GGUFExpertsWarning
from ..reporters.tabular import Output, add_output_options, emit, frame_records, frame_to_table, resolve_format

NAME = "check-overlaps"
HELP = "check GGUF files or byte maps for overlaps, truncation, misalignment, untiled slices and gaps"
ORDER = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="GGUF file (any shard) or a CSV/JSON byte map (needs name, offset, size)")
    p.add_argument("--file-size", type=int, default=None, metavar="N",
                   help="a byte map's file size in bytes, for the past_eof check (a map of one file)")
    p.add_argument("--alignment", type=int, default=None, metavar="A",
                   help="a byte map's alignment (general.alignment, usually 32), for the misaligned and gap checks")
    add_output_options(p)


def run(args: argparse.Namespace) -> int:
    res = check_inputs(args.inputs, file_size=args.file_size, alignment=args.alignment)
    findings = res.findings
    n = len(findings)

    def text() -> str:
        skipped = "".join(f"{line}\n" for line in res.not_run)
        if not n:
            if res.not_run:
                return (f"no findings in {len(args.inputs)} input(s) from the checks that ran (overlaps, gaps, "
                        "tiling)\n" + skipped)
            return f"clean: {len(args.inputs)} input(s), no overlaps, truncation, misalignment or gaps\n"
        counts = findings["kind"].value_counts().to_dict()
        head = f"{n} finding(s): " + ", ".join(f"{v} {k}" for k, v in counts.items())
        return head + "\n" + skipped + frame_to_table(
            findings[["source", "kind", "file", "name", "start", "end", "detail"]], max_rows=200)

    doc = {"clean": n == 0, "findings": frame_records(findings)}
    if res.not_run:
        doc["not_run"] = res.not_run
        if resolve_format(args.format, args.output) == "csv":  # CSV rows cannot say it: stderr does
            for line in res.not_run:
                warnings.warn(GGUFExpertsWarning(line), stacklevel=1)
    emit(Output(findings, document=doc, text=text), args.format, args.output)
    return 1 if n else 0
