"""gguf-experts diff: how two traces of one model (e.g. code vs chat) route differently, per layer and expert."""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ..analysis.diff import ShareDiff, top_changes
from ..reporters.tabular import Output, add_output_options, emit, frame_records, frame_to_table
from ._dask_options import add_dask_options, dask_settings
from ._types import at_least

NAME = "diff"
HELP = "compare two traces of one model: per (layer, expert) share in each, the delta, and per-layer divergence"
DESCRIPTION = (HELP + ". Divergence is Jensen-Shannon in bits (0 = same routing, 1 = disjoint experts). Rows are "
               "per (layer, expert) with the layer's divergence repeated; --by layer gives one row per layer.")
ORDER = 58


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A.bin", help="first trace (the baseline); any input stats reads; a quoted glob "
                                              "(or A1,A2,...) makes one side of several traces whose counts add")
    p.add_argument("b", metavar="B.bin", help="second trace (or glob, or list); deltas are B minus A")
    p.add_argument("--model", "-m", metavar="MODEL.gguf",
                   help="check both traces against this model (else they are only checked against each other)")
    p.add_argument("--by", choices=("expert", "layer"), default="expert",
                   help="rows per (layer, expert) [default] or per layer")
    p.add_argument("--top", type=at_least(1), default=3, metavar="N",
                   help="table format: the N experts per layer whose share changed most (default 3)")
    add_output_options(p)
    add_dask_options(p)


def expert_rows(d: ShareDiff) -> pd.DataFrame:
    """The per (layer, expert) rows with the layer's divergence alongside."""
    js = d.layers.set_index("layer")["js_divergence"]
    return d.experts.assign(js_divergence=js.reindex(d.experts["layer"]).to_numpy())


def _side(text: str) -> list[str]:
    """A side: a path, a glob, or a comma-separated list of them."""
    from ..fleet import expand

    return expand([p for p in text.split(",") if p] if "," in text and not Path(text).exists() else [text])


def _label(paths: list[str]) -> str:
    return Path(paths[0]).name if len(paths) == 1 else f"{Path(paths[0]).name} +{len(paths) - 1}"


def run(args: argparse.Namespace) -> int:
    from ..fleet import compare_sides

    settings = dask_settings(args)
    a, b = _side(args.a), _side(args.b)
    if settings.wanted:  # counted by Dask workers
        from ..fleet_dask import compare_fleet, runner_for

        with runner_for(settings) as runner:
            d = compare_fleet(runner, a, b, args.model)
    else:
        d = compare_sides(a, b, args.model)
    df = d.layers if args.by == "layer" else expert_rows(d)
    la, lb = _label(a), _label(b)
    doc = {"a": la, "b": lb, "a_traces": a, "b_traces": b,
           "overall_js_divergence": d.overall, "layers": frame_records(d.layers),
           "by": args.by, "rows": frame_records(df)}

    def text() -> str:
        ch = top_changes(d, max(1, args.top))
        return (f"{la} vs {lb}: mean Jensen-Shannon divergence {d.overall:.4f} bits "
                "(0 = same routing, 1 = disjoint)\n\n" + frame_to_table(d.layers) + "\n"
                + f"largest share changes ({lb} minus {la}), {max(1, args.top)} per layer:\n"
                + frame_to_table(ch, max_rows=200))
    emit(Output(df, document=doc, text=text), args.format, args.output)
    return 0
