"""gguf-experts stats: how skewed routing is, per layer and expert, by phase and by sequence."""
from __future__ import annotations

import argparse

import numpy as np

from ..analysis.stats import (
    StatsAccumulator,
    expert_frame,
    layer_frame,
    sequence_frame,
    stats_document,
)
from ..reporters.tabular import Output, add_output_options, emit, frame_to_table
from ._trace_input import add_trace_arguments, expert_bytes, open_trace
from ._types import at_least

NAME = "stats"
HELP = "expert activation statistics: counts and shares per layer and expert, never-activated experts, imbalance"
DESCRIPTION = (HELP + ". CSV: one row per (layer, expert), sorted by activations within each layer; JSON: "
               "per-layer arrays indexed by expert id; table: per-layer summary and the busiest experts.")
ORDER = 50


NA_NOTE = ("no value: that layer or sequence has no tokens of that phase (e.g. no decode tokens for the *_decode "
           "columns), so there is nothing to measure")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_trace_arguments(p)
    p.add_argument("--by", choices=("expert", "layer", "sequence"), default="expert",
                   help="CSV/table rows: per (layer, expert) [default], per layer (imbalance), per sequence")
    p.add_argument("--top", type=at_least(1), default=5, metavar="N", help="experts per layer in the table (default 5)")
    add_output_options(p)


def run(args: argparse.Namespace) -> int:
    header, chunks = open_trace(args.trace)
    fp = header.fingerprint
    eb = expert_bytes(args.model, header, args.trace)
    acc = StatsAccumulator(fp.n_layer, fp.n_expert)
    for c in chunks:
        acc.update(c.layer, c.experts, c.phase, c.seq)
    frames = {"expert": lambda: expert_frame(acc, eb), "layer": lambda: layer_frame(acc),
              "sequence": lambda: sequence_frame(acc)}
    df = frames[args.by]()

    def text() -> str:
        lf = layer_frame(acc)
        ef = expert_frame(acc, eb)
        top = ef[ef["rank"] <= args.top].copy()
        top["share"] = (top["share"] * 100).round(2).astype(str) + "%"
        top["cum_share"] = (top["cum_share"] * 100).round(2).astype(str) + "%"
        head = (f"{args.trace}: {fp.architecture}, {len(lf)} MoE layers x {fp.n_expert} experts, "
                f"top-{fp.n_expert_used}; {int(lf['tokens'].max()) if len(lf) else 0} tokens\n\n")
        if args.by != "expert":
            return head + frame_to_table(df, na_note=NA_NOTE)
        cols = ["layer", "tokens", "tokens_prefill", "tokens_decode", "activations", "never_activated",
                "top10pct_share", "max_mean", "cv", "gini", "entropy"]
        never = [f"  layer {int(l)}: {' '.join(map(str, np.flatnonzero(acc.counts[:, l].sum(axis=0) == 0)))}"
                 for l in lf["layer"][lf["never_activated"] > 0]]
        return (head + frame_to_table(lf[cols], na_note=NA_NOTE) + f"\nbusiest {args.top} experts per layer:\n"
                + frame_to_table(top) + ("\nnever activated:\n" + "\n".join(never) + "\n" if never else ""))
    emit(Output(df, document=lambda: stats_document(acc, fp.n_expert_used, eb), text=text),
         args.format, args.output)
    return 0
