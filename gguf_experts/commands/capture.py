"""gguf-experts capture: run a model in llama.cpp and record its expert routing into trace.bin."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from .. import prompts
from ..errors import InputError
from ..prompts import JSONL_PROMPT_KEYS, JSONL_RESPONSE_KEYS, jsonl_text, jsonl_texts  # noqa: F401  (moved)
from ..reporters.tabular import FORMATS, Output, emit

NAME = "capture"
HELP = "run a MoE model in llama.cpp (llama-cpp-python) and record the experts it selects into trace.bin"
DESCRIPTION = (HELP + ". Each prompt is its own sequence (fresh KV state): prefill, then greedy decode of -n "
               "tokens. --jsonl reads one JSON object per line and captures prompt+response as one text "
               "(keys: prompt/response, or instruction/input/output, or text, or messages [{role, content}]).")
ORDER = 30

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="GGUF model (any MoE architecture llama.cpp runs)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", "-p", help="one prompt")
    src.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line (blank lines skipped)")
    src.add_argument("--jsonl", metavar="FILE", help="JSON lines of prompt/response records, captured as "
                     "prompt+response (teacher-forced prefill)")
    p.add_argument("-n", "--n-predict", type=int, default=None,
                   help="tokens to generate greedily after each prompt (default 32; 0 with --jsonl)")
    p.add_argument("-c", "--ctx-size", type=int, default=2048, help="context size (default 2048)")
    p.add_argument("--ubatch-size", type=int, default=512, help="tokens per ubatch in prefill (default 512)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: cores, at most 8)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers to offload to a GPU (default 0)")
    p.add_argument("--weights", action="store_true",
                   help="also record the gate weights the model applies (after softmax/normalisation/scaling)")
    p.add_argument("--all-outputs", action="store_true",
                   help="request logits for every prompt token, so the last layer routes every token "
                        "(as a perplexity run does); default: only the last, as in generation")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-generation tokens")
    p.add_argument("-o", "--output", required=True, metavar="TRACE.bin", help="the trace file to write")
    p.add_argument("--format", "-f", choices=FORMATS, default="table",
                   help="format of the run summary on stdout (default: table)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def read_prompts(args: argparse.Namespace) -> list[str]:
    return prompts.read_prompts(args.prompt, args.prompts, args.jsonl)


def run(args: argparse.Namespace) -> int:
    from ..trace.capture import capture

    texts = read_prompts(args)
    n_predict = args.n_predict if args.n_predict is not None else (0 if args.jsonl else 32)
    if n_predict < 0 or args.ctx_size < 8 or args.ubatch_size < 1:
        raise InputError("-n must be >= 0, --ctx-size >= 8, --ubatch-size >= 1")
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=None, unit="tok", desc="capture", file=sys.stderr, dynamic_ncols=True)
    try:
        res = capture(args.model, texts, args.output, n_predict=n_predict, weights=args.weights,
                      n_ctx=args.ctx_size, n_ubatch=args.ubatch_size, n_threads=args.threads,
                      n_gpu_layers=args.n_gpu_layers, ignore_eos=args.ignore_eos,
                      logits="all" if args.all_outputs else "last", progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    row = {"trace": str(res.path), "model": Path(args.model).name, "sequences": res.sequences,
           "tokens": res.tokens, "prefill_tokens": res.prefill_tokens, "decode_tokens": res.decode_tokens,
           "records": res.records, "seconds": round(res.seconds, 3), "tokens_per_s": round(res.tokens_per_s, 1),
           "interrupted": res.interrupted}
    df = pd.DataFrame([row])
    text = (f"{'interrupted: ' if res.interrupted else ''}wrote {res.path}: {res.sequences} sequences, "
            f"{res.tokens} tokens ({res.prefill_tokens} prefill, {res.decode_tokens} decode), {res.records} "
            f"records in {res.seconds:.2f} s ({res.tokens_per_s:.0f} tokens/s)\n")
    emit(Output(df, document=row, text=text), args.format, None)
    return 130 if res.interrupted else 0
