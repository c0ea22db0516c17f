"""gguf-experts check-overlaps: prove a byte map sound (exit 0 clean, 1 with findings, 2 unreadable)."""
from __future__ import annotations

import argparse

from ..check import check_paths
from ..reporters.tabular import Output, add_output_options, emit, frame_records, frame_to_table

NAME = "check-overlaps"
HELP = "check GGUF files or byte maps for overlaps, truncation, misalignment, untiled slices and gaps"
ORDER = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="GGUF file (any shard) or a CSV/JSON byte map (needs name, offset, size)")
    add_output_options(p)


def run(args: argparse.Namespace) -> int:
    findings = check_paths(args.inputs)
    n = len(findings)

    def text() -> str:
        if not n:
            return f"clean: {len(args.inputs)} input(s), no overlaps, truncation, misalignment or gaps\n"
        counts = findings["kind"].value_counts().to_dict()
        head = f"{n} finding(s): " + ", ".join(f"{v} {k}" for k, v in counts.items())
        return head + "\n" + frame_to_table(findings[["source", "kind", "file", "name", "start", "end", "detail"]],
                                            max_rows=200)

    emit(Output(findings, document={"clean": n == 0, "findings": frame_records(findings)}, text=text),
         args.format, args.output)
    return 1 if n else 0
