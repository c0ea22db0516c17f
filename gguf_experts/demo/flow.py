"""The demo, end to end and real: load the bundled trained tiny model (or another), capture prompts of four kinds
with llama.cpp, join each trace with the model's byte map, and measure how differently the kinds route against a
random-weight twin of the same shape and tokens. Returns data; the ``demo`` command prints it."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

#: (kind, prompt): prompts of different kinds (about 100 tokens each, so that sampling noise stays small next to
#: real differences in routing), so their routing can be compared
DEMO_PROMPTS: tuple[tuple[str, str], ...] = (
    ("code", 'import os\n\n\ndef read_config(path):\n    """Read a key = value file into a dict."""\n'
             "    config = {}\n    with open(path) as f:\n        for line in f:\n            line = line.strip()\n"
             '            if not line or line.startswith("#"):\n                continue\n'
             '            key, _, value = line.partition("=")\n            config[key.strip()] = value.strip()\n'
             "    return config\n\n\ndef fibonacci(n):\n    if n < 2:\n        return n\n"
             "    return fibonacci(n - 1) + fibonacci(n - 2)\n"),
    ("chat", "User: Hi! Can you recommend a good book for a long train ride? I like mysteries, and the trip takes "
             "about six hours.\nAssistant: Of course! A classic choice is a detective novel with a clever puzzle. "
             "Would you like something old or something new?\nUser: Something new, please, and not too long.\n"
             "Assistant:"),
    ("math", "Q: If 3x + 7 = 22, what is x?\nA: 3x = 15, so x = 5.\nQ: What is 12 * 13?\nA: 12 * 13 = 156.\n"
             "Q: A train travels 180 km in 2 hours. What is its average speed?\nA: 180 / 2 = 90 km per hour.\n"
             "Q: What is the sum of the angles of a triangle?\nA: 180 degrees.\nQ: What is 15% of 240?\nA:"),
    ("story", "Once upon a time, in a village at the edge of a dark forest, there lived a curious girl named Mira. "
              "Every morning she walked to the river to fetch water, and every morning the old miller waved to "
              "her from his door. One day the miller was not there. The door stood open, the wheel was still, "
              "and a trail of small footprints led into the trees. Mira put down her bucket and followed them."),
)
DEFAULT_DIR = "gguf-experts-demo"
#: the bundled model: trained by scripts/train_tiny_moe.py on Python code and English prose (README "Demo model")
TRAINED_MODEL = Path(__file__).resolve().parent / "data" / "tiny-moe-trained.gguf"


@dataclass
class DemoResult:
    model_path: Path
    out_dir: Path
    model_text: str  # the byte map summary for people
    kinds: pd.DataFrame  # one row per prompt kind
    trace: Path  # one trace, sequence i = DEMO_PROMPTS[i]
    summary: dict[str, Any]  # join summary over all kinds
    layers: pd.DataFrame  # join per layer over all kinds
    hottest: pd.DataFrame = field(default_factory=pd.DataFrame)  # hottest (layer, expert) over all kinds
    report: list[tuple[str, str]] = field(default_factory=list)  # [(what, path)]: report.html (+ heatmap.png)
    #: per layer: tokens, full, js_model (mean pairwise JSD between kinds), js_random (the random twin's)
    divergence: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: js_model, js_random (means over full layers), ratio, random_model; empty when no twin could be made
    specialisation: dict[str, Any] = field(default_factory=dict)


def _kind_row(kind: str, res: Any, n_expert: int) -> dict[str, Any]:
    e = res.experts
    per_layer = e.groupby("layer")["activations"]
    touched = float((e["activations"] > 0).mean())
    hottest = float((per_layer.max() / per_layer.sum().clip(lower=1)).mean() * n_expert)
    s = res.summary
    return {"kind": kind, "tokens": s["tokens"], "prefill": s["prefill_tokens"], "decode": s["decode_tokens"],
            "experts_touched": round(touched, 3), "hottest_vs_uniform": round(hottest, 2),
            "bytes_per_token": s["bytes_per_token"], "dense_bytes_per_token": s["dense_bytes_per_token"]}


def run_demo(out_dir: str | os.PathLike[str] = DEFAULT_DIR, model: str | os.PathLike[str] | None = None,
             n_predict: int = 16, weights: bool = True, threads: int | None = None,
             progress: Callable[[int], None] | None = None) -> DemoResult:
    """Capture the demo prompts (sequence i = kind i) into out_dir/demo.bin and join it with the model,
    per kind and over all."""
    from ..gguf.reader import open_model
    from ..heat import join
    from ..reporters.model_table import model_table
    from ..trace.live.capture import capture
    from ..trace.reader import read_trace

    path = Path(model) if model is not None else TRAINED_MODEL
    m = open_model(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tpath = out / "demo.bin"
    capture(path, [p for _, p in DEMO_PROMPTS], tpath, n_predict=n_predict, weights=weights, n_ctx=512,
            n_threads=threads, ignore_eos=True, progress=progress,
            meta={"demo_kinds": [k for k, _ in DEMO_PROMPTS]})
    tr = read_trace(tpath)
    rows = [_kind_row(kind, join(tr.select(tr.seq == i), m), m.expert_count)
            for i, (kind, _) in enumerate(DEMO_PROMPTS)]
    everything = join(tpath, m)
    hot = everything.experts.sort_values("activations", ascending=False, kind="stable").head(8)
    from ..report import demo_report

    report = demo_report(out, tpath, m, [k for k, _ in DEMO_PROMPTS])
    divergence, spec = specialisation(path, tr, m.expert_count, out, n_predict=n_predict, threads=threads,
                                      progress=progress)
    return DemoResult(model_path=path, out_dir=out, model_text=model_table(m), kinds=pd.DataFrame(rows),
                      trace=tpath, summary=everything.summary, layers=everything.layers,
                      hottest=hot.reset_index(drop=True), report=report, divergence=divergence,
                      specialisation=spec)


def specialisation(path: Path, tr: Any, n_expert: int, out: Path, n_predict: int = 16, threads: int | None = None,
                   progress: Callable[[int], None] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The kinds' routing divergence on ``path`` (trace ``tr``) and on its random twin (the same prompts captured
    into out/random-twin.bin); the twin needs a qwen3moe model with a GPT-2 BPE tokenizer, else only the model's
    divergence is returned."""
    from ..errors import InputError
    from ..trace.live.capture import capture
    from ..trace.reader import read_trace
    from .specialise import kind_divergence
    from .tinymodel import random_twin

    n = len(DEMO_PROMPTS)
    mine = kind_divergence(tr, n, n_expert)
    frame = mine.layers.rename(columns={"js_divergence": "js_model"})
    try:
        twin = random_twin(path)
    except InputError:
        return frame, {"js_model": round(mine.mean, 4)}
    tpath = out / "random-twin.bin"
    capture(twin, [p for _, p in DEMO_PROMPTS], tpath, n_predict=n_predict, weights=False, n_ctx=512,
            n_threads=threads, ignore_eos=True, progress=progress, meta={"demo_kinds": [k for k, _ in DEMO_PROMPTS]})
    base = kind_divergence(read_trace(tpath), n, n_expert)
    frame["js_random"] = base.layers["js_divergence"].to_numpy()
    ratio = mine.mean / base.mean if base.mean > 0 else float("inf")
    return frame, {"js_model": round(mine.mean, 4), "js_random": round(base.mean, 4), "ratio": round(ratio, 2),
                   "random_model": str(twin), "random_trace": str(tpath)}
