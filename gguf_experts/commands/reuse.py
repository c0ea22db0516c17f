"""gguf-experts reuse: how much consecutive tokens reuse experts, and how long until an expert comes back."""
from __future__ import annotations

import argparse

from ..analysis.cache.cache import LayerLRU
from ..analysis.reuse import ReuseAccumulator
from ..analysis.stats import StatsAccumulator
from ..atomic import atomic_write
from ..reporters.tabular import Output, add_output_options, emit, frame_records, frame_to_csv, frame_to_table, say_wrote
from ._trace_input import open_trace

NAME = "reuse"
HELP = "expert reuse: overlap of consecutive decode tokens, reuse gaps in tokens, co-activation of experts"
DESCRIPTION = (HELP + ". Per layer: mean |E_t & E_t-1| / k over consecutive decode tokens of one sequence, "
               "and the distribution of gaps (tokens of that layer since the expert was last used, across "
               "sequences, as a cache sees them). --coactivation FILE writes pairs of experts firing together.")
ORDER = 55


NA_NOTE = ("no value: mean_overlap needs two consecutive decode tokens of one sequence in that layer (decode_pairs "
           "0: e.g. a prefill-only trace, capture -n 0); the gap columns need an expert used twice")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="trace.bin written by `gguf-experts capture` (or `convert`), or an ordered log "
                                 "of another tool (moe-trace CSV, MBLT, RTRACE01)")
    p.add_argument("--model", "-m", metavar="MODEL.gguf",
                   help="the model, for logs that do not say k (moe-trace CSV, RTRACE01, CSV logs)")
    p.add_argument("--by", choices=("layer", "gap"), default="layer",
                   help="rows per layer [default] or per (layer, gap bucket): the reuse-gap distribution")
    p.add_argument("--coactivation", metavar="FILE.csv",
                   help="also write layer,expert_a,expert_b,count,lift for pairs selected for the same token")
    add_output_options(p)


def run(args: argparse.Namespace) -> int:
    header, chunks = open_trace(args.trace, model=args.model)
    fp = header.fingerprint
    L, M, k = fp.n_layer, fp.n_expert, fp.n_expert_used
    lru = LayerLRU(L, M, k)
    reuse = ReuseAccumulator(L, M, k, coactivation=bool(args.coactivation))
    stats = StatsAccumulator(L, M) if args.coactivation else None
    for c in chunks:
        for sl, cd in lru.update(c.layer, c.experts):
            reuse.update(cd, c.seq[sl], c.phase[sl])
        if stats is not None:
            stats.update(c.layer, c.experts, c.phase, c.seq)
    lf = reuse.layer_frame()
    gf = reuse.gap_frame()
    if args.coactivation and stats is not None:
        co = reuse.coactivation_frame(stats.counts.sum(axis=0), stats.tokens.sum(axis=0))
        with atomic_write(args.coactivation) as fh:
            fh.write(frame_to_csv(co))
        say_wrote(args.coactivation, f"csv, {len(co)} pairs")
    df = lf if args.by == "layer" else gf

    def text() -> str:
        head = f"{args.trace}: {fp.architecture}, {M} experts per layer, top-{k}\n\n"
        return head + frame_to_table(df, max_rows=200, na_note=NA_NOTE)
    emit(Output(df, document=lambda: {"layers": frame_records(lf), "gaps": frame_records(gf)}, text=text),
         args.format, args.output)
    return 0
