"""gguf-experts report: one self-contained HTML report of a trace (two traces: with their difference), a PNG
heatmap and a browser screenshot. This module does the loading; the reporters only receive data."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..analysis.diff import diff_frames
from ..atomic import atomic_write
from ..errors import InputError
from ..gguf_file import Model, open_model
from ..join import HeatResult, join
from ..layout import byte_map
from ..reporters.html import ReportInput, write_html
from ..reporters.tabular import FORMATS, Output, emit
from ..trace.reader import iter_trace_chunks, read_trace

NAME = "report"
HELP = "write a self-contained HTML report (heatmap, file-offset strip, cache curves, hottest experts) of a trace"
DESCRIPTION = (HELP + "; with a second trace it adds their difference. --png writes a static heatmap "
               "(needs the [plot] extra), --screenshot a PNG of the rendered report (needs chromium).")
ORDER = 60
OPT_CAPACITIES = 12  # Belady's OPT is simulated at this many capacities (LRU: at all of them, in one pass)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("traces", nargs="+", metavar="TRACE.bin", help="one trace, or two to compare (B minus A)")
    p.add_argument("--model", "-m", required=True, metavar="MODEL.gguf",
                   help="the model the trace(s) were captured from (any shard of a split model)")
    p.add_argument("-o", "--output", metavar="REPORT.html", default="report.html",
                   help="the HTML file to write, atomically (default report.html)")
    p.add_argument("--png", metavar="HEAT.png", help="also write a static heatmap PNG (matplotlib)")
    p.add_argument("--screenshot", metavar="SHOT.png",
                   help="also render the report in headless chromium and save a full-page screenshot")
    p.add_argument("--labels", nargs=2, metavar=("A", "B"), help="names of the two traces (default: file names)")
    p.add_argument("--no-cache", action="store_true", help="leave out the cache curves and working sets")
    p.add_argument("--no-opt", action="store_true",
                   help="leave out Belady's OPT curves (simulated with the whole trace in memory)")
    p.add_argument("--format", "-f", choices=FORMATS, default="table",
                   help="format of the list of files written, on stdout (default: table)")


def _expert_bytes(heat: HeatResult, n_layer: int, n_expert: int) -> np.ndarray:
    eb = np.zeros((n_layer, n_expert), np.float64)
    ex = heat.experts
    eb[ex["layer"].to_numpy(dtype=np.int64), ex["expert"].to_numpy(dtype=np.int64)] = \
        ex["bytes_per_activation"].to_numpy(dtype=np.float64)
    return eb


def cache_tables(trace: str | os.PathLike[str], heat: HeatResult, opt: bool = True
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(miss-ratio curves: LRU at every capacity, OPT at OPT_CAPACITIES; working sets) of one trace."""
    from ..analysis.cache import LayerLRU, simulate

    lru = None
    for chunk in iter_trace_chunks(trace, weights=False):
        fp = chunk.header.fingerprint
        if lru is None:
            lru = LayerLRU(fp.n_layer, fp.n_expert, fp.n_expert_used,
                           expert_bytes=_expert_bytes(heat, fp.n_layer, fp.n_expert))
        if len(chunk):
            lru.update(chunk.layer, chunk.experts)
    if lru is None or not len(lru.layers()):
        raise InputError(f"{trace}: the trace has no rows; capture some tokens first")
    curves = [lru.curves()]
    if opt:
        td = read_trace(trace)
        fp = td.header.fingerprint
        caps = np.unique(np.geomspace(1, fp.n_expert, OPT_CAPACITIES).round().astype(np.int64))
        curves.append(simulate(td.layer, td.experts, fp.n_layer, fp.n_expert, "opt", caps,
                               expert_bytes=_expert_bytes(heat, fp.n_layer, fp.n_expert)))
    return pd.concat(curves, ignore_index=True), lru.working_set()


def build_report(traces: Sequence[str | os.PathLike[str]], model: str | os.PathLike[str] | Model,
                 labels: Sequence[str] | None = None, cache: bool = True, opt: bool = True) -> ReportInput:
    """Load everything a report shows: join (and diff) the trace(s), byte map, cache curves, working sets."""
    if not 1 <= len(traces) <= 2:
        raise InputError(f"report takes one trace or two to compare, got {len(traces)}")
    m = model if isinstance(model, Model) else open_model(model)
    names = list(labels) if labels else [Path(t).name for t in traces]
    if len(names) != len(traces):
        raise InputError(f"--labels: {len(names)} names for {len(traces)} traces")
    heats = [join(t, m) for t in traces]
    inp = ReportInput(heat=heats[0], tensors=byte_map(m), sources=[Path(t).name for t in traces],
                      labels=(names[0], names[-1]))
    if cache:
        inp.curves, inp.working_set = cache_tables(traces[0], heats[0], opt=opt)
    if len(heats) == 2:
        inp.diff = diff_frames(heats[0].experts, heats[1].experts, heats[0].layers, heats[1].layers)
    return inp


def write_report(html_path: str | os.PathLike[str], inp: ReportInput, png: str | None = None,
                 screenshot: str | None = None) -> list[tuple[str, str]]:
    """Write the HTML (and PNG heatmap / screenshot); returns [(what, path)] of the files written."""
    out = [("html report", str(html_path))]
    write_html(str(html_path), inp)
    if png:
        from ..reporters.png import write_heat_png

        write_heat_png(png, inp.heat)
        out.append(("png heatmap", png))
    if screenshot:
        from ..reporters.chromium import BrowserError, render_page

        res = render_page(html_path)
        if not res.rendered or res.errors or res.png is None:
            raise BrowserError(f"{html_path}: chromium did not render the report cleanly "
                               f"({'; '.join(res.errors) or 'no render mark'})")
        with atomic_write(screenshot, "wb") as fh:
            fh.write(res.png)
        out.append(("screenshot", screenshot))
    return out


def run(args: argparse.Namespace) -> int:
    inp = build_report(args.traces, args.model, labels=args.labels, cache=not args.no_cache,
                       opt=not args.no_opt)
    written = write_report(args.output, inp, png=args.png, screenshot=args.screenshot)
    df = pd.DataFrame({"output": [w for w, _ in written], "path": [p for _, p in written],
                       "bytes": [os.path.getsize(p) for _, p in written]})
    emit(Output(df), args.format, None)
    return 0
