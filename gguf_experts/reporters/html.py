"""One self-contained HTML report (opens from disk, no network): heatmap, file-offset strip, miss-ratio curves,
working sets, hottest / never-used experts, run summary and, given two traces, their difference.

Rendering choice: hand-written canvas + SVG driven by ~250 lines of vanilla JS (report.js, report.css, both
inlined), not plotly. Plotly would add ~4 MB of inlined JS to every file, and one SVG element per expert
slice would be megabytes of DOM for a 74k-slice model. Canvas draws the heatmap and strip from compact
arrays; the strip is encoded per *tensor* (its slices are contiguous and equal-sized, so slice e of tensor
t lives at offset_t + e * slice_t and its heat is activations[layer, e]): the HTML grows with tensors and
layers x experts, never with slices or tokens. At the overview zoom each strip pixel shows the hottest bar
under it; zooming (layer selector, wheel, drag) gives single slices.

Like memray's reporters, this module receives data (HeatResult, curves, ...) and never opens a trace.
"""
from __future__ import annotations

import html
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

from ..analysis.diff import ShareDiff, top_changes
from ..atomic import atomic_write
from ..errors import InputError
from ..heat import HeatResult
from .tabular import human_bytes

MAX_CURVE_POINTS = 160
HOTTEST_ROWS = 20
CURVE_COLUMNS = {"layer", "policy", "capacity", "hit_rate"}


@dataclass
class TraceView:
    """The numbers of one trace, shown under its label (a report of two traces has two, switchable)."""

    label: str
    heat: HeatResult
    curves: pd.DataFrame | None = None
    working_set: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    io: Any = None  # trace.format.IoTable: measured I/O per ubatch (trace version 2), None when absent
    io_meta: dict[str, Any] | None = None  # the header meta (io_start, io_load); None: not a trace, no section


@dataclass
class ReportInput:
    """Everything the report shows; only ``heat`` is required, other sections are left out when None.
    ``heat``, ``curves``, ``working_set`` and ``notes`` are the first trace's; ``more`` holds the others."""

    heat: HeatResult
    tensors: pd.DataFrame | None = None  # layout.byte_map(model): whole tensors for the strip
    curves: pd.DataFrame | None = None  # layer, policy, capacity, hit_rate (+ accesses, hits, bytes_fetched)
    working_set: pd.DataFrame | None = None  # any table from the working-set analysis
    diff: ShareDiff | None = None
    labels: tuple[str, str] = ("A", "B")  # names of the two traces (diff section)
    sources: list[str] = field(default_factory=list)  # trace file names, for the header
    notes: list[str] = field(default_factory=list)  # what was left out and why, shown under the summary
    title: str | None = None
    label: str | None = None  # the first trace's name (default: its source file)
    more: list[TraceView] = field(default_factory=list)  # the other traces, each with its own numbers
    io: Any = None  # the first trace's measured I/O (see TraceView)
    io_meta: dict[str, Any] | None = None

    def views(self) -> list[TraceView]:
        """Every trace with its own numbers, the first one first."""
        first = self.label or (self.sources[0] if self.sources else "trace")
        return [TraceView(first, self.heat, self.curves, self.working_set, self.notes, self.io, self.io_meta),
                *self.more]


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _json_for_script(doc: Any) -> str:
    """JSON that cannot end its <script> element early."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).replace("</", "<\\/").replace("<!--", "<\\!--")


def _rows(heat: HeatResult) -> tuple[np.ndarray, int, np.ndarray]:
    """(layers of the heatmap rows, n_expert, activations [rows, E]) from the experts frame."""
    ex = heat.experts
    if ex.empty:
        raise InputError("the heat result has no expert rows: the model has no MoE layers to report on")
    layers = np.unique(ex["layer"].to_numpy(dtype=np.int64))
    n_expert = int(ex["expert"].max()) + 1
    acts = np.zeros((len(layers), n_expert), np.int64)
    acts[np.searchsorted(layers, ex["layer"].to_numpy(dtype=np.int64)), ex["expert"].to_numpy(dtype=np.int64)] = \
        ex["activations"].to_numpy(dtype=np.int64)
    return layers, n_expert, acts


def strip_tensors(heat: HeatResult, tensors: pd.DataFrame | None, layers: np.ndarray) -> tuple[dict, list[dict]]:
    """Columnar tensor table for the strip (expert tensors carry row, slice size, slice count) and the files."""
    sl = heat.slices
    g = sl.groupby("base_name", sort=False)
    first = g["offset"].transform("min").to_numpy(dtype=np.int64)
    size = g["size"].transform("first").to_numpy(dtype=np.int64)
    slot = g.cumcount().to_numpy(dtype=np.int64)  # position in the tensor (file order)
    if not np.array_equal(sl["offset"].to_numpy(dtype=np.int64), first + slot * size):
        raise InputError("expert slices of one tensor are not contiguous and equal-sized; the byte map is "
                         "inconsistent (regenerate it with gguf_experts.gguf.layout)")
    exp = g.agg(file=("file", "first"), offset=("offset", "min"), slice=("size", "first"), n=("expert", "size"),
                layer=("layer", "first")).reset_index().rename(columns={"base_name": "name"})
    # a pruned model's slices carry the original expert ids (prune_map): slot s of a tensor is expert ids[s]
    renumbered = not np.array_equal(sl["expert"].to_numpy(dtype=np.int64), slot)
    if renumbered:
        exp["ids"] = g["expert"].agg(lambda e: [int(x) for x in e]).to_numpy()
    exp["size"] = exp["slice"] * exp["n"]
    exp["row"] = np.searchsorted(layers, exp["layer"].to_numpy(dtype=np.int64))
    parts = [exp]
    if tensors is not None and len(tensors):
        t = tensors
        if "expert_id" in t.columns:
            t = t[t["expert_id"].isna()]
        t = t[~t["name"].isin(set(exp["name"]))]
        parts.append(pd.DataFrame({
            "name": t["name"].to_numpy(), "file": t["file"].to_numpy(), "offset": t["offset"].to_numpy(np.int64),
            "slice": 0, "n": 0, "layer": t["layer"].fillna(-1).to_numpy(dtype=np.int64),
            "size": t["size"].to_numpy(np.int64), "row": -1}))
    allt = pd.concat(parts, ignore_index=True)
    names = [f for f in heat.summary.get("files", []) if f in set(allt["file"])]
    names += sorted(set(allt["file"]) - set(names))
    allt["fidx"] = allt["file"].map({f: i for i, f in enumerate(names)})
    allt = allt.sort_values(["fidx", "offset"], kind="stable")
    ends = (allt["offset"] + allt["size"]).groupby(allt["fidx"]).max()
    files, base = [], 0
    gap = int(ends.sum() * 0.004)
    for i, f in enumerate(names):
        files.append({"name": f, "size": int(ends.get(i, 0)), "base": base})
        base += int(ends.get(i, 0)) + gap
    col = {"name": allt["name"].astype(str).tolist(), "file": allt["fidx"].astype(int).tolist(),
           "off": allt["offset"].astype(np.int64).tolist(), "size": allt["size"].astype(np.int64).tolist(),
           "layer": allt["layer"].astype(np.int64).tolist(), "row": allt["row"].astype(np.int64).tolist(),
           "slice": allt["slice"].astype(np.int64).tolist(), "n": allt["n"].astype(np.int64).tolist()}
    if renumbered:
        col["ids"] = [v if isinstance(v, list) else None for v in allt["ids"].tolist()]
    return col, files


def curve_series(curves: pd.DataFrame) -> list[dict]:
    """Hit-rate series per (layer or overall, policy), at most MAX_CURVE_POINTS capacities each."""
    missing = CURVE_COLUMNS - set(curves.columns)
    if missing:
        raise InputError(f"miss-ratio table lacks column(s) {sorted(missing)}; expected layer, policy, capacity, "
                         "hit_rate (analysis miss-ratio curves)")
    c = curves.copy()
    lay = pd.to_numeric(c["layer"], errors="coerce")
    c["_layer"] = lay.where(lay >= 0, -1).fillna(-1).astype(np.int64)
    c = c.sort_values(["_layer", "policy", "capacity"], kind="stable")
    out = []
    for (layer, policy), g in c.groupby(["_layer", "policy"], sort=True):  # one group per curve, not per point
        cap = g["capacity"].to_numpy(dtype=np.int64)
        hit = g["hit_rate"].to_numpy(dtype=np.float64)
        if len(cap) > MAX_CURVE_POINTS:
            keep = np.unique(np.linspace(0, len(cap) - 1, MAX_CURVE_POINTS).round().astype(np.int64))
            cap, hit = cap[keep], hit[keep]
        out.append({"layer": None if layer < 0 else int(layer), "policy": str(policy).upper(),
                    "cap": cap.tolist(), "hit": np.round(np.nan_to_num(hit), 5).tolist()})
    return out


def curve_table(curves: pd.DataFrame, n_expert: int) -> pd.DataFrame:
    """Overall hit rate per policy at 1/8, 1/4, 1/2 of the experts per layer (nearest capacity measured)."""
    lay = pd.to_numeric(curves["layer"], errors="coerce")
    overall = curves[lay.isna() | (lay < 0)]
    if overall.empty:  # no overall rows: mean over layers
        overall = curves.groupby(["policy", "capacity"], as_index=False)["hit_rate"].mean()
    rows = []
    for frac in (8, 4, 2):
        want = max(1, n_expert // frac)
        for policy, g in overall.groupby("policy", sort=True):
            r = g.iloc[int(np.abs(g["capacity"].to_numpy() - want).argmin())]
            row = {"capacity": int(r["capacity"]), "of experts": f"1/{frac}", "policy": str(policy).upper(),
                   "hit rate": f"{100 * float(r['hit_rate']):.1f}%"}
            if "bytes_fetched" in g.columns:
                row["bytes fetched"] = human_bytes(float(r["bytes_fetched"]))
            rows.append(row)
    return pd.DataFrame(rows)


def _ranges(ids: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    a = np.asarray(sorted(ids), dtype=np.int64)
    if not len(a):
        return ""
    cut = np.flatnonzero(np.diff(a) != 1) + 1
    return ", ".join(f"{s[0]}-{s[-1]}" if len(s) > 1 else f"{s[0]}" for s in np.split(a, cut))


def table_html(df: pd.DataFrame, left: Iterable[str] = (), max_rows: int = 200) -> str:
    if df is None or df.empty:
        return '<p class="note">(no rows)</p>'
    left = set(left)
    shown = df.head(max_rows)
    head = "".join(f'<th class="{"l" if c in left else ""}">{_esc(c)}</th>' for c in shown.columns)
    body = []
    for rec in shown.itertuples(index=False):  # display only, bounded by max_rows
        cells = []
        for c, v in zip(shown.columns, rec):
            if isinstance(v, (float, np.floating)):
                v = f"{v:.4g}"
            cells.append(f'<td class="{"l" if c in left else ""}">{_esc(v)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="note">{len(df) - max_rows} more rows not shown</p>' if len(df) > max_rows else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{more}"


def working_set_table(ws: pd.DataFrame, n_slots: int) -> pd.DataFrame:
    """The all-layer rows of an analysis working-set frame (layer, tau, experts, bytes), for people."""
    if not {"layer", "tau", "experts", "bytes"} <= set(ws.columns):
        return ws
    allr = ws[ws["layer"].astype(str) == "all"]
    if allr.empty:
        allr = ws.groupby("tau", as_index=False)[["experts", "bytes"]].sum()
    return pd.DataFrame({"window (tokens)": allr["tau"].to_numpy(),
                         "distinct experts": np.round(allr["experts"].to_numpy(dtype=np.float64), 1),
                         "of all": [f"{100 * x / max(1, n_slots):.1f}%" for x in allr["experts"]],
                         "bytes": [human_bytes(float(b)) for b in allr["bytes"]]})


def _card(value: str, label: str) -> str:
    return f'<div class="card"><b>{_esc(value)}</b><span>{_esc(label)}</span></div>'


def expert_tables(heat: HeatResult, n_expert: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The hottest (layer, expert) pairs overall, and the never-used experts per layer as id ranges."""
    ex = heat.experts
    hot = ex.sort_values(["activations", "layer", "expert"], ascending=[False, True, True], kind="stable")
    hot = hot.head(HOTTEST_ROWS)
    hottest = pd.DataFrame({
        "layer": hot["layer"].to_numpy(), "expert": hot["expert"].to_numpy(),
        "activations": hot["activations"].to_numpy(),
        "share": [f"{100 * s:.2f}%" for s in hot["share"]],
        "x uniform": [f"{s * n_expert:.2f}" for s in hot["share"]],
        "bytes read": [human_bytes(b) for b in hot["bytes_read"]]})
    cold = ex[ex["activations"] == 0]
    layers_with_tokens = set(heat.layers.loc[heat.layers["activations"] > 0, "layer"].tolist())
    cold = cold[cold["layer"].isin(layers_with_tokens)]
    never = cold.groupby("layer", sort=True)["expert"].agg(["size", _ranges]).reset_index()
    never.columns = ["layer", "never used", "experts"]
    return hottest, never


def layer_table(heat: HeatResult, layers: np.ndarray, acts: np.ndarray, diff: ShareDiff | None) -> pd.DataFrame:
    ly = heat.layers.set_index("layer").reindex(layers)
    tot = acts.sum(axis=1)
    share_max = np.divide(acts.max(axis=1), tot, out=np.zeros(len(tot)), where=tot > 0)
    out = pd.DataFrame({
        "layer": layers, "tokens": ly["tokens"].fillna(0).astype(np.int64).to_numpy(),
        "experts used": (acts > 0).sum(axis=1), "never used": (acts == 0).sum(axis=1),
        "hottest": acts.argmax(axis=1), "hottest x uniform": np.round(share_max * acts.shape[1], 2),
        "bytes read": [human_bytes(b) for b in ly["bytes_read"].fillna(0)],
        "vs dense": [f"{b / d:.3f}" if d else "-" for b, d in zip(ly["bytes_read"].fillna(0),
                                                                ly["dense_bytes"].fillna(0))]})
    if diff is not None:
        js = diff.layers.set_index("layer")["js_divergence"].reindex(layers)
        out["JS divergence (bits)"] = np.round(js.fillna(0).to_numpy(), 4)
    return out


def _summary_rows(s: dict, sources: list[str]) -> pd.DataFrame:
    keys = [("model", "model"), ("files", "model files"), ("tokens", "tokens"), ("prefill_tokens", "prefill tokens"),
            ("decode_tokens", "decode tokens"), ("sequences", "sequences"), ("n_layer_moe", "MoE layers"),
            ("selections", "expert selections"), ("bytes_read", "expert bytes read"),
            ("bytes_per_token", "expert bytes per token"), ("dense_bytes_per_token", "dense bytes per token"),
            ("ratio", "read / dense"), ("records", "trace records"), ("recovered", "recovered (damaged tail)")]
    rows = [("traces", ", ".join(sources))] if sources else []
    for k, label in keys:
        if k not in s:
            continue
        v = s[k]
        if k.startswith("bytes") or k.endswith("bytes_per_token"):
            v = f"{human_bytes(float(v))} ({int(v):,} B)"
        elif k == "ratio":
            v = f"{float(v):.4f}"
        elif isinstance(v, list):
            v = ", ".join(map(str, v))
        rows.append((label, v))
    return pd.DataFrame(rows, columns=["", "value"])


def build_data(inp: ReportInput) -> tuple[dict, np.ndarray, np.ndarray]:
    """The JSON blob report.js draws from (compact: per tensor and per (layer, expert), never per slice)."""
    layers, n_expert, acts = _rows(inp.heat)
    tensors, files = strip_tensors(inp.heat, inp.tensors, layers)
    views = []
    for v in inp.views():
        vl, ve, va = _rows(v.heat)
        if ve != n_expert or not np.array_equal(vl, layers):
            raise InputError(f"{v.label}: its layers and experts differ from {inp.views()[0].label}'s; a report "
                             "compares traces of one model")
        views.append({"label": v.label, "acts": va.ravel().tolist(), "rowActs": va.sum(axis=1).tolist(),
                      "curves": ({"series": curve_series(v.curves), "xlabel": "cache capacity (experts per layer)"}
                                 if v.curves is not None and len(v.curves) else None)})
    doc: dict[str, Any] = {"rows": layers.tolist(), "E": n_expert, "tensors": tensors, "files": files,
                           "views": views, "diff": None, "acts": views[0]["acts"], "rowActs": views[0]["rowActs"],
                           "curves": views[0]["curves"]}
    if inp.diff is not None:
        d = inp.diff
        dl = np.unique(d.experts["layer"].to_numpy(dtype=np.int64))

        def m(col: str) -> np.ndarray:
            return _matrix(d.experts, col, dl, n_expert)
        doc["diff"] = {"rows": dl.tolist(), "labels": list(inp.labels),
                       "sa": np.round(m("share_a").ravel(), 6).tolist(),
                       "sb": np.round(m("share_b").ravel(), 6).tolist(),
                       "delta": np.round(m("delta").ravel(), 6).tolist(),
                       "js": np.round(d.layers.set_index("layer")["js_divergence"].reindex(dl).fillna(0).to_numpy(),
                                      6).tolist()}
    return doc, layers, acts


def _matrix(df: pd.DataFrame, col: str, layers: np.ndarray, n_expert: int) -> np.ndarray:
    out = np.zeros((len(layers), n_expert), np.float64)
    out[np.searchsorted(layers, df["layer"].to_numpy(dtype=np.int64)), df["expert"].to_numpy(dtype=np.int64)] = \
        df[col].to_numpy(dtype=np.float64)
    return out


def _view_head(v: TraceView, n_layers: int, n_expert: int, acts: np.ndarray, inp: ReportInput) -> str:
    """Warnings, cards and notes of one trace."""
    s = v.heat.summary
    never_total = int((acts == 0).sum())
    cards = [_card(f"{s.get('tokens', 0):,}", f"tokens ({s.get('prefill_tokens', 0):,} prefill, "
                                              f"{s.get('decode_tokens', 0):,} decode)"),
             _card(f"{n_layers} x {n_expert}", "MoE layers x experts"),
             _card(human_bytes(float(s.get("bytes_per_token", 0))), "expert bytes read per token"),
             _card(human_bytes(float(s.get("dense_bytes_per_token", 0))), "if every expert ran (dense)"),
             _card(f"{float(s.get('ratio', 0)):.3f}", "read / dense"),
             _card(f"{never_total:,} / {acts.size:,}", "(layer, expert) never used")]
    if inp.diff is not None:
        cards.append(_card(f"{inp.diff.overall:.4f}", f"JS divergence {inp.labels[0]} vs {inp.labels[1]} (bits)"))
    parts = []
    if s.get("warning"):
        parts.append(f'<p class="warn">{_esc(s["warning"])}</p>')
    if s.get("recovered"):
        parts.append(f'<p class="warn">the trace had a damaged tail: {int(s.get("dropped_bytes", 0)):,} bytes were '
                     "dropped, the valid prefix is shown</p>")
    parts.append(f'<div class="cards">{"".join(cards)}</div>')
    parts.extend(f'<p class="note">{_esc(n)}</p>' for n in v.notes)
    return "".join(parts)


def _per_view(views: list[TraceView], body: Any) -> str:
    """One block per trace, labelled; with two traces only the selected one is shown (the switch at the top)."""
    if len(views) == 1:
        return str(body(views[0], 0))
    out = []
    for i, v in enumerate(views):
        hidden = ' style="display:none"' if i else ""
        out.append(f'<div class="view" data-view="{i}"{hidden}><p class="vtag">{_esc(v.label)}</p>'
                   f"{body(v, i)}</div>")
    return "".join(out)


def _view_switch(views: list[TraceView]) -> str:
    if len(views) == 1:
        return ""
    opts = "".join(f'<option value="{i}">{_esc(v.label)}</option>' for i, v in enumerate(views))
    return ('<div class="switch">showing trace <select id="view">' + opts + '</select> '
            '<span class="note">every number, map and curve below belongs to the trace selected here (its name '
            'is shown with each); the Difference section compares both.</span></div>')


def render_html(inp: ReportInput) -> str:
    """The whole report as one HTML string (CSS, JS and data inline)."""
    from .. import __version__

    doc, layers, acts = build_data(inp)
    views = inp.views()
    all_acts = [_rows(v.heat)[2] for v in views]
    s = inp.heat.summary
    n_expert = int(doc["E"])
    model = s.get("model") or ", ".join(s.get("files", [])) or "model"
    title = inp.title or f"gguf-experts report: {model}"
    vname = '<span class="vname"></span>' if len(views) > 1 else ""
    parts = [f"<h1>{_esc(title)}</h1>",
             (f'<p class="sub">{_esc(", ".join(inp.sources) or "trace")} on {_esc(", ".join(s.get("files", [])))}'
             f" &middot; gguf-experts {_esc(__version__)}</p>"), _view_switch(views)]
    parts.append(_per_view(views, lambda v, i: _view_head(v, len(layers), n_expert, all_acts[i], inp)))
    parts.append(
        f'<h2>Experts per layer: activation share{vname}</h2>'
        '<p class="note">Rows are MoE layers, columns experts; colour is the share of the layer\'s expert selections, '
        'relative to uniform (1/E) on a log scale; grey = never used. Hover for counts, bytes and byte ranges; '
        'click a row to zoom the file strip to that layer.</p>'
        '<div class="legend">1/8x <canvas id="heat-legend"></canvas> 8x uniform '
        '<span class="sw" data-c="grey"></span> never used</div>'
        '<div class="panel"><canvas id="heatmap"></canvas></div>')
    opts = "".join(f'<option value="{int(x)}">layer {int(x)}</option>'
                   for x in sorted({l for l in doc["tensors"]["layer"] if l >= 0}))
    parts.append(
        f'<h2 id="strip-h">Where the bytes are: file-offset strip{vname}</h2>'
        '<p class="note">The model file(s) from left to right, one bar per tensor and per expert slice, coloured by '
        'bytes read (log scale); grey = expert slice never read; blue-grey = not routed (read whenever its layer '
        'runs). Each pixel shows the hottest bar under it. Zoom: layer selector, mouse wheel, drag to pan, '
        'double-click to reset. Offsets are bytes from the start of each file, in decimal (as in '
        '<code>gguf-experts dump</code>). "Bytes read" is what each token\'s expert computation reads (memory '
        'traffic), not disk reads: llama.cpp maps the model with prefetch (MAP_POPULATE / POSIX_MADV_WILLNEED), so '
        'a model that fits in RAM is read from disk once, at load.</p>'
        f'<div class="controls">zoom to <select id="strip-zoom"><option value="all">whole model</option>{opts}'
        '</select><span id="strip-range"></span></div>'
        '<div class="legend">few <canvas id="strip-legend"></canvas> most bytes read '
        '<span class="sw" data-c="grey"></span> never read <span class="sw" data-c="dense"></span> not routed</div>'
        '<div class="panel"><canvas id="strip"></canvas></div>')
    if doc["curves"] is not None:
        lopts = "".join(f'<option value="{int(x["layer"])}">layer {int(x["layer"])}</option>'
                        for x in doc["curves"]["series"] if x["layer"] is not None and x["policy"] == "LRU")
        parts.append(
            f'<h2>Expert cache: hit rate by capacity{vname}</h2>'
            '<p class="note">Hit rate of a per-layer expert cache holding C experts: red = all layers, blue = the '
            'selected layer, grey = every layer (LRU); solid LRU, dashed OPT (Belady, the best any policy can do).'
            f'</p><div class="controls">highlight <select id="curve-layer">{lopts}</select></div>'
            '<div class="twocol"><div class="panel" id="curves"></div><div>'
            + _per_view(views, lambda v, i: table_html(curve_table(v.curves, n_expert), left=("of experts", "policy"))
                        if v.curves is not None else "")
            + "</div></div>")
    if inp.working_set is not None:
        parts.append(f"<h2>Working sets{vname}</h2><p class=\"note\">W(tau): distinct experts (and their bytes) the "
                     "MoE layers used within a window of tau tokens, averaged over the trace: what a cache must "
                     "hold to serve a window without fetching.</p>"
                     + _per_view(views, lambda v, i: table_html(working_set_table(v.working_set, int(acts.size)))
                                 if v.working_set is not None else ""))

    def experts_block(v: TraceView, i: int) -> str:
        hottest, never = expert_tables(v.heat, n_expert)
        return ('<div class="twocol"><div><b>Hottest</b>' + table_html(hottest) + "</div><div><b>Never used</b>"
                + table_html(never, left=("experts",)) + "</div></div>")
    parts.append(f"<h2>Hottest and never-used experts{vname}</h2>" + _per_view(views, experts_block))
    parts.append(f"<h2>Per layer{vname}</h2>"
                 + _per_view(views, lambda v, i: table_html(layer_table(v.heat, layers, all_acts[i], inp.diff))))
    if inp.diff is not None:
        a, b = (_esc(x) for x in inp.labels)
        ch = top_changes(inp.diff, 3)
        ch = pd.DataFrame({"layer": ch["layer"], "expert": ch["expert"],
                           f"share {inp.labels[0]}": [f"{100 * v:.2f}%" for v in ch["share_a"]],
                           f"share {inp.labels[1]}": [f"{100 * v:.2f}%" for v in ch["share_b"]],
                           "delta (points)": np.round(100 * ch["delta"].to_numpy(), 2)})
        parts.append(
            f'<h2>Difference: {a} vs {b}</h2>'
            f'<p class="note">Share in {b} minus share in {a}: red = more used in {b}, blue = more used in {a}. '
            'Per layer the Jensen-Shannon divergence of the two share distributions (bits: 0 = identical, '
            f'1 = disjoint); overall (activation-weighted) {inp.diff.overall:.4f}.</p>'
            f'<div class="legend">more {a} <canvas id="diff-legend"></canvas> more {b} '
            '<span id="diff-scale"></span></div>'
            '<div class="panel"><canvas id="diffmap"></canvas></div>'
            "<p><b>Largest changes, 3 per layer</b></p>" + table_html(ch, max_rows=120))
    if any(v.io_meta is not None for v in views):
        from .io_chart import io_section

        parts.append(f'<h2 id="io-h">Measured I/O: disk reads and major faults{vname}</h2>'
                     '<p class="note">What the kernel really read from disk for this process (/proc/self/io '
                     'read_bytes) and its major page faults, per ubatch, over the ubatches\' compute time; unlike '
                     'the byte heat above (memory traffic), these are page-cache misses, read-ahead included.</p>'
                     + _per_view(views, lambda v, i: io_section(v.io, v.io_meta or {}, table_html)))
    parts.append(f"<h2>Run summary{vname}</h2>" + _per_view(
        views, lambda v, i: table_html(_summary_rows(v.heat.summary, [v.label] if len(views) > 1 else inp.sources),
                                       left=("", "value"))))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_esc(title)}</title><style>{_asset('report.css')}</style></head>"
            f"<body><main>{''.join(parts)}</main><div id=\"tip\"></div>"
            f"<script type=\"application/json\" id=\"report-data\">{_json_for_script(doc)}</script>"
            f"<script>{_asset('report.js')}</script></body></html>\n")


def write_html(path: str, inp: ReportInput) -> None:
    """Render and write atomically (temp file + rename)."""
    text = render_html(inp)
    with atomic_write(path) as fh:
        fh.write(text)
