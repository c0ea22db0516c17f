"""Report assembly: load what the HTML report (and its PNG) shows from traces and a model, and write them.

The library half of ``gguf-experts report`` and of the demo's report: it opens traces and models (the
reporters only receive data). Every trace gets its own numbers (heat, cache curves, working sets), labelled
with its name; two traces also get their difference.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .analysis.diff import diff_frames
from .atomic import atomic_group, atomic_path, resolve_target
from .errors import InputError, OutputError
from .formats.counts import ExpertCounts
from .gguf.reader import Model, open_model
from .heat import HeatResult, join
from .gguf.layout import byte_map
from .gguf.expert_ids import to_original
from .reporters.html import ReportInput, TraceView, write_html
from .trace.format import TraceData
from .trace.reader import iter_trace_chunks, read_trace

OPT_MAX_ROWS = 2_000_000  # OPT needs the whole trace in memory and k steps per token: beyond this, LRU only

TraceSource = str | os.PathLike[str] | TraceData
Loaded = str | os.PathLike[str] | TraceData | ExpertCounts


def load_inputs(paths: Sequence[str], model: str | Model) -> list[Loaded]:
    """Each input as report takes it: a trace.bin stays a path (streamed), another tool's ordered log is read
    into a TraceData, a count-only file (imatrix, tracer/REAP JSON) becomes ExpertCounts."""
    from .formats.load import detect_format, load_counts, load_trace
    from .formats.load import FORMATS

    out: list[Loaded] = []
    for p in paths:
        fmt = detect_format(p)
        out.append(p if fmt == "trace" else load_trace(p, model) if FORMATS[fmt][1] else load_counts(p, model))
    return out


def _expert_bytes(heat: HeatResult, n_layer: int, n_expert: int) -> np.ndarray:
    eb = np.zeros((n_layer, n_expert), np.float64)
    ex = heat.experts
    eb[ex["layer"].to_numpy(dtype=np.int64), ex["expert"].to_numpy(dtype=np.int64)] = \
        ex["bytes_per_activation"].to_numpy(dtype=np.float64)
    return eb


def _name(trace: Loaded | list[Loaded], i: int) -> str:
    if isinstance(trace, list):
        return f"{_name(trace[0], i)} +{len(trace) - 1}"
    if isinstance(trace, ExpertCounts):
        return f"{trace.source} counts {i + 1}"
    return f"trace {i + 1}" if isinstance(trace, TraceData) else Path(trace).name


def cache_tables(trace: TraceSource, heat: HeatResult, opt: bool = True, opt_max_rows: int = OPT_MAX_ROWS,
                 model: Model | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(miss-ratio curves: LRU and OPT at every capacity, one pass each; working sets; notes) of one trace."""
    from .analysis.cache.cache import LayerLRU
    from .analysis.cache.opt import opt_curves

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


def trace_io(trace: TraceSource) -> tuple[object, dict]:
    """(IoTable or None, header meta) of a trace: its measured I/O, read in one streaming pass."""
    from .trace.format import IoTable

    if isinstance(trace, TraceData):
        return trace.io, dict(trace.header.meta)
    parts, meta = [], {}
    for c in iter_trace_chunks(trace, weights=False):
        meta = c.header.meta
        if c.io is not None:
            parts.append(c.io)
    return (IoTable.concat(parts) if parts else None), dict(meta)


def _side_source(side: Sequence[Loaded]) -> Iterator[TraceData] | ExpertCounts:
    """What join takes for a side of several traces (counts add): their chunks one after another, sequence
    numbers shifted so that each trace's sequences stay its own; or the sum of their counts when any of
    them holds counts only."""
    from .fleet import add_counts

    def chunks_of(t: Loaded) -> Iterator[TraceData]:
        return iter([t]) if isinstance(t, TraceData) else iter_trace_chunks(t, weights=False)  # type: ignore[arg-type]

    if any(isinstance(t, ExpertCounts) for t in side):
        parts = []
        for t in side:
            if isinstance(t, ExpertCounts):
                parts.append(t)
            else:
                it = chunks_of(t)
                first = next(it, None)
                if first is not None:
                    parts.append(ExpertCounts.from_chunks(chain([first], it), first.header.fingerprint))
        return add_counts(parts)

    def chained() -> Iterator[TraceData]:
        offset = 0
        for t in side:
            top = -1
            for c in chunks_of(t):
                if len(c):
                    top = max(top, int(c.seq.max()))
                yield replace(c, seq=(c.seq.astype(np.int64) + offset).astype(np.int32)) if offset else c
            offset += top + 1
    return chained()


def _cache_task(trace: TraceSource, heat: HeatResult, opt: bool, model: str) -> tuple[pd.DataFrame, pd.DataFrame,
                                                                                     list[str]]:
    """cache_tables on a Dask worker (which opens the model itself)."""
    return cache_tables(trace, heat, opt=opt, model=open_model(model))


def _fleet_view(side: Sequence[Loaded], name: str, m: Model, cache: bool, opt: bool, runner: Any = None
                ) -> TraceView:
    """A side of several traces (servers): heat of the summed counts; cache curves simulated per trace and
    pooled (hits, accesses and bytes summed, hit rates from the sums); working sets stay per trace. ``runner``
    (fleet_dask): the counting and the per-trace curves on Dask workers, for sides of trace.bin files."""
    from .fleet import pool_rows

    dask = runner is not None and runner.distributed
    if dask and all(isinstance(t, (str, os.PathLike)) for t in side):
        from .fleet_dask import join_fleet

        heat = join_fleet(runner, [str(t) for t in side], str(m.path))
    else:
        heat = join(_side_source(side), m)
    view = TraceView(label=name, heat=heat)
    if not cache:
        return view
    ordered = [t for t in side if not isinstance(t, ExpertCounts)]
    view.notes = [f"{name}: {len(side)} traces; counts add; cache curves: one cache per trace, pooled (hits and "
                  "accesses summed over the traces); working sets are per trace (gguf-experts cache-sim "
                  "--working-set with the same traces)"]
    if len(ordered) < len(side):
        view.notes.append(f"cache curves of {name} leave out {len(side) - len(ordered)} count-only input(s)")
    if ordered:
        curves = []
        tables = (runner.map(_cache_task, ordered, heat, opt, str(m.path)) if dask
                  else [cache_tables(t, heat, opt=opt, model=m) for t in ordered])
        for c, _, notes in tables:
            curves.append(c)
            view.notes += notes
        pooled = pool_rows(curves, [str(i) for i in range(len(curves))], ["layer", "policy", "capacity"],
                           ["accesses", "hits", "bytes_fetched"], {"hit_rate": ("hits", "accesses")})
        view.curves = pooled[pooled["trace"] == "pooled"].drop(columns="trace").reset_index(drop=True)
    return view


def build_report(traces: Sequence[Loaded | list[Loaded]], model: str | os.PathLike[str] | Model,
                 labels: Sequence[str] | None = None, cache: bool = True, opt: bool = True,
                 runner: Any = None) -> ReportInput:
    """Load everything a report shows: join (and diff) the trace(s), byte map, cache curves, working sets,
    for every trace. A trace is a path or an in-memory TraceData (e.g. one prompt kind of a larger trace).
    ``runner``: a fleet_dask.Runner for the sides of several traces (Dask workers)."""
    if not 1 <= len(traces) <= 2:
        raise InputError(f"report takes one trace or two to compare, got {len(traces)}")
    m = model if isinstance(model, Model) else open_model(model)
    names = list(labels) if labels else [_name(t, i) for i, t in enumerate(traces)]
    if len(names) != len(traces):
        raise InputError(f"--labels: {len(names)} names for {len(traces)} traces")
    if len(names) == 2 and names[0] == names[1]:
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]  # two traces of one name: keep them apart
    views = []
    for t, name in zip(traces, names):
        if isinstance(t, list):  # a side of several traces (a fleet)
            views.append(_fleet_view(t, name, m, cache, opt, runner))
            continue
        heat = join(t, m)
        view = TraceView(label=name, heat=heat)
        if cache:
            if isinstance(t, ExpertCounts):
                view.notes = [f"cache curves and working sets left out: {name} holds counts only (no token order)"]
            else:
                view.curves, view.working_set, view.notes = cache_tables(t, heat, opt=opt, model=m)
        if not isinstance(t, ExpertCounts):
            view.io, view.io_meta = trace_io(t)
        views.append(view)
    sources = [names[i] if isinstance(t, (TraceData, ExpertCounts, list)) else Path(t).name
               for i, t in enumerate(traces)]
    first = views[0]
    inp = ReportInput(heat=first.heat, tensors=byte_map(m), curves=first.curves, working_set=first.working_set,
                      sources=sources, labels=(names[0], names[-1]), notes=first.notes, label=names[0],
                      more=views[1:], io=first.io, io_meta=first.io_meta)
    if len(views) == 2:
        inp.diff = diff_frames(views[0].heat.experts, views[1].heat.experts, views[0].heat.layers,
                               views[1].heat.layers)
    return inp


def demo_report(out_dir: str | os.PathLike[str], trace: str | os.PathLike[str], model: str | os.PathLike[str] | Model,
                kinds: Sequence[str]) -> list[tuple[str, str]]:
    """The demo's report (out_dir/report.html, + heatmap.png with matplotlib): every prompt, and the first two
    kinds (sequence 0 vs 1, e.g. code vs chat) compared. Returns [(what, path)] of the files written."""
    import importlib.util

    m = model if isinstance(model, Model) else open_model(model)
    inp = build_report([trace], m, labels=[f"{Path(trace).name} (all prompts)"])
    if len(kinds) >= 2:
        tr = read_trace(trace)
        ha, hb = (join(tr.select(tr.seq == i), m) for i in (0, 1))
        inp.diff = diff_frames(ha.experts, hb.experts, ha.layers, hb.layers)
        inp.labels = (str(kinds[0]), str(kinds[1]))
    out = Path(out_dir)
    png = str(out / "heatmap.png") if importlib.util.find_spec("matplotlib") else None
    return write_report(out / "report.html", inp, png=png)


def write_report(html_path: str | os.PathLike[str], inp: ReportInput, png: str | os.PathLike[str] | None = None,
                 screenshot: str | os.PathLike[str] | None = None,
                 screenshot_size: tuple[int, int] | None = None) -> list[tuple[str, str]]:
    """Write the HTML (and PNG heatmap / screenshot) together: if any of them fails, none is left behind.
    Returns [(what, path)] of the files written."""
    out = [("html report", str(html_path))]
    with atomic_group() as group:
        html_tmp = group.enter_context(atomic_path(html_path))
        write_html(str(html_tmp), inp)
        if png:
            from .reporters.png import write_heat_pngs

            png_tmp = group.enter_context(atomic_path(png))
            write_heat_pngs(str(png_tmp), inp.views())
            out.append(("png heatmap", str(png)))
        if screenshot:
            from .reporters.screenshot import screenshot_html

            shot_tmp = group.enter_context(atomic_path(screenshot))
            screenshot_html(html_tmp, shot_tmp, *(screenshot_size or (1280, 1800)))
            out.append(("screenshot", str(screenshot)))
    return out


def check_output_names(html_path: str | os.PathLike[str], *others: str | os.PathLike[str] | None) -> None:
    """Before any work: every output's directory is writable, none is a model, and no two outputs of one
    report are the same file (the second would replace the first)."""
    resolve_target(html_path)
    seen = {os.path.realpath(html_path)}
    for p in others:
        if p is None:
            continue
        resolve_target(p)
        if os.path.realpath(p) in seen:
            raise OutputError(f"{p}: given for two outputs of the report; give each its own file")
        seen.add(os.path.realpath(p))
