"""gguf-experts join-trace: which bytes of the model a traced run read, per expert, slice or file page."""
from __future__ import annotations

import argparse
from typing import Any

import pandas as pd

from ..heat import HeatResult, join
from ..reporters.heat_text import summary_text
from ..reporters.tabular import Output, add_output_options, emit, frame_records, frame_to_table
from ._dask_options import add_dask_options, dask_settings
from ._trace_input import open_any
from ._types import at_least

NAME = "join-trace"
HELP = "join a trace with its model: activations and bytes read per expert, expert slice (tensor) or file page"
ORDER = 45


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", nargs="+", metavar="TRACE",
                   help="trace.bin written by `gguf-experts capture` (or `convert`), or another tool's file "
                        "(llama-imatrix GGUF, tracer/REAP JSON, moe-trace CSV, MBLT, RTRACE01, vLLM/SGLang routed "
                        "experts); several traces or quoted globs: their counts add")
    p.add_argument("--model", "-m", required=True, metavar="MODEL.gguf",
                   help="the model the trace was captured from (any shard of a split model)")
    p.add_argument("--by", choices=("expert", "tensor", "page"), default="expert",
                   help="rows per (layer, expert) [default], per expert slice of each tensor, or per run of "
                        "file pages with equal heat")
    p.add_argument("--page-size", type=at_least(1), default=4096, metavar="BYTES",
                   help="page size for --by page (default 4096; a power of two)")
    add_output_options(p)
    add_dask_options(p)


def frame_for(res: HeatResult, by: str, page_size: int) -> pd.DataFrame:
    if by == "tensor":
        return res.slices
    if by == "page":
        return res.pages(page_size)
    return res.experts


def _source(paths: list[str], model: str) -> Any:
    """What join takes: one input as before; several: their chunks one after another (counts add), or the sum
    of their counts when any of them holds counts only."""
    if len(paths) == 1:
        inp = open_any(paths[0], model)
        return paths[0] if inp.format == "trace" else (inp.counts if inp.counts is not None else inp.chunks)
    from ..fleet import join_source, open_all

    return join_source(open_all(paths, model))


def run(args: argparse.Namespace) -> int:
    from ..fleet import expand

    paths = expand(args.trace)
    settings = dask_settings(args)
    if settings.wanted:  # counted by Dask workers, per trace and per part of a big trace.bin
        from ..fleet_dask import join_fleet, runner_for

        with runner_for(settings) as runner:
            res: HeatResult = join_fleet(runner, paths, args.model)
    else:
        res = join(_source(paths, args.model), args.model)
    if len(paths) > 1:
        res.summary["traces"] = paths
    df = frame_for(res, args.by, args.page_size)
    doc = {"summary": res.summary, "layers": frame_records(res.layers), "by": args.by, "rows": frame_records(df)}
    if args.by == "page":
        doc["page_size"] = args.page_size

    def text() -> str:
        shown = df.sort_values("bytes_read", ascending=False, kind="stable") if args.by != "expert" else df
        return (summary_text(res.summary) + "\n" + frame_to_table(res.layers) + "\n"
                + frame_to_table(shown, max_rows=40))
    emit(Output(df, document=doc, text=text), args.format, args.output)
    return 0
