#!/usr/bin/env python
"""Capture overhead: decode tokens/s with and without the recorder, measured in the same run.

Models: the tiny demo-sized qwen3moe (4 layers, 16 experts, n_embd 64) and a bigger generated one
(default 24 layers, 32 experts, top-8, n_embd 1024, expert ff 256, Q8_0 by llama.cpp's quantizer:
~680 MiB, generated in ~20 s). Default 1 thread: on a shared machine extra threads measure contention.
Rounds alternate plain / recorder / recorder+weights so machine noise hits all alike; medians are reported.

    python scripts/bench_capture.py [--tokens 64] [--rounds 5] [--threads 1] [--big-layers 24] [--skip-big]
        [--n-gpu-layers 99]   # all layers on the GPU (a CUDA build of llama-cpp-python)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gguf_experts.demo.tinymodel import make_tiny_model, quantize, write_float_model
from gguf_experts.trace.live.llama import MemorySink, TracedLlama
from gguf_experts.gguf.fingerprint import model_fingerprint
from gguf_experts.trace.writer import TraceWriter

PROMPT = "def fibonacci(n):\n    "


def decode_rate(llm: TracedLlama, n_tokens: int) -> tuple[float, float]:
    """Greedy-decode n_tokens after a short prompt: (tokens per wall second, tokens per CPU second).

    CPU time (process_time, all threads) is the steadier figure on a shared machine: other processes
    stretch wall time but not the work this process does.
    """
    toks = llm.tokenize(PROMPT)
    llm.new_sequence()
    llm.eval(toks)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_tokens):
        t = llm.greedy()
        llm._decode(np.array([t], dtype=np.int32), np.ones(1, dtype=np.int8), 1)
    return n_tokens / (time.perf_counter() - t0), n_tokens / max(time.process_time() - c0, 1e-9)


def bench(path: Path, label: str, n_tokens: int, rounds: int, threads: int, tmp: Path,
          n_gpu_layers: int = 0) -> dict[str, float]:
    fp = model_fingerprint(path)
    ngl = n_gpu_layers
    variants = {
        "plain": lambda: TracedLlama(path, MemorySink(), fp, n_ctx=512, n_threads=threads, trace=False,
                                     n_gpu_layers=ngl),
        "recorder": lambda: TracedLlama(path, TraceWriter(tmp / f"{label}.bin", fp), fp, n_ctx=512,
                                        n_threads=threads, n_gpu_layers=ngl),
        "recorder+weights": lambda: TracedLlama(path, TraceWriter(tmp / f"{label}-w.bin", fp), fp, n_ctx=512,
                                                n_threads=threads, weights=True, n_gpu_layers=ngl),
    }
    llms = {k: make() for k, make in variants.items()}
    rates: dict[str, list[float]] = {k: [] for k in llms}
    cpu: dict[str, list[float]] = {k: [] for k in llms}
    for llm in llms.values():  # warm caches / page in the weights once
        decode_rate(llm, max(4, n_tokens // 8))
    for _ in range(rounds):
        for k, llm in llms.items():
            w, c = decode_rate(llm, n_tokens)
            rates[k].append(w)
            cpu[k].append(c)
    calls = llms["recorder"].collector.decisions
    for llm in llms.values():
        llm.close()
        if hasattr(llm.sink, "close"):
            llm.sink.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    best = {k: max(v) for k, v in rates.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    base = med["plain"]
    print(f"{label}: {fp.n_layer} layers, {fp.n_expert} experts, top-{fp.n_expert_used}; "
          f"{len(calls)} distinct node names; median of {rounds} rounds x {n_tokens} decode tokens, "
          f"{threads} threads, {ngl} layers offloaded (-ngl)")
    for k, v in med.items():
        spread = f"{min(rates[k]):.1f}-{max(rates[k]):.1f}"
        print(f"  {k:17s} wall: median {v:8.1f} tok/s (range {spread}), ratio {v / base:.3f}, best-of ratio "
              f"{best[k] / best['plain']:.3f} | CPU time: {cmed[k]:8.1f} tok/s, ratio {cmed[k] / cmed['plain']:.3f}"
              f" (overhead {100 * (1 - cmed[k] / cmed['plain']):+.1f}%)")
    return med


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--big-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--big-layers", type=int, default=24)
    ap.add_argument("--big-experts", type=int, default=32)
    ap.add_argument("--big-embd", type=int, default=1024)
    ap.add_argument("--big-ff", type=int, default=256)
    ap.add_argument("--big-top-k", type=int, default=8)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--n-gpu-layers", "-ngl", type=int, default=0, help="layers to offload to a GPU (default 0)")
    ap.add_argument("--workdir", default=None, help="keep generated models here (default: a temp dir)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(a.workdir or td)
        tmp.mkdir(parents=True, exist_ok=True)
        tiny = make_tiny_model(tmp / "tiny.gguf")
        bench(tiny, "tiny qwen3moe F32", a.tokens, a.rounds, a.threads, tmp, a.n_gpu_layers)
        if not a.skip_big:
            big = tmp / f"big-{a.big_layers}x{a.big_experts}top{a.big_top_k}x{a.big_embd}x{a.big_ff}-q8_0.gguf"
            if not big.exists():
                t0 = time.perf_counter()
                f16 = write_float_model(tmp / "big-f16.gguf", n_layer=a.big_layers, n_expert=a.big_experts,
                                        n_expert_used=a.big_top_k, n_embd=a.big_embd, n_head=16, n_head_kv=4,
                                        n_ff_exp=a.big_ff, f16=True)
                quantize(f16, big, "Q8_0")
                f16.unlink()
                print(f"(generated {big.name}, {big.stat().st_size / 2**20:.0f} MiB, in "
                      f"{time.perf_counter() - t0:.1f} s)")
            bench(big, "big qwen3moe Q8_0", a.big_tokens, a.rounds, a.threads, tmp, a.n_gpu_layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
