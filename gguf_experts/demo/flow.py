"""The demo, end to end and real: make (or load) the tiny model, capture prompts of four kinds with
llama.cpp, join each trace with the model's byte map. Returns data; the ``demo`` command prints it."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

#: (kind, prompt): short prompts of different kinds, so their routing can be compared
DEMO_PROMPTS: tuple[tuple[str, str], ...] = (
    ("code", "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"),
    ("chat", "User: Hi! Can you recommend a good book for a long train ride?\nAssistant:"),
    ("math", "Q: If 3x + 7 = 22, what is x?\nA: 3x = 15, so x = 5.\nQ: What is 12 * 13?\nA:"),
    ("story", "Once upon a time, in a village at the edge of a dark forest, there lived a curious girl named Mira."),
)
DEFAULT_DIR = "gguf-experts-demo"


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
    from .tinymodel import demo_model_path
    from ..trace.live.capture import capture
    from ..trace.reader import read_trace

    path = Path(model) if model is not None else demo_model_path()
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
    return DemoResult(model_path=path, out_dir=out, model_text=model_table(m), kinds=pd.DataFrame(rows),
                      trace=tpath, summary=everything.summary, layers=everything.layers,
                      hottest=hot.reset_index(drop=True), report=report)
