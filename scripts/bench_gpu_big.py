#!/usr/bin/env python
"""Recording overhead at real model size: prefill and decode tokens/s, plain vs recorder, in one process.

Variants (each its own TracedLlama on the same model, rounds alternating so that clock and load changes
hit all alike; medians reported):
- plain: no eval callback (what llama.cpp runs untraced);
- python: the callback recorder (`capture --mode callback`), ids only; python-weights: ids and applied gate weights;
- capture / capture-weights: `capture`'s default, the C keep-alive tracer loaded in-process (one per process: pair
  each with plain, `--variants plain,capture`); only its own context is traced, plain runs untouched.
`--variants plain` alone is the harness for the C recorder: run it under `gguf-experts run` (the preload
hooks this process) and compare with a plain process of the same call.
`--n-cpu-moe N` keeps the expert tensors of the first N layers in host memory (llama.cpp's --n-cpu-moe:
the same tensor buffer-type overrides common/arg.cpp builds), the usual setup for models larger than the GPU.

    python scripts/bench_gpu_big.py MODEL [--ngl 99] [--n-cpu-moe 0] [--variants plain,python,python-weights]
        [--prompt-tokens 790] [--decode 32] [--rounds 5] [--json OUT.json] [--label NAME]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gguf_experts.trace.live.capture import Recorder
from gguf_experts.trace.live.llama import MemorySink, TracedLlama
from gguf_experts.gguf.fingerprint import model_fingerprint
from gguf_experts.trace.live.ggml_ctypes import load_llama_cpp
from gguf_experts.trace.writer import TraceWriter

_KEEP: list[Any] = []  # ctypes objects llama.cpp holds pointers to


def cpu_moe_overrides(n_layers: int) -> None:
    """Make every model loaded from now on keep the experts of layers 0..n_layers-1 in host memory."""
    lc = load_llama_cpp()

    class Override(ctypes.Structure):
        _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

    libdir = Path(lc.__file__).parent / "lib"
    cpu = ctypes.CDLL(str(sorted(libdir.glob("libggml-cpu.*"))[0]))
    cpu.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    buft = cpu.ggml_backend_cpu_buffer_type()
    arr = (Override * (n_layers + 1))()
    pats = [f"blk\\.{i}\\.ffn_(up|down|gate|gate_up)_(ch|)exps".encode() for i in range(n_layers)]
    for i, p in enumerate(pats):
        arr[i].pattern, arr[i].buft = p, buft
    _KEEP.extend([arr, pats, cpu])
    default = lc.llama_model_default_params

    def params() -> Any:
        mp = default()
        mp.tensor_buft_overrides = ctypes.cast(arr, ctypes.c_void_p)
        return mp
    lc.llama_model_default_params = params


def rates(llm: TracedLlama, prompt: list[int], n_decode: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one fresh sequence."""
    llm.new_sequence()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        t = llm.greedy()
        llm._decode(np.array([t], dtype=np.int32), np.ones(1, dtype=np.int8), 1)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--ngl", type=int, default=99)
    ap.add_argument("--n-cpu-moe", type=int, default=0)
    ap.add_argument("--variants", default="plain,python,python-weights")
    ap.add_argument("--prompt-tokens", type=int, default=790)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--json", default=None, help="append the medians as one JSON line to this file")
    ap.add_argument("--label", default="")
    a = ap.parse_args(argv)
    if a.n_cpu_moe:
        cpu_moe_overrides(a.n_cpu_moe)
    fp = model_fingerprint(a.model)
    tmp = Path(tempfile.mkdtemp())
    n_ctx = a.prompt_tokens + a.decode + 16
    make = {
        "plain": lambda: TracedLlama(a.model, MemorySink(), fp, n_ctx=n_ctx, n_threads=a.threads, trace=False,
                                     n_gpu_layers=a.ngl),
        "python": lambda: TracedLlama(a.model, TraceWriter(tmp / "p.bin", fp), fp, n_ctx=n_ctx,
                                      n_threads=a.threads, n_gpu_layers=a.ngl),
        "python-weights": lambda: TracedLlama(a.model, TraceWriter(tmp / "w.bin", fp), fp, n_ctx=n_ctx,
                                              n_threads=a.threads, weights=True, n_gpu_layers=a.ngl),
    }
    recs: list[Recorder] = []

    def native(weights: bool) -> TracedLlama:
        rec = Recorder(tmp / f"c{int(weights)}.bin", weights=weights, mode="keepalive")
        recs.append(rec)
        return rec.llama(a.model, n_ctx=n_ctx, n_threads=a.threads, n_gpu_layers=a.ngl)
    make["capture"] = lambda: native(False)
    make["capture-weights"] = lambda: native(True)
    names = [v for v in a.variants.split(",") if v]
    llms = {k: make[k]() for k in names}
    rng = np.random.default_rng(0)
    prompt = [1] + [int(x) for x in rng.integers(3, 259, a.prompt_tokens - 1)]
    pre: dict[str, list[float]] = {k: [] for k in llms}
    dec: dict[str, list[float]] = {k: [] for k in llms}
    for llm in llms.values():  # warm-up: first-use allocations, CUDA graph capture
        rates(llm, prompt[:64], 4)
    for _ in range(a.rounds):
        for k, llm in llms.items():
            p, d = rates(llm, prompt, a.decode)
            pre[k].append(p)
            dec[k].append(d)
    for llm in llms.values():
        llm.close()
        if llm.native is None and hasattr(llm.sink, "close"):
            llm.sink.close()
    for rec in recs:
        rec.close()
    res = {k: {"prefill": statistics.median(pre[k]), "decode": statistics.median(dec[k])} for k in llms}
    base = res.get("plain")
    print(f"{a.label or Path(a.model).name}: -ngl {a.ngl}, --n-cpu-moe {a.n_cpu_moe}, {a.prompt_tokens}-token prompt "
          f"+ {a.decode} decode tokens, medians of {a.rounds} rounds")
    for k, r in res.items():
        ratio = (f" | ratio prefill {r['prefill'] / base['prefill']:.3f}, decode {r['decode'] / base['decode']:.3f}"
                 if base else "")
        print(f"  {k:15s} prefill {r['prefill']:9.1f} tok/s  decode {r['decode']:7.1f} tok/s{ratio}")
    if a.json:
        with open(a.json, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"label": a.label, "ngl": a.ngl, "n_cpu_moe": a.n_cpu_moe, "results": res}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
