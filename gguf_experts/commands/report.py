"""gguf-experts report: one self-contained HTML report of a trace (two traces: with their difference), a PNG
heatmap and a browser screenshot. This module does the loading; the reporters only receive data."""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis.diff import diff_frames
from ..atomic import atomic_write
from ..errors import InputError
from ..formats import ExpertCounts
from ..gguf_file import Model, open_model
from ..join import HeatResult, join
from ..layout import byte_map
from ..prune_map import to_original
from ..reporters.html import ReportInput, write_html
from ..reporters.tabular import FORMATS, Output, emit
from ..trace.format import TraceData
from ..trace.reader import iter_trace_chunks, read_trace

NAME = "report"
HELP = "write a self-contained HTML report (heatmap, file-offset strip, cache curves, hottest experts) of a trace"
DESCRIPTION = (HELP + "; with a second trace it adds their difference. --png writes a static heatmap "
               "(needs the [plot] extra), --screenshot a PNG of the rendered report (needs chromium).")
ORDER = 60
OPT_MAX_ROWS = 2_000_000  # OPT needs the whole trace in memory and k steps per token: beyond this, LRU only


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("traces", nargs="+", metavar="TRACE.bin",
                   help="one trace, or two to compare (B minus A); another tool's file too (imatrix, tracer/REAP "
                        "JSON: no cache curves; moe-trace CSV, MBLT, RTRACE01)")
    p.add_argument("--model", "-m", required=True, metavar="MODEL.gguf",
                   help="the model the trace(s) were captured from (any shard of a split model)")
    p.add_argument("-o", "--output", metavar="REPORT.html", default="report.html",
                   help="the HTML file to write, atomically (default report.html)")
    p.add_argument("--png", metavar="HEAT.png", help="also write a static heatmap PNG (matplotlib)")
    p.add_argument("--screenshot", metavar="SHOT.png",
                   help="also render the report in headless chromium and save a full-page screenshot")
    p.add_argument("--screenshot-size", metavar="WxH", default=None,
                   help="screenshot just a WxH viewport (e.g. 1280x1400) instead of the full page 1280 wide")
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


Loaded = str | os.PathLike[str] | TraceData | ExpertCounts


def _name(trace: Loaded, i: int) -> str:
    if isinstance(trace, ExpertCounts):
        return f"{trace.source} counts {i + 1}"
    return f"trace {i + 1}" if isinstance(trace, TraceData) else Path(trace).name


def load_inputs(paths: Sequence[str], model: str | Model) -> list[Loaded]:
    """Each input as report takes it: a trace.bin stays a path (streamed), another tool's ordered log is read
    into a TraceData, a count-only file (imatrix, tracer/REAP JSON) becomes ExpertCounts."""
    from ..formats import detect_format, load_counts, load_trace
    from ..formats.load import FORMATS

    out: list[Loaded] = []
    for p in paths:
        fmt = detect_format(p)
        out.append(p if fmt == "trace" else load_trace(p, model) if FORMATS[fmt][1] else load_counts(p, model))
    return out


def cache_tables(trace: str | os.PathLike[str] | TraceData, heat: HeatResult, opt: bool = True,
                 opt_max_rows: int = OPT_MAX_ROWS, model: Model | None = None
                 ) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(miss-ratio curves: LRU and OPT at every capacity, one pass each; working sets; notes) of one trace."""
    from ..analysis.cache import LayerLRU
    from ..analysis.opt import opt_curves

    lru, rows, notes = None, 0, []
    chunks = [trace] if isinstance(trace, TraceData) else iter_trace_chunks(trace, weights=False)
    for chunk in to_original(chunks, model):  # a trace of a pruned model: in the original ids, as the heat
        fp = chunk.header.fingerprint
        if lru is None:
            lru = LayerLRU(fp.n_layer, fp.n_expert, fp.n_expert_used,
                           expert_bytes=_expert_bytes(heat, fp.n_layer, fp.n_expert))
        if len(chunk):
            lru.update(chunk.layer, chunk.experts)
            rows += len(chunk)
    if lru is None or not len(lru.layers()):
        raise InputError(f"{trace}: the trace has no rows; capture some tokens first")
    curves = [lru.curves()]
    if opt and rows > opt_max_rows:
        notes.append(f"OPT curves left out: the trace has {rows:,} rows (token x layer), more than "
                     f"{opt_max_rows:,}; OPT needs the whole trace in memory (gguf-experts cache-sim --policy opt "
                     "simulates it on its own)")
        opt = False
    if opt:
        td = trace if isinstance(trace, TraceData) else read_trace(trace)
        td = next(to_original([td], model))
        fp = td.header.fingerprint
        curves.append(opt_curves(td.layer, td.experts, fp.n_layer, fp.n_expert,
                                 expert_bytes=_expert_bytes(heat, fp.n_layer, fp.n_expert)))
    return pd.concat(curves, ignore_index=True), lru.working_set(), notes


def build_report(traces: Sequence[Loaded], model: str | os.PathLike[str] | Model,
                 labels: Sequence[str] | None = None, cache: bool = True, opt: bool = True) -> ReportInput:
    """Load everything a report shows: join (and diff) the trace(s), byte map, cache curves, working sets.
    A trace is a path or an in-memory TraceData (e.g. one prompt kind of a larger trace)."""
    if not 1 <= len(traces) <= 2:
        raise InputError(f"report takes one trace or two to compare, got {len(traces)}")
    m = model if isinstance(model, Model) else open_model(model)
    names = list(labels) if labels else [_name(t, i) for i, t in enumerate(traces)]
    if len(names) != len(traces):
        raise InputError(f"--labels: {len(names)} names for {len(traces)} traces")
    heats = [join(t, m) for t in traces]
    sources = [names[i] if isinstance(t, (TraceData, ExpertCounts)) else Path(t).name for i, t in enumerate(traces)]
    inp = ReportInput(heat=heats[0], tensors=byte_map(m), sources=sources, labels=(names[0], names[-1]))
    first = traces[0]
    if cache:
        if isinstance(first, ExpertCounts):
            inp.notes = [f"cache curves and working sets left out: {names[0]} holds counts only (no token order)"]
        else:
            inp.curves, inp.working_set, inp.notes = cache_tables(first, heats[0], opt=opt, model=m)
    if len(heats) == 2:
        inp.diff = diff_frames(heats[0].experts, heats[1].experts, heats[0].layers, heats[1].layers)
    return inp


def _rows_where(tr: TraceData, mask: np.ndarray) -> TraceData:
    """The rows of a trace where mask holds (e.g. one sequence), as a TraceData of their own."""
    import dataclasses

    return dataclasses.replace(tr, seq=tr.seq[mask], phase=tr.phase[mask], pos=tr.pos[mask], token=tr.token[mask],
                               layer=tr.layer[mask], experts=tr.experts[mask],
                               weights=None if tr.weights is None else tr.weights[mask])


def demo_report(out_dir: str | os.PathLike[str], trace: str | os.PathLike[str], model: str | os.PathLike[str] | Model,
                kinds: Sequence[str]) -> list[tuple[str, str]]:
    """The demo's report (out_dir/report.html, + heatmap.png with matplotlib): every prompt, and the first two
    kinds (sequence 0 vs 1, e.g. code vs chat) compared. Returns [(what, path)] of the files written."""
    import importlib.util

    m = model if isinstance(model, Model) else open_model(model)
    inp = build_report([trace], m)
    if len(kinds) >= 2:
        tr = read_trace(trace)
        ha, hb = (join(_rows_where(tr, tr.seq == i), m) for i in (0, 1))
        inp.diff = diff_frames(ha.experts, hb.experts, ha.layers, hb.layers)
        inp.labels = (str(kinds[0]), str(kinds[1]))
    out = Path(out_dir)
    png = str(out / "heatmap.png") if importlib.util.find_spec("matplotlib") else None
    return write_report(out / "report.html", inp, png=png)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'1280x1400' -> (1280, 1400)."""
    if text is None:
        return None
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or not (200 <= int(w) <= 8000 and 200 <= int(h) <= 20000):
        raise InputError(f"--screenshot-size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1280x1400")
    return int(w), int(h)


def write_report(html_path: str | os.PathLike[str], inp: ReportInput, png: str | None = None,
                 screenshot: str | None = None, screenshot_size: tuple[int, int] | None = None
                 ) -> list[tuple[str, str]]:
    """Write the HTML (and PNG heatmap / screenshot); returns [(what, path)] of the files written."""
    out = [("html report", str(html_path))]
    write_html(str(html_path), inp)
    if png:
        from ..reporters.png import write_heat_png

        write_heat_png(png, inp.heat)
        out.append(("png heatmap", png))
    if screenshot:
        from ..reporters.chromium import BrowserError, render_page

        w, h = screenshot_size or (1280, 900)
        res = render_page(html_path, width=w, height=h, full_page=screenshot_size is None)
        if not res.rendered or res.errors or res.png is None:
            raise BrowserError(f"{html_path}: chromium did not render the report cleanly "
                               f"({'; '.join(res.errors) or 'no render mark'})")
        with atomic_write(screenshot, "wb") as fh:
            fh.write(res.png)
        out.append(("screenshot", screenshot))
    return out


def run(args: argparse.Namespace) -> int:
    parse_size(args.screenshot_size)  # a bad size fails before the work
    m = open_model(args.model)
    loaded = load_inputs(args.traces, m)
    labels = args.labels or [Path(p).name for p in args.traces]
    inp = build_report(loaded, m, labels=labels, cache=not args.no_cache, opt=not args.no_opt)
    size = parse_size(args.screenshot_size)
    written = write_report(args.output, inp, png=args.png, screenshot=args.screenshot, screenshot_size=size)
    df = pd.DataFrame({"output": [w for w, _ in written], "path": [p for _, p in written],
                       "bytes": [os.path.getsize(p) for _, p in written]})
    emit(Output(df), args.format, None)
    return 0
