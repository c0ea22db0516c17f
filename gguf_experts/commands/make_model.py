"""gguf-experts make-model: a tiny random-weight MoE GGUF that llama.cpp runs (tests, demos, benchmarks)."""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ..reporters.tabular import Output, add_output_options, emit

NAME = "make-model"
HELP = "write a tiny random-weight MoE GGUF (qwen3moe or gpt-oss), optionally re-quantized by llama.cpp"
ORDER = 80


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..tinymodel import ARCHES, QUANT_FTYPES

    p.add_argument("out", metavar="OUT.gguf", help="the model file to write (atomically)")
    p.add_argument("--arch", choices=ARCHES, default="qwen3moe", help="architecture (default qwen3moe)")
    p.add_argument("--quant", choices=tuple(QUANT_FTYPES), default="F32",
                   help="F32 (written by gguf-py) or a type llama.cpp's quantizer produces (needs the [live] extra)")
    p.add_argument("--seed", type=int, default=0, help="random seed (the file is deterministic from the options)")
    p.add_argument("--layers", type=int, default=4, help="blocks (default 4)")
    p.add_argument("--experts", type=int, default=16, help="routed experts per layer (default 16)")
    p.add_argument("--top-k", type=int, default=4, help="experts used per token (default 4)")
    p.add_argument("--embd", type=int, default=64, help="embedding length (default 64)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--ff", type=int, default=32, help="expert feed-forward length (default 32)")
    add_output_options(p, output=False, what="the summary on stdout")


def run(args: argparse.Namespace) -> int:
    from ..tinymodel import make_tiny_model

    path = make_tiny_model(args.out, arch=args.arch, seed=args.seed, n_layer=args.layers, n_expert=args.experts,
                           n_expert_used=args.top_k, n_embd=args.embd, n_head=args.heads,
                           n_head_kv=max(1, args.heads // 2), n_ff_exp=args.ff,
                           quant=None if args.quant == "F32" else args.quant)
    row = {"path": str(path), "arch": args.arch, "quant": args.quant, "seed": args.seed, "layers": args.layers,
           "experts": args.experts, "top_k": args.top_k, "bytes": Path(path).stat().st_size}
    text = (f"wrote {path}: {args.arch} {args.quant}, {args.layers} layers, {args.experts} experts, "
            f"top-{args.top_k}, {row['bytes']} bytes\n")
    emit(Output(pd.DataFrame([row]), document=row, text=text), args.format, None)
    return 0
