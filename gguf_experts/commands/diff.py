"""gguf-experts diff: how two traces of one model (e.g. code vs chat) route differently, per layer and expert."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..analysis.diff import ShareDiff, diff_frames, share_diff, top_changes
from ..errors import ModelMismatchError
from ..fingerprint import check_same_model
from ..formats import Input, open_input
from ..join import join
from ..prune_map import original_input
from ..reporters.tabular import (
    Output,
    add_output_options,
    emit,
    frame_records,
    frame_to_table,
)
from ..trace.format import ModelFingerprint

NAME = "diff"
HELP = "compare two traces of one model: per (layer, expert) share in each, the delta, and per-layer divergence"
DESCRIPTION = (HELP + ". Divergence is Jensen-Shannon in bits (0 = same routing, 1 = disjoint experts). Rows are "
               "per (layer, expert) with the layer's divergence repeated; --by layer gives one row per layer.")
ORDER = 55


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A.bin", help="first trace (the baseline); any input stats reads")
    p.add_argument("b", metavar="B.bin", help="second trace; deltas are B minus A")
    p.add_argument("--model", "-m", metavar="MODEL.gguf",
                   help="check both traces against this model (else they are only checked against each other)")
    p.add_argument("--by", choices=("expert", "layer"), default="expert",
                   help="rows per (layer, expert) [default] or per layer")
    p.add_argument("--top", type=int, default=3, metavar="N",
                   help="table format: the N experts per layer whose share changed most (default 3)")
    add_output_options(p, default="table")


def _source(path: str | os.PathLike[str], model: str | None) -> Any:
    """What join takes for an input: the path of a trace.bin, chunks of another ordered log, or counts."""
    inp = open_input(path, model)
    if inp.format == "trace":
        return path
    return inp.counts if inp.counts is not None else inp.chunks


def _shape(inp: Input) -> ModelFingerprint:
    return inp.counts.fingerprint() if inp.counts is not None else inp.header.fingerprint  # type: ignore[union-attr]


def compare(a: str | os.PathLike[str], b: str | os.PathLike[str], model: str | None = None) -> ShareDiff:
    """Load and compare two inputs (traces or another tool's files); refuses inputs of different models."""
    if model:
        ha, hb = join(_source(a, model), model), join(_source(b, model), model)
        return diff_frames(ha.experts, hb.experts, ha.layers, hb.layers)
    ia, ib = original_input(open_input(a)), original_input(open_input(b))  # a pruned model's: original ids
    fa, fb = _shape(ia), _shape(ib)
    if fa.tensor_digest and fb.tensor_digest:
        check_same_model(fa, fb, str(a), str(b))
    elif fa.n_expert != fb.n_expert:  # a foreign file without --model: only shapes are known
        raise ModelMismatchError(f"{a} and {b} were captured from different models (n_expert: {fa.n_expert} vs "
                                 f"{fb.n_expert}); compare traces of one model")
    ca, cb = ia.to_counts(), ib.to_counts()
    n = max(ca.n_layer, cb.n_layer)
    ca, cb = ca.resized(n), cb.resized(n)
    return share_diff(ca.activations, cb.activations, tokens_a=ca.tokens.sum(axis=0), tokens_b=cb.tokens.sum(axis=0))


def expert_rows(d: ShareDiff) -> pd.DataFrame:
    """The per (layer, expert) rows with the layer's divergence alongside."""
    js = d.layers.set_index("layer")["js_divergence"]
    return d.experts.assign(js_divergence=js.reindex(d.experts["layer"]).to_numpy())


def run(args: argparse.Namespace) -> int:
    d = compare(args.a, args.b, args.model)
    df = d.layers if args.by == "layer" else expert_rows(d)
    la, lb = Path(args.a).name, Path(args.b).name
    doc = {"a": la, "b": lb, "overall_js_divergence": d.overall, "layers": frame_records(d.layers),
           "by": args.by, "rows": frame_records(df)}

    def text() -> str:
        ch = top_changes(d, max(1, args.top))
        return (f"{la} vs {lb}: mean Jensen-Shannon divergence {d.overall:.4f} bits "
                "(0 = same routing, 1 = disjoint)\n\n" + frame_to_table(d.layers) + "\n"
                + f"largest share changes ({lb} minus {la}), {max(1, args.top)} per layer:\n"
                + frame_to_table(ch, max_rows=200))
    emit(Output(df, document=doc, text=text), args.format, args.output)
    return 0
