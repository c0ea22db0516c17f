"""gguf-experts make-model: a tiny random-weight MoE GGUF that llama.cpp runs (tests, demos, benchmarks)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..reporters.tabular import Output, add_output_options, emit, human_bytes

NAME = "make-model"
HELP = "write a tiny random-weight MoE GGUF (qwen3moe or gpt-oss), optionally re-quantized by llama.cpp"
DESCRIPTION = (HELP + ". The summary reports the ggml types really written: llama.cpp's quantizer keeps small "
               "tensors in F32 and falls back to another type where a row is not a multiple of the requested "
               "type's block (Q4_K: 256 values), so a tiny model rarely holds the type its --quant names.")
ORDER = 80
#: the type each --quant asks llama.cpp for in the expert tensors, and its block (values per block)
EXPERT_TYPE = {"F16": ("F16", 1), "Q8_0": ("Q8_0", 32), "Q4_K_M": ("Q4_K", 256), "MXFP4_MOE": ("MXFP4", 32)}
DEFAULT_MAX_SIZE = 4 << 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..demo.tinymodel import ARCHES, LLAMA_MAX_EXPERTS, LLAMA_MAX_LAYERS, QUANT_FTYPES

    p.add_argument("out", metavar="OUT.gguf", help="the model file to write (atomically)")
    p.add_argument("--arch", choices=ARCHES, default="qwen3moe", help="architecture (default qwen3moe)")
    p.add_argument("--quant", choices=tuple(QUANT_FTYPES), default="F32",
                   help="F32 (written by gguf-py) or a type llama.cpp's quantizer produces (needs the [live] extra)")
    p.add_argument("--seed", type=int, default=0, help="random seed >= 0 (the file is deterministic from the options)")
    p.add_argument("--layers", type=int, default=4, help=f"blocks, 1..{LLAMA_MAX_LAYERS} (default 4)")
    p.add_argument("--experts", type=int, default=16,
                   help=f"routed experts per layer, 1..{LLAMA_MAX_EXPERTS} (default 16)")
    p.add_argument("--top-k", type=int, default=4, help="experts used per token, 1..--experts (default 4)")
    p.add_argument("--embd", type=int, default=64, help="embedding length, a multiple of --heads (default 64)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--ff", type=int, default=32, help="expert feed-forward length, >= 1 (default 32)")
    p.add_argument("--max-size", metavar="BYTES", default=None,
                   help="refuse a model larger than this (default 4G; e.g. 16G to allow a large one)")
    add_output_options(p, output=False, what="the summary on stdout")


def _types_text(types: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(types.items(), key=lambda kv: -kv[1]))


def run(args: argparse.Namespace) -> int:
    import pandas as pd  # here, not at import: the CLI builds every command's parser at start-up

    from ..atomic import resolve_target
    from ..demo.tinymodel import check_shape, estimate_bytes, make_tiny_model, written_types
    from ._trace_input import parse_int_list

    n_head_kv = max(1, args.heads // 2)
    check_shape(args.seed, args.layers, args.experts, args.embd, args.heads, n_head_kv, args.ff)
    limit = (parse_int_list(args.max_size, "--max-size") or [DEFAULT_MAX_SIZE])[0]
    size = estimate_bytes(args.arch, args.layers, args.experts, args.embd, args.heads, n_head_kv, args.ff)
    if size > limit:
        raise InputError(f"make-model: these options make a model of about {human_bytes(size)} (F32 before any "
                         f"quantization), over the {human_bytes(limit)} limit; pass --max-size "
                         f"{-(-size // 2**30)}G if that is really wanted")
    resolve_target(args.out, model=True)
    path = make_tiny_model(args.out, arch=args.arch, seed=args.seed, n_layer=args.layers, n_expert=args.experts,
                           n_expert_used=args.top_k, n_embd=args.embd, n_head=args.heads, n_head_kv=n_head_kv,
                           n_ff_exp=args.ff, quant=None if args.quant == "F32" else args.quant)
    types = written_types(path)
    want = EXPERT_TYPE.get(args.quant, ("F32", 1))
    why = ""
    if set(types["experts"]) != {want[0]}:
        why = (f"--quant {args.quant} asks llama.cpp for {want[0]} (blocks of {want[1]} values) in the expert "
               f"tensors, but their rows hold {min(args.embd, args.ff)}..{max(args.embd, args.ff)} values "
               f"(--embd {args.embd}, --ff {args.ff}); llama.cpp's quantizer falls back to another type where a row "
               f"is not a multiple of the block, and its _M mixes pick a larger type for some tensors")
    row = {"path": str(path), "arch": args.arch, "quant": args.quant, "seed": args.seed, "layers": args.layers,
           "experts": args.experts, "top_k": args.top_k, "bytes": Path(path).stat().st_size,
           "expert_types": _types_text(types["experts"]), "other_types": _types_text(types["other"]),
           "note": why}
    text = (f"wrote {path}: {args.arch} --quant {args.quant}, {args.layers} layers, {args.experts} experts, "
            f"top-{args.top_k}, {row['bytes']:,} bytes\n"
            f"types written: experts {row['expert_types']}; other tensors {row['other_types']}\n"
            + (f"why not {want[0]}: {why}\n" if why else ""))
    emit(Output(pd.DataFrame([row]), document=row, text=text), args.format, None)
    return 0
