"""gguf-experts stats: how skewed routing is, per layer and expert, by phase and by sequence."""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from ..analysis.stats import StatsAccumulator, expert_frame, layer_frame, sequence_frame, stats_document
from ..analysis.iostats import io_document, io_text, sequence_io_frame
from ..errors import InputError
from ..gguf.fingerprint import ModelFingerprint
from ..formats.write import COUNT_WRITERS, write_counts
from ..formats.counts import ExpertCounts
from ..formats.load import Input
from ..formats.rtrace import near_ties
from ..formats.write import count_text
from ..reporters.tabular import Output, add_output_options, emit, frame_records, frame_to_table, say_wrote, write_text
from ..trace.format import IoTable
from ._dask_options import add_dask_options, dask_settings
from ._trace_input import add_trace_arguments, expert_bytes, open_any
from ._types import at_least

NAME = "stats"
HELP = "expert activation statistics: counts and shares per layer and expert, never-activated experts, imbalance"
DESCRIPTION = (HELP + ". CSV: one row per (layer, expert), sorted by activations within each layer; JSON: "
               "per-layer arrays indexed by expert id; table: per-layer summary and the busiest experts. "
               "--format tracer-json / reap-json / imatrix write the counts in those tools' formats. "
               "An RTRACE01 input adds the share of near-ties (k-th vs (k+1)-th router probability).")
ORDER = 50


NA_NOTE = ("no value: that layer or sequence has no tokens of that phase (e.g. no decode tokens for the *_decode "
           "columns), so there is nothing to measure")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_trace_arguments(p, many=True)
    p.add_argument("--by", choices=("expert", "layer", "sequence", "io"), default="expert",
                   help="CSV/table rows: per (layer, expert) [default], per layer (imbalance), per sequence, "
                        "io: measured disk bytes and major faults per (sequence, phase)")
    p.add_argument("--top", type=at_least(1), default=5, metavar="N", help="experts per layer in the table (default 5)")
    p.add_argument("--tie-margin", type=float, default=1e-3, metavar="P",
                   help="RTRACE01 input: a token's choice is a near-tie when its k-th and (k+1)-th router "
                        "probabilities differ by less than P (default 0.001)")
    add_output_options(p, extra=tuple(COUNT_WRITERS),
                       extra_help="; tracer-json, reap-json and imatrix (GGUF, needs -o and --model) write "
                                  "the counts for other tools")
    add_dask_options(p)


def _margin_frame(layer: np.ndarray, margin: np.ndarray, n_layer: int, threshold: float) -> pd.DataFrame:
    t = near_ties(layer, margin, n_layer, threshold)
    ls = np.flatnonzero(t["rows"])
    return pd.DataFrame({"layer": ls, "rows": t["rows"][ls], "near_ties": t["near_ties"][ls],
                         "near_tie_share": t["share"][ls], "median_margin": t["median_margin"][ls]})


def _accumulate(inp: Input, model: str | None, io: list[IoTable] | None = None
                ) -> tuple[StatsAccumulator, ModelFingerprint, bool]:
    """Counts of any input in a StatsAccumulator, the fingerprint to report with, and whether phases are known;
    the chunks' measured I/O tables are appended to ``io``."""
    if inp.counts is not None:
        counts = inp.counts
        fp = counts.fingerprint()
        if model:
            from ..gguf.reader import open_model
            from ..gguf.fingerprint import fingerprint

            fp = fingerprint(open_model(model))
        acc = StatsAccumulator(counts.n_layer, counts.n_expert)
        acc.counts, acc.tokens = counts.counts.copy(), counts.tokens.copy()
        return acc, fp, counts.phase_known
    assert inp.header is not None and inp.chunks is not None
    fp = inp.header.fingerprint
    acc = StatsAccumulator(fp.n_layer, fp.n_expert)
    for c in inp.chunks:
        acc.update(c.layer, c.experts, c.phase, c.seq)
        if io is not None and c.io is not None:
            io.append(c.io)
    return acc, fp, bool(inp.header.meta.get("phase_known", True))


def accumulate_path(path: str, model: str | None) -> tuple[StatsAccumulator, ModelFingerprint, bool]:
    """_accumulate of the input at ``path`` (a Dask task: the worker opens the file itself)."""
    return _accumulate(open_any(path, model), model)


def _write_counts(args: argparse.Namespace, inp: Input | None, acc: StatsAccumulator, fp: ModelFingerprint,
                  phase_known: bool) -> None:
    """--format tracer-json / reap-json / imatrix: the counts in another tool's format."""
    out = ExpertCounts(acc.counts, acc.tokens, k=fp.n_expert_used or None,
                       source=inp.format if inp is not None else "several", phase_known=phase_known,
                       meta=dict(inp.counts.meta) if inp is not None and inp.counts is not None else {})
    if args.format == "imatrix" and not args.output:
        raise InputError("--format imatrix writes a GGUF file: give -o FILE.gguf (and --model)")
    if args.output:
        write_counts(args.format, out, args.output, model=args.model)
        say_wrote(args.output, args.format)
    else:
        write_text(count_text(args.format, out), None)


def _many(args: argparse.Namespace, paths: list[str]) -> tuple[StatsAccumulator, ModelFingerprint, bool,
                                                                 pd.DataFrame, list[dict]]:
    """Several traces: counts add; per-sequence rows keep their trace and their own sequence number."""
    from ..fleet import labels, open_all, fleet_summary

    inputs = open_all(paths, args.model)
    names = labels(paths)
    settings = dask_settings(args)
    if settings.wanted:  # on Dask: counts add, each sequence summarised once from its whole counts
        from ..fleet_dask import runner_for

        from ..fleet_dask import stats_fleet

        headers = [inp.header if inp.format == "trace" else None for inp in inputs]
        with runner_for(settings) as runner:  # trace.bin files in parts, others whole
            parts = stats_fleet(runner, paths, headers, args.model, accumulate_path)
    else:
        parts = [_accumulate(inp, args.model) for inp in inputs]
    L = max(a.n_layer for a, _, _ in parts)
    M = parts[0][0].n_expert
    acc = StatsAccumulator(L, M)
    for a, _, _ in parts:
        acc.counts[:, :a.n_layer] += a.counts
        acc.tokens[:, :a.n_layer] += a.tokens
    seqs = pd.concat([sequence_frame(a).assign(trace=n) for (a, _, _), n in zip(parts, names)], ignore_index=True)
    seqs = seqs[["trace", *[c for c in seqs.columns if c != "trace"]]]
    fp = next((f for _, f, _ in parts if f.tensor_digest), parts[0][1])
    return acc, fp, all(k for _, _, k in parts), seqs, fleet_summary(inputs, names)


def _load(args: argparse.Namespace) -> tuple[Input | None, StatsAccumulator, ModelFingerprint, bool,
                                             pd.DataFrame | None, list[dict] | None, IoTable | None, dict]:
    """One trace (its measured I/O too), or several (counts add; sequences keep their trace)."""
    from ..fleet import expand

    paths = expand(args.trace)
    if len(paths) > 1:
        if args.by == "io":
            raise InputError("--by io: measured I/O is per trace (per process); give one trace")
        acc, fp, phase_known, seqs, traces = _many(args, paths)
        args.trace = f"{len(paths)} traces"
        return None, acc, fp, phase_known, seqs, traces, None, {}
    args.trace = paths[0]
    dask_settings(args)  # bad --scheduler/--workers refused alike; one trace is counted here (sequences in order)
    inp = open_any(args.trace, args.model)
    io_parts: list[IoTable] = []
    acc, fp, phase_known = _accumulate(inp, args.model, io_parts)
    io = IoTable.concat(io_parts) if io_parts else None
    if args.by == "io" and io is None:
        raise InputError(f"{args.trace}: --by io: no measured I/O in this trace (recorded from trace version 2 on "
                         "by `capture` and `run`); capture or run again, or choose another --by")
    return inp, acc, fp, phase_known, None, None, io, inp.header.meta if inp.header is not None else {}


def run(args: argparse.Namespace) -> int:
    inp, acc, fp, phase_known, seqs, traces, io, meta = _load(args)
    if args.format in COUNT_WRITERS:
        _write_counts(args, inp, acc, fp, phase_known)
        return 0
    eb = expert_bytes(args.model, fp, args.trace)
    if eb is not None and eb.shape[0] != acc.n_layer:
        eb = eb[:acc.n_layer]
    margins = (_margin_frame(inp.margin_layer, inp.margin, acc.n_layer, args.tie_margin)
               if inp is not None and inp.margin is not None and inp.margin_layer is not None else None)
    frames = {"expert": lambda: expert_frame(acc, eb), "layer": lambda: layer_frame(acc),
              "sequence": lambda: sequence_frame(acc) if seqs is None else seqs,
              "io": lambda: sequence_io_frame(io or IoTable.empty())}
    df = frames[args.by]()
    fmt = inp.format if inp is not None else "several"

    def document() -> dict:
        doc = stats_document(acc, fp.n_expert_used, eb)
        doc["source_format"] = fmt
        if traces is not None:
            doc["traces"] = traces
            if args.by == "sequence":
                doc["sequences"] = frame_records(df)
        doc["phase_known"] = phase_known
        doc["io"] = io_document(io, meta)
        if margins is not None:
            doc["near_ties"] = {"threshold": args.tie_margin,
                                "share": float(margins["near_ties"].sum() / max(1, margins["rows"].sum())),
                                "layers": margins.to_dict(orient="list")}
        return doc

    def text() -> str:
        lf = layer_frame(acc)
        ef = expert_frame(acc, eb)
        top = ef[ef["rank"] <= args.top].copy()
        top["share"] = (top["share"] * 100).round(2).astype(str) + "%"
        top["cum_share"] = (top["cum_share"] * 100).round(2).astype(str) + "%"
        k = f"top-{fp.n_expert_used}" if fp.n_expert_used else "top-k unknown (pass --model)"
        src = "" if inp is None or inp.format == "trace" else f" [{inp.description}]"
        head = (f"{args.trace}{src}: {fp.architecture}, {len(lf)} MoE layers x {acc.n_expert} experts, "
                f"{k}; {int(lf['tokens'].max()) if len(lf) else 0} tokens"
                + ("" if phase_known else "; prefill/decode not recorded (counted as decode)") + "\n\n")
        tail = ""
        if margins is not None:
            share = margins["near_ties"].sum() / max(1, margins["rows"].sum())
            tail = (f"\nnear-ties (k-th minus (k+1)-th router probability < {args.tie_margin:g}): "
                    f"{share:.2%} of token-layer choices\n" + frame_to_table(margins.round(6)))
        if args.by == "io":
            return head + io_text(io, meta)
        tail += io_text(io, meta)
        if args.by != "expert":
            return head + frame_to_table(df, na_note=NA_NOTE) + tail
        cols = ["layer", "tokens", "tokens_prefill", "tokens_decode", "activations", "never_activated",
                "top10pct_share", "max_mean", "cv", "gini", "entropy"]
        never = [f"  layer {int(l)}: {' '.join(map(str, np.flatnonzero(acc.counts[:, l].sum(axis=0) == 0)))}"
                 for l in lf["layer"][lf["never_activated"] > 0]]
        return (head + frame_to_table(lf[cols], na_note=NA_NOTE) + f"\nbusiest {args.top} experts per layer:\n"
                + frame_to_table(top) + ("\nnever activated:\n" + "\n".join(never) + "\n" if never else "")
                + tail)
    emit(Output(df, document=document, text=text), args.format, args.output)
    return 0
