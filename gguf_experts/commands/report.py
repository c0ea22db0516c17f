"""gguf-experts report: one self-contained HTML report of a trace (two traces: each shown, switchable, with
their difference), a PNG heatmap and a browser screenshot. The assembly lives in gguf_experts.report."""
from __future__ import annotations

import argparse
import os

from ..errors import InputError
from ..reporters.tabular import Output, add_output_options, emit
from ._dask_options import add_dask_options, dask_settings

NAME = "report"
HELP = "write a self-contained HTML report (heatmap, file-offset strip, cache curves, hottest experts) of a trace"
DESCRIPTION = (HELP + "; with a second trace each trace's numbers are shown under its name (a switch at the top) "
               "and their difference is added. --png writes a static heatmap, one panel per trace (needs the "
               "[plot] extra), --screenshot a PNG of the rendered report (needs chromium). All files are "
               "written together: if one fails, none is left behind.")
ORDER = 65


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("traces", nargs="+", metavar="TRACE.bin",
                   help="one trace, or two to compare (B minus A); another tool's file too (imatrix, tracer/REAP "
                        "JSON: no cache curves; moe-trace CSV, MBLT, RTRACE01, vLLM/SGLang routed experts). A quoted "
                        "glob or a comma-separated list is one side of several traces (servers): counts add, cache "
                        "curves are simulated per trace and pooled")
    p.add_argument("--model", "-m", required=True, metavar="MODEL.gguf",
                   help="the model the trace(s) were captured from (any shard of a split model)")
    p.add_argument("-o", "--output", metavar="REPORT.html", default="report.html",
                   help="the HTML file to write, atomically (default report.html)")
    p.add_argument("--png", metavar="HEAT.png", help="also write a static heatmap PNG (matplotlib)")
    p.add_argument("--screenshot", metavar="SHOT.png",
                   help="also render the report in headless chromium and save a screenshot of its window")
    p.add_argument("--screenshot-size", metavar="WxH", default=None,
                   help="the screenshot's window in pixels (default 1280x1800)")
    p.add_argument("--labels", nargs=2, metavar=("A", "B"), help="names of the two traces (default: file names)")
    p.add_argument("--no-cache", action="store_true", help="leave out the cache curves and working sets")
    p.add_argument("--no-opt", action="store_true",
                   help="leave out Belady's OPT curves (simulated with the whole trace in memory)")
    add_output_options(p, output=False, what="the list of files written, on stdout")
    add_dask_options(p)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'1280x1400' -> (1280, 1400)."""
    if text is None:
        return None
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or not (200 <= int(w) <= 8000 and 200 <= int(h) <= 20000):
        raise InputError(f"--screenshot-size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1280x1400")
    return int(w), int(h)


def run(args: argparse.Namespace) -> int:
    import pandas as pd  # here, not at import: the CLI builds every command's parser at start-up

    from pathlib import Path

    from ..gguf.reader import open_model
    from ..report import build_report, check_output_names, load_inputs, write_report

    size = parse_size(args.screenshot_size)  # a bad size fails before the work
    check_output_names(args.output, args.png, args.screenshot)
    from ..fleet import expand, labels as short_names, open_all

    m = open_model(args.model)
    sides = [expand([p for p in t.split(",") if p] if "," in t and not Path(t).exists() else [t])
             for t in args.traces]
    if sum(len(s) for s in sides) > len(sides):  # a fleet side: every trace of every side of one model
        open_all([p for s in sides for p in s], args.model)
    loaded: list = [load_inputs(s, m) if len(s) > 1 else load_inputs(s, m)[0] for s in sides]
    labels = args.labels or [short_names(s)[0] + (f" +{len(s) - 1}" if len(s) > 1 else "") for s in sides]
    settings = dask_settings(args)
    if settings.wanted and any(len(s) > 1 for s in sides):  # a fleet side: counted and simulated on Dask
        from ..fleet_dask import runner_for

        with runner_for(settings) as runner:
            inp = build_report(loaded, m, labels=labels, cache=not args.no_cache, opt=not args.no_opt, runner=runner)
    else:
        inp = build_report(loaded, m, labels=labels, cache=not args.no_cache, opt=not args.no_opt)
    written = write_report(args.output, inp, png=args.png, screenshot=args.screenshot, screenshot_size=size)
    df = pd.DataFrame({"output": [w for w, _ in written], "path": [p for _, p in written],
                       "bytes": [os.path.getsize(p) for _, p in written]})
    emit(Output(df, text=lambda: "".join(f"wrote {p} ({w}, {os.path.getsize(p):,} bytes)\n" for w, p in written)),
         args.format, None)
    return 0
