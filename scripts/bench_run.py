#!/usr/bin/env python
"""`gguf-experts run` overhead: decode tokens/s of an unchanged llama-bench with and without the C tracer
(and with and without its measured I/O per ubatch),
and of the Python recorder (capture) against its own untraced run, all measured in one run.

Model: the benchmark model of scripts/bench_capture.py (24 layers, 32 experts, top-8, n_embd 1024, expert ff
256, Q8_0; generated once into --workdir). llama-bench (scripts/build_llama_tools.sh) runs `-p 0 -n N`; its
reported tg rate excludes start-up and model load. Rounds run the variants in shuffled order so machine
noise hits all alike; medians are reported, with ratios against the plain run of the same harness. The CPU-time
figure (tokens per CPU second of the process, model load cancelled out) is the steadier one on a shared machine.

    python scripts/bench_run.py [--tokens 64] [--rounds 5] [--threads 1] [--top-k 8] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gguf_experts.demo.tinymodel import quantize, write_float_model
from gguf_experts.trace.live.llama import MemorySink, TracedLlama
from gguf_experts.gguf.fingerprint import model_fingerprint
from gguf_experts.trace.preload.run import build_preload, preload_env
from gguf_experts.trace.writer import TraceWriter

ROOT = Path(__file__).resolve().parent.parent


def llama_bin() -> Path:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build_llama_tools.sh")], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench_run: building llama.cpp's tools failed: {out.stderr.strip().splitlines()[-1:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def _bench_once(bench: Path, model: Path, n: int, reps: int, threads: int, env: dict[str, str]) -> tuple[float, float]:
    """One llama-bench process: (its reported decode tokens/s, the CPU seconds the process used)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([str(bench), "-m", str(model), "-p", "0", "-n", str(n), "-t", str(threads), "-r", str(reps),
                        "-o", "json"], capture_output=True, text=True, env=env, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"bench_run: llama-bench failed: {r.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return float(json.loads(r.stdout)[0]["avg_ts"]), cpu


def bench_rate(bench: Path, model: Path, n: int, threads: int, env: dict[str, str]) -> tuple[float, float]:
    """(wall tokens/s as llama-bench reports it, tokens per CPU second). The CPU figure is the difference of
    a 3-repetition and a 1-repetition run, so model load and start-up cancel out; CPU time is what the work
    costs, steady on a shared machine where other processes stretch wall time."""
    wall, cpu1 = _bench_once(bench, model, n, 1, threads, env)
    wall3, cpu3 = _bench_once(bench, model, n, 3, threads, env)
    return (wall + wall3) / 2, 2 * n / max(cpu3 - cpu1, 1e-9)


def python_rate(llm: TracedLlama, n: int) -> tuple[float, float]:
    """Greedy decode of n tokens after a short prompt through TracedLlama (bench_capture.py's measure):
    (tokens per wall second, tokens per CPU second of this process)."""
    llm.new_sequence()
    llm.eval(llm.tokenize("def fibonacci(n):\n    "))
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        llm._decode(np.array([llm.greedy()], dtype=np.int32), np.ones(1, dtype=np.int8), 1)
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def snapshot_us(n: int = 20000) -> float:
    """Microseconds of one IoCounters.snapshot() (the Python recorder takes two per ubatch)."""
    from gguf_experts.trace.iostat import IoCounters

    c = IoCounters()
    t0 = time.perf_counter()
    for _ in range(n):
        c.snapshot()
    c.close()
    return (time.perf_counter() - t0) / n * 1e6


C_SNAPSHOT_MAIN = r"""
#include "ggexp.h"
#include <time.h>
int main(void) {
    struct io_snap s;
    io_snap(&s); /* opens /proc/self/io */
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < 200000; i++) io_snap(&s);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 200000.0);
    return s.read_bytes < 0;
}
"""


def c_snapshot_us(tmp: Path) -> float | None:
    """Microseconds of one io_snap() of the C tracer (preload/ggexp_io.c, compiled here with a timing loop)."""
    from gguf_experts.trace.preload.run import PRELOAD_DIR

    src = tmp / "snap_main.c"
    src.write_text(C_SNAPSHOT_MAIN)
    exe = tmp / "snap"
    r = subprocess.run(["cc", "-O2", "-std=gnu11", f"-I{PRELOAD_DIR}", "-o", str(exe), str(src),
                        str(PRELOAD_DIR / "ggexp_io.c"), "-lpthread"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    return float(out.stdout) / 1000 if out.returncode == 0 else None


def make_model(workdir: Path, layers: int, experts: int, top_k: int, embd: int, ff: int) -> Path:
    big = workdir / f"big-{layers}x{experts}top{top_k}x{embd}x{ff}-q8_0.gguf"
    if not big.exists():
        f16 = write_float_model(workdir / "big-f16.gguf", n_layer=layers, n_expert=experts, n_expert_used=top_k,
                                n_embd=embd, n_head=16, n_head_kv=4, n_ff_exp=ff, f16=True)
        quantize(f16, big, "Q8_0")
        f16.unlink()
    return big


def _print(a: argparse.Namespace, fp: Any, rates: dict[str, list[float]], cpu: dict[str, list[float]],
           c_snap: float | None) -> None:
    """Medians and ratios against the plain run of the same harness (and measured vs unmeasured I/O)."""
    med = {k: statistics.median(v) for k, v in rates.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"model: {fp.n_layer} layers, {fp.n_expert} experts, top-{fp.n_expert_used}, n_embd {a.embd}, Q8_0; "
          f"median of {a.rounds} rounds x {a.tokens} decode tokens, {a.threads} threads")
    overhead: dict[str, float] = {}
    for k in med:
        base = "python plain" if k.startswith("python") else "llama-bench plain"
        overhead[k] = 1 - cmed[k] / cmed[base]
        print(f"  {k:26s} wall {med[k]:7.1f} tok/s (range {min(rates[k]):.1f}-{max(rates[k]):.1f}), ratio "
              f"{med[k] / med[base]:.3f} | CPU time {cmed[k]:7.1f} tok/s, ratio {cmed[k] / cmed[base]:.3f} "
              f"(overhead {100 * overhead[k]:+.1f}%)")
    pairs = [("run (keepalive)", "run (keepalive, no I/O)"), ("python recorder", "python recorder, no I/O")]
    for with_io, without in pairs:
        if with_io in med and without in med:
            print(f"  measured I/O, {with_io}: wall ratio {med[with_io] / med[without]:.3f}, CPU-time ratio "
                  f"{cmed[with_io] / cmed[without]:.3f} (with / without measuring)")
    step_us = 1e6 / med["llama-bench plain"]
    for who, us in (("C tracer", c_snap), ("Python recorder", snapshot_us())):
        if us is not None:
            print(f"  one I/O snapshot ({who}: /proc/self/io pread + getrusage + clock): {us:.2f} us; two per ubatch "
                  f"= {200 * us / step_us:.3f}% of a plain decode step ({step_us / 1000:.1f} ms)")
    if "python recorder" in overhead:
        py_over = overhead["python recorder"]
        for k in ("run (callback)", "run (keepalive)"):
            print(f"  {k}: CPU overhead {100 * overhead[k]:+.1f}% vs the Python recorder's {100 * py_over:+.1f}%")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--embd", type=int, default=1024)
    ap.add_argument("--ff", type=int, default=256)
    ap.add_argument("--skip-python", action="store_true", help="only llama-bench (no Python recorder)")
    ap.add_argument("--workdir", default=None, help="keep the generated model here (default: a temp dir)")
    a = ap.parse_args(argv)
    bench = llama_bin() / "llama-bench"
    lib = build_preload()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(a.workdir or td)
        tmp.mkdir(parents=True, exist_ok=True)
        model = make_model(tmp, a.layers, a.experts, a.top_k, a.embd, a.ff)
        c_snap = c_snapshot_us(tmp)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("GGUF_EXPERTS_")}
        variants = {
            "llama-bench plain": base_env,
            "run (callback)": preload_env(lib, tmp / "run-cb.bin", False, "callback", base_env),
            "run (keepalive)": preload_env(lib, tmp / "run-ka.bin", False, "keepalive", base_env),
            "run --weights (callback)": preload_env(lib, tmp / "run-w.bin", True, "callback", base_env),
            # measured I/O (one /proc/self/io pread + getrusage + clock_gettime before and after each ubatch): off
            "run (keepalive, no I/O)": {**preload_env(lib, tmp / "run-ka0.bin", False, "keepalive", base_env),
                                        "GGUF_EXPERTS_MEASURE": "0"},
        }
        rates: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        fp = model_fingerprint(model)
        py: dict[str, TracedLlama] = {}
        if not a.skip_python:
            py = {"python plain": TracedLlama(model, MemorySink(), fp, n_ctx=512, n_threads=a.threads, trace=False),
                  "python recorder": TracedLlama(model, TraceWriter(tmp / "py.bin", fp), fp, n_ctx=512,
                                                 n_threads=a.threads),
                  "python recorder, no I/O": TracedLlama(model, TraceWriter(tmp / "py0.bin", fp), fp, n_ctx=512,
                                                         n_threads=a.threads, measure=False)}
            for k, llm in py.items():
                rates[k], cpu[k] = [], []
                python_rate(llm, 8)  # page in the weights
        _bench_once(bench, model, 8, 1, a.threads, base_env)  # warm the page cache
        order = random.Random(0)
        for _ in range(a.rounds):
            names = list(variants)
            order.shuffle(names)  # no variant always first or last in a round (page cache, turbo, neighbours)
            for k in names:
                env = variants[k]
                w, c = bench_rate(bench, model, a.tokens, a.threads, env)
                rates[k].append(w)
                cpu[k].append(c)
            for k, llm in py.items():
                w, c = python_rate(llm, a.tokens)
                rates[k].append(w)
                cpu[k].append(c)
        for llm in py.values():
            llm.close()
            if hasattr(llm.sink, "close"):
                llm.sink.close()
    _print(a, fp, rates, cpu, c_snap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
