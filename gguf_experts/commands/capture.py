"""gguf-experts capture: run a model in llama.cpp and record its expert routing into trace.bin."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from ..trace.live import prompts
from ..atomic import resolve_target
from ..errors import GGUFExpertsWarning
from ..reporters.tabular import Output, add_output_options, emit
from ._llama_options import add_llama_options, add_progress, progress
from ._types import at_least

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
    p.add_argument("-n", "--n-predict", type=at_least(0), default=None,
                   help="tokens to generate greedily after each prompt (default 32; 0 with --jsonl)")
    add_llama_options(p)
    p.add_argument("--weights", action="store_true",
                   help="also record the gate weights the model applies (after softmax/normalisation/scaling)")
    p.add_argument("--all-outputs", action="store_true",
                   help="request logits for every prompt token, so the last layer routes every token "
                        "(as a perplexity run does); default: only the last, as in generation")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-generation tokens")
    p.add_argument("--mode", choices=("keepalive", "callback"), default=None,
                   help="keepalive (default): the C tracer of `gguf-experts run`, loaded in-process, keeps each "
                        "layer's top-k alive and reads it once per ubatch (no graph splits: capture costs what run "
                        "costs); callback: llama.cpp's eval callback observes each layer (one graph split and "
                        "sync per layer; the default under `gguf-experts run`, which chains it)")
    p.add_argument("-o", "--output", required=True, metavar="TRACE.bin", help="the trace file to write")
    p.add_argument("--paging", default="stock", metavar="MODE",
                   help="stock (default), random, prefetch or auto, as in `run --paging` (docs/paging.md): the "
                        "capture re-runs itself with the C preload's paging (llama.cpp's mmap must be wrapped "
                        "before it loads); the trace is the same in every mode")
    add_output_options(p, output=False, what="the run summary on stdout")
    add_progress(p)


def read_prompts(args: argparse.Namespace) -> list[str]:
    return prompts.read_prompts(args.prompt, args.prompts, args.jsonl)


def run(args: argparse.Namespace) -> int:
    import pandas as pd  # here, not at import: the CLI builds every command's parser at start-up

    from ..trace.live.capture import capture

    rc = _paged(args)
    if rc is not None:
        return rc
    texts = read_prompts(args)
    n_predict = args.n_predict if args.n_predict is not None else (0 if args.jsonl else 32)
    resolve_target(args.output)  # a missing or read-only directory, or a model as -o, fails before the run
    with progress(args, "capture", "tok") as update:
        res = capture(args.model, texts, args.output, n_predict=n_predict, weights=args.weights,
                      n_ctx=args.ctx_size, n_ubatch=args.ubatch_size, n_threads=args.threads,
                      n_gpu_layers=args.n_gpu_layers, ignore_eos=args.ignore_eos,
                      logits="all" if args.all_outputs else "last", progress=update, mode=args.mode)
    row = {"trace": str(res.path), "model": Path(args.model).name, "sequences": res.sequences,
           "tokens": res.tokens, "prefill_tokens": res.prefill_tokens, "decode_tokens": res.decode_tokens,
           "records": res.records, "seconds": round(res.seconds, 3), "tokens_per_s": round(res.tokens_per_s, 1),
           "interrupted": res.interrupted, "stopped_at_eog": res.stopped_at_eog}
    df = pd.DataFrame([row])
    text = (f"{'interrupted: ' if res.interrupted else ''}wrote {res.path}: {res.sequences} sequences, "
            f"{res.tokens} tokens ({res.prefill_tokens} prefill, {res.decode_tokens} decode), {res.records} "
            f"records in {res.seconds:.2f} s ({res.tokens_per_s:.0f} tokens/s)\n")
    if res.stopped_at_eog:
        warnings.warn(GGUFExpertsWarning(
            f"{res.stopped_at_eog} of {res.sequences} sequences stopped at an end-of-generation token before "
            f"-n {n_predict} tokens ({res.decode_tokens} decode tokens in all); pass --ignore-eos to generate "
            "all of them"), stacklevel=1)
    emit(Output(df, document=row, text=text), args.format, None)
    return 130 if res.interrupted else 0


def _paged(args: argparse.Namespace) -> int | None:
    """--paging MODE other than stock: run this same command again under the C preload with only paging on
    (no trace of its own), and return its exit status; None when this process is that child, or stock.
    Why a child: the preload must wrap mmap/posix_madvise before llama.cpp maps the model, and a library
    loaded into a running Python comes after libc in symbol lookup, so only LD_PRELOAD at exec time works."""
    import os
    import sys

    from ..paging import modes as paging
    from ..trace.preload import run as tracer

    paging.check_mode(args.paging)
    if args.paging == "stock":
        return None
    if os.environ.get(paging.ENV_PAGING) in ("random", "prefetch", "stock") and os.environ.get("GGUF_EXPERTS_PAGED"):
        return None  # the child: the preload is already there
    choice = paging.resolve(args.paging, Path(args.model))
    if choice.fallback:
        sys.stderr.write(f"gguf-experts: warning: {choice.reason}\n")
        return None
    sys.stderr.write(f"gguf-experts: paging {choice.mode} ({choice.reason})\n")
    if choice.mode == "stock":
        return None
    env = paging.paging_env(choice)
    env["GGUF_EXPERTS_PAGED"] = "1"
    return tracer.launch([sys.executable, "-m", "gguf_experts", *args._argv], None, env=env).returncode
