"""gguf-experts profile: REAP saliency of every expert from prompt+response texts run through llama.cpp."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.reap import ReapAccumulator
from ..atomic import resolve_target
from ..errors import InputError
from ..trace.live.prompts import head_for, jsonl_texts
from ..reporters.tabular import Output, add_output_options, emit, frame_records, frame_to_table
from ._llama_options import add_llama_options, add_progress, progress
from ._types import at_least

NAME = "profile"
HELP = "REAP expert saliency (router-weighted expert activation norms) from JSONL texts run through llama.cpp"
DESCRIPTION = (
    HELP + ". Each JSONL record (prompt+response, same keys as capture --jsonl) is evaluated as one sequence; "
    "per MoE layer the selected experts, the gate weights the model applies and the L2 norm of each selected "
    "expert's output before weighting (ffn_moe_down) give, per expert, activation_counts, "
    "activation_frequency, avg_gate_weight, ean_sum, ean_mean, weighted_ean_sum, reap (mean over routed "
    "tokens of gate x norm, gates renormalised over the top-k), max_activations and never_activated. "
    "-o is written atomically every --save-every records and at the end; --resume continues from it. "
    "--compat expert-profile does what llama.cpp's llama-expert-profile (PR #20454) does, so that its numbers "
    "and ours can be compared (see --compat). Unlike capture (keep-alive by default), profile reads through "
    "llama.cpp's eval callback: the expert outputs' norms are intermediate tensors of every layer, which only "
    "the callback observes (one graph split and sync per layer, so it runs slower than capture).")
COMPAT_HELP = (
    "expert-profile: tokenise prompt + '\\n' + response (BOS as the vocabulary says), cut to the context, and ask "
    "for the logits of the last token only, as llama-expert-profile does: llama.cpp then routes only that output "
    "row in the last layer, so there it counts one row per record, not one per token. Our default joins prompt "
    "and response with nothing (the text as given) and asks for every output, so every layer, the last "
    "included, scores every token of the record")
ORDER = 70


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="GGUF MoE model")
    p.add_argument("--jsonl", required=True, metavar="FILE", help="JSON lines of prompt/response records")
    p.add_argument("-o", "--output", required=True, metavar="EXPERT_STATS.json",
                   help="the expert statistics (also the checkpoint --resume continues from)")
    p.add_argument("--save-every", type=at_least(1), default=50, metavar="N", help="checkpoint every N records (50)")
    add_llama_options(p, ctx_help="context size (default 2048); longer records are cut to it")
    p.add_argument("--resume", action="store_true", help="continue from -o, skipping the records it holds")
    p.add_argument("--limit", type=at_least(0), default=None, metavar="N", help="stop after N records in total")
    p.add_argument("--prune-plan", type=at_least(1), default=None, metavar="K",
                   help="report the K least salient experts per layer instead of the lowest/highest REAP")
    add_output_options(p, output=False, what="the report on stdout")
    p.add_argument("--compat", choices=("expert-profile",), default=None, help=COMPAT_HELP)
    add_progress(p)


class _RecordSink:
    """Receives each (ubatch, layer) record of one JSONL record; merged into the total when it completes,
    so a checkpoint never holds half a record."""

    def __init__(self, n_layer: int, n_expert: int) -> None:
        self.part = ReapAccumulator(n_layer, n_expert)

    def write(self, seq: int, phase: int, layer: int, pos: np.ndarray, tokens: np.ndarray, experts: np.ndarray,
              weights: np.ndarray | None = None, down_norms: np.ndarray | None = None) -> None:
        if weights is None or down_norms is None:
            raise InputError(f"layer {layer}: llama.cpp's graph gave no gate weights or no ffn_moe_down output; "
                             "REAP needs both (this architecture is not supported by profile)")
        n = len(experts)
        self.part.update(np.full(n, layer), experts, weights, down_norms)


def _start(args: argparse.Namespace, fp: Any) -> ReapAccumulator:
    out = Path(args.output)
    if args.resume and out.exists():
        acc = ReapAccumulator.load(out)
        want = acc.meta.get("fingerprint", {})
        if want.get("tensor_digest") != fp.tensor_digest or (acc.n_layer, acc.n_expert) != (fp.n_layer, fp.n_expert):
            raise InputError(f"{out} holds statistics of another model; pass another -o or drop --resume")
        if acc.meta.get("compat") != args.compat:
            raise InputError(f"{out} was profiled with --compat {acc.meta.get('compat') or '(none)'}; resume with "
                             "the same --compat")
        if acc.meta.get("jsonl") not in (None, Path(args.jsonl).name):
            raise InputError(f"{out} was profiled from {acc.meta.get('jsonl')}, not {Path(args.jsonl).name}; "
                             "resume with the same --jsonl")
        return acc
    if out.exists() and not args.resume:
        raise InputError(f"{out} exists; pass --resume to continue it, or another -o")
    acc = ReapAccumulator(fp.n_layer, fp.n_expert)
    acc.meta = {"model": Path(args.model).name, "fingerprint": fp.to_dict(), "jsonl": Path(args.jsonl).name,
                "ctx_size": args.ctx_size, "truncated_records": 0, "skipped_records": 0}
    if args.compat:
        acc.meta["compat"] = args.compat
    return acc


def _profile_record(llm: Any, text: str, acc: ReapAccumulator, sink: _RecordSink, ctx_size: int,
                    logits: str = "all") -> None:
    """Evaluate one JSONL record as one sequence and merge its statistics (or count it cut or skipped)."""
    from ..trace.format import PHASE_PREFILL

    # cut to what can hold ctx-size tokens before tokenising (its cost grows faster than the text)
    head = head_for(text, ctx_size, llm.max_token_bytes())
    toks = llm.tokenize(head) if head.strip() else []
    if len(toks) > ctx_size:
        toks = toks[:ctx_size]
        acc.meta["truncated_records"] = acc.meta.get("truncated_records", 0) + 1
    if toks:
        sink.part = ReapAccumulator(acc.n_layer, acc.n_expert)
        llm.new_sequence()
        llm.eval(toks, PHASE_PREFILL, logits=logits)  # "all": every row is an output, the last layer sees all
        acc.merge(sink.part)
    else:
        acc.meta["skipped_records"] = acc.meta.get("skipped_records", 0) + 1


def run(args: argparse.Namespace) -> int:
    from ..trace.live.llama import TracedLlama
    from ..gguf.fingerprint import model_fingerprint

    resolve_target(args.output)  # fail before the run, not at the first checkpoint
    compat = args.compat == "expert-profile"
    texts = jsonl_texts(args.jsonl, sep="\n" if compat else "")
    if not texts:
        raise InputError(f"{args.jsonl}: no records (empty, or only blank lines); nothing to profile")
    fp = model_fingerprint(args.model)
    acc = _start(args, fp)
    end = len(texts) if args.limit is None else min(len(texts), args.limit)
    sink = _RecordSink(fp.n_layer, fp.n_expert)
    interrupted = False
    with progress(args, "profile", "rec", total=end, initial=min(acc.records, end)) as update:
        try:
            with TracedLlama(args.model, sink, fp, weights=True, n_ctx=args.ctx_size,
                             n_ubatch=args.ubatch_size, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                             observe_down_norms=True) as llm:
                for i in range(acc.records, end):  # one llama.cpp evaluation per record
                    _profile_record(llm, texts[i], acc, sink, args.ctx_size, "last" if compat else "all")
                    acc.records = i + 1
                    if update is not None:
                        update(1)
                    if acc.records % args.save_every == 0:
                        acc.save(args.output)
        except KeyboardInterrupt:
            interrupted = True  # the accumulator is at a record boundary: save it and report
    acc.save(args.output)
    df = acc.prune_plan(args.prune_plan) if args.prune_plan is not None else acc.extremes()

    def text() -> str:
        head = (f"{'interrupted: ' if interrupted else ''}wrote {args.output}: {acc.records} records, "
                f"{int(acc.tokens.max()) if acc.tokens.size else 0} tokens per MoE layer\n")
        what = (f"{args.prune_plan} least salient experts per layer (lowest REAP):\n" if args.prune_plan is not None
                else "lowest and highest REAP experts per layer (rank 1 = the extreme):\n")
        return head + what + frame_to_table(df)
    emit(Output(df, document=lambda: {"stats": args.output, "records": acc.records, "rows": frame_records(df)},
                text=text), args.format, None)
    return 130 if interrupted else 0
