"""gguf-experts demo: the bundled trained tiny model's byte map, a live capture of four kinds of prompts, the heat,
and how differently the kinds route compared with a random-weight twin."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..reporters.tabular import Output, add_output_options, emit, frame_records, frame_to_table, human_bytes
from ._llama_options import add_progress, progress
from ._types import at_least

NAME = "demo"
HELP = ("end-to-end demo: trained tiny MoE model -> byte map -> live llama.cpp capture (code, chat, math, story) -> "
        "heat -> routing specialisation vs a random twin")
DESCRIPTION = (HELP + ". The bundled model was trained on Python code and English prose (scripts/train_tiny_moe.py); "
               "its random-weight twin (same shape and tokens) is written on first use into ~/.cache/gguf-experts "
               "(or $XDG_CACHE_HOME, $GGUF_EXPERTS_CACHE); needs the [live] extra (llama-cpp-python).")
ORDER = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..demo.flow import DEFAULT_DIR

    p.add_argument("--dir", default=DEFAULT_DIR,
                   help=f"where the trace, report.html and heatmap.png go (default ./{DEFAULT_DIR}/ in the current "
                        "directory; it is in the project's .gitignore)")
    p.add_argument("--model", default=None, help="use this MoE GGUF instead of the bundled trained tiny model (the "
                   "random-twin baseline needs a qwen3moe model with a GPT-2 BPE tokenizer)")
    p.add_argument("-n", "--n-predict", type=at_least(0), default=16, help="tokens generated per prompt (default 16)")
    p.add_argument("-t", "--threads", type=at_least(1), default=None, help="CPU threads")
    add_output_options(p)
    add_progress(p)


def _specialisation_text(spec: dict, divergence: Any) -> str:
    """What the demo shows: do the prompt kinds use different experts, more than a random router would?"""
    head = ("== specialisation: Jensen-Shannon divergence (bits, 0 = same experts, 1 = disjoint) between the kinds' "
            "expert distributions per layer, mean over kind pairs and over the layers that route every token")
    if "js_random" not in spec:
        return (f"{head}\nthis model {spec.get('js_model')} (no random twin for this model: it is not qwen3moe "
                "with a BPE vocabulary)")
    return (f"{head}\nthis model {spec['js_model']}, its random-weight twin (same shape, same tokens) "
            f"{spec['js_random']}: {spec['ratio']}x the random baseline\n" + frame_to_table(divergence))


def run(args: argparse.Namespace) -> int:
    from ..demo.flow import DEMO_PROMPTS, run_demo
    from ..reporters.heat_text import summary_text

    with progress(args, f"demo: {len(DEMO_PROMPTS)} prompts", "tok") as update:
        res = run_demo(args.dir, model=args.model, n_predict=args.n_predict, threads=args.threads, progress=update)
    kinds = res.kinds

    def text() -> str:
        shown = kinds.assign(bytes_per_token=kinds["bytes_per_token"].map(human_bytes),
                             dense_bytes_per_token=kinds["dense_bytes_per_token"].map(human_bytes))
        parts = [
            f"== model {res.model_path}", res.model_text,
            f"== captured with llama.cpp into {res.trace} (sequences: "
            + ", ".join(f"{i} {k}" for i, k in enumerate(kinds["kind"])) + ")",
            ("== routing per prompt kind (experts_touched: share of (layer, expert) slots used; "
             "hottest_vs_uniform: busiest expert per layer vs a uniform router)"),
            frame_to_table(shown),
            "== heat over all kinds",
            summary_text(res.summary), frame_to_table(res.layers),
            ("(qwen3moe's last layer routes only the rows whose logits are needed: one per prompt, then each "
             "generated token)\n"),
            "hottest experts", frame_to_table(res.hottest),
            _specialisation_text(res.specialisation, res.divergence),
            "== report: " + ", ".join(f"{what} {path}" for what, path in res.report) + " (open it in a browser)",
            f"next: gguf-experts join-trace {res.trace} --model {res.model_path} --by page",
        ]
        return "\n".join(parts) + "\n"

    doc = {"model": str(res.model_path), "dir": str(res.out_dir), "trace": str(res.trace),
           "kinds": frame_records(kinds), "summary": res.summary, "layers": frame_records(res.layers),
           "hottest": frame_records(res.hottest), "report": {what: path for what, path in res.report},
           "specialisation": res.specialisation, "divergence": frame_records(res.divergence)}
    emit(Output(kinds, document=doc, text=text), args.format, args.output)
    if args.output or not sys.stdout.isatty():
        sys.stderr.write(f"demo files in {res.out_dir}/: trace {res.trace.name}, "
                         + ", ".join(f"{what} {Path(path).name}" for what, path in res.report) + "\n")
    return 0
