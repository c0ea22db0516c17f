"""gguf-experts prune: a smaller GGUF without some experts, that llama.cpp loads and runs."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import InputError
from ..reporters.tabular import Output, add_output_options, emit, frame_records, frame_to_table, human_bytes

from ._llama_options import add_progress, progress
from ._types import at_least

NAME = "prune"
HELP = "write a copy of a MoE model without some experts (by a REAP profile, a drop list, or use in a trace)"
DESCRIPTION = (
    HELP + ". Every MoE layer keeps the same number of experts (llama.cpp has one expert count); every "
    "per-expert tensor (*_exps weights, biases and scales, router rows, exp_probs_b) loses the dropped slices, "
    "everything else is copied byte for byte, and the original expert ids are stored in the output "
    "(gguf_experts.prune.original_ids.<layer>) so traces of it read in the original ids. --dry-run shows the "
    "plan: per layer the experts kept and dropped and the bytes, and with --trace the selections that hit "
    "dropped experts.")
ORDER = 75


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..prune.cut import BY

    p.add_argument("model", metavar="MODEL.gguf", help="the model to prune (any shard of a split model)")
    p.add_argument("-o", "--output", metavar="OUT.gguf",
                   help="the pruned model (written to a temp file, then renamed; needed unless --dry-run); "
                        "the summary goes to stdout")
    p.add_argument("--plan", metavar="FILE",
                   help="`gguf-experts profile` JSON, llama-expert-profile JSON, or a layer,expert CSV of "
                        "experts to drop")
    p.add_argument("--trace", metavar="T.bin", help="a trace of MODEL: selections to prune --by, and the "
                                                    "--dry-run numbers")
    p.add_argument("--by", choices=BY, default=None,
                   help="rank experts by REAP saliency (profile JSON), selections (frequency) or drop only "
                        "never-used ones (default: reap for a profile, frequency for a trace)")
    p.add_argument("--keep", type=at_least(1), metavar="N", help="experts to keep per layer")
    p.add_argument("--keep-fraction", type=float, metavar="F", help="share of experts to keep per layer (0..1]")
    p.add_argument("--split-max-size", metavar="SIZE",
                   help="write shards of at most SIZE bytes of tensor data each (e.g. 500M, 4G; as llama-gguf-split)")
    p.add_argument("--dry-run", action="store_true", help="show the plan; write no model")
    add_progress(p)
    add_output_options(p, output=False, what="the summary on stdout")


def parse_size(text: str | None) -> int | None:
    """'4G' -> 4e9 (decimal, as llama-gguf-split); plain bytes allowed."""
    if text is None:
        return None
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12}.get(t[-1:], 1)
    try:
        v = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise InputError(f"--split-max-size {text!r}: not a size; give e.g. 500M or 4G") from None
    if v < 1:
        raise InputError(f"--split-max-size {text!r}: must be positive")
    return int(v)


def _plan(args: argparse.Namespace, model: Any) -> Any:
    from ..prune.cut import build_plan, read_plan_file, trace_scores

    if args.plan is not None:
        source = read_plan_file(args.plan, model)
    elif args.trace is not None:
        source = trace_scores(args.trace, model)
    else:
        raise InputError("say which experts to drop: --plan FILE, or --by frequency|never-used --trace T.bin "
                         "(with --keep N or --keep-fraction F)")
    return build_plan(model, source, args.by, args.keep, args.keep_fraction)


def run(args: argparse.Namespace) -> int:
    from ..gguf.reader import open_model
    from ..prune.cut import check_output, write_pruned
    from ..prune.dry_run import dry_run

    model = open_model(args.model)
    plan = _plan(args, model)
    split = parse_size(args.split_max_size)
    if not args.dry_run:
        if not args.output:
            raise InputError("prune: give the output with -o OUT.gguf (or pass --dry-run)")
        check_output(model, plan, args.output, split)
    rows, summary = dry_run(model, plan, args.trace)
    if summary["routing_changes"]:
        print(f"gguf-experts: warning: {summary['routing']}", file=sys.stderr)
    if not args.dry_run:
        with progress(args, "prune", "B", total=summary["model_bytes_after"], leave=True, unit_scale=True,
                      unit_divisor=1024) as update:
            res = write_pruned(model, plan, args.output, split, progress=update)
        summary.update(written=[str(p) for p in res.paths], bytes_written=res.bytes_written)
    import pandas as pd  # here, not at import time: cli imports every command to build its parser

    df = pd.DataFrame(rows)

    def text() -> str:
        s = summary
        head = [(f"{s['source']}: {s['architecture']}, {s['experts_before']} -> {s['experts_after']} experts per "
                 f"layer (top-{s['n_expert_used']}), {s['method']}; model {human_bytes(s['model_bytes_before'])} "
                 f"-> {human_bytes(s['model_bytes_after'])}"), f"routing: {s['routing']}"]
        if "trace" in s:
            head.append(f"{s['trace']}: {s['tokens']} tokens, {s['selections']} selections; "
                        f"{100 * s['dropped_selection_share']:.2f}% of selections hit dropped experts, "
                        f"{100 * s['changed_token_share']:.2f}% of tokens would be routed differently; "
                        f"bytes per token at top-k {human_bytes(s['bytes_per_token_before'])} -> "
                        f"{human_bytes(s['bytes_per_token_after'])}")
        if "written" in s:
            head.append("wrote " + ", ".join(s["written"]))
        elif args.dry_run:
            head.append("dry run: nothing written")
        shown = df.drop(columns=["kept_ids"])
        return "\n".join(head) + "\n\n" + frame_to_table(shown, max_rows=200)
    emit(Output(df, document=lambda: {**summary, "layers": frame_records(df)}, text=text), args.format, None)
    return 0
