#!/usr/bin/env python
"""Host work per ubatch of `capture`'s keep-alive recorder, step by step (issue 21: capture's prefill on a GPU).

On a GPU the device computes a prefill ubatch in milliseconds; whatever the host does synchronously between two
ubatches (records, reads, Python) is added to that. This builds the C tracer with -DGGEXP_HOSTPROF (each step timed
with clock_gettime, no other change), records prefills of --prompt-tokens tokens in --ubatch ubatches plus --decode
decode tokens through `capture`'s Recorder, and prints each step's mean host time per call; it also times the Python
side of one ubatch (TracedLlama._decode without the llama_decode call) and the measurement reads. Any MoE GGUF runs
(the CPU is fine: the steps are host work); a Qwen3-30B-A3B-shaped layout (48 layers, top-8) gives the real records'
size at any width, e.g. `scripts/make_big_model.py m.gguf --embd 64 --ff 32 --heads 4 --heads-kv 2 --head-dim 16`.

    python scripts/bench_host_ubatch.py MODEL [--rounds 20] [--prompt-tokens 790] [--ubatch 512] [--decode 8]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gguf_experts.trace.preload.run import CFLAGS, ENV_PRELOAD, PRELOAD_DIR, preload_sources

STEPS = ("reset: defer (copy kept shapes)", "flush now (not deferred)", "deferred: wait + take (copy)",
         "resolve sequences", "deferred: emit (CRC, write)", "prepare (rows, io snapshot)", "issue copies",
         "alloc: flag graph",
         "(llama.cpp's own: reset to compute)")


def build(out: Path) -> Path:
    lib = out / "libggexp_prof.so"
    subprocess.run(["cc", *CFLAGS, "-DGGEXP_HOSTPROF", *map(str, preload_sources()), "-ldl", "-lpthread", "-o",
                    str(lib)], check=True, cwd=PRELOAD_DIR)
    return lib


def per_call_us(fn: object, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - t0) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=790)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--weights", action="store_true")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    os.environ[ENV_PRELOAD] = str(build(tmp))
    from gguf_experts.trace.live.capture import Recorder

    rng = np.random.default_rng(0)
    prompt = [1] + [int(x) for x in rng.integers(3, 259, a.prompt_tokens - 1)]
    rec = Recorder(tmp / "t.bin", weights=a.weights, mode="keepalive")
    llm = rec.llama(a.model, n_ctx=a.prompt_tokens + a.decode + 16, n_ubatch=a.ubatch, n_threads=2)
    lib = rec._native.lib
    ns, cnt = (ctypes.c_int64 * 10)(), (ctypes.c_int64 * 10)()
    llm.generate(prompt[:64], 2)
    lib.ggexp_inproc_hostprof(ns, cnt)  # warm-up not counted
    t0 = time.perf_counter()
    for _ in range(a.rounds):
        llm.generate(prompt, a.decode, ignore_eos=True)
    wall = time.perf_counter() - t0
    lib.ggexp_inproc_hostprof(ns, cnt)
    ubatches = a.rounds * (-(-a.prompt_tokens // a.ubatch) + a.decode)
    prefills = a.rounds * -(-a.prompt_tokens // a.ubatch)
    print(f"{Path(a.model).name}: {a.rounds} rounds of a {a.prompt_tokens}-token prefill (ubatch {a.ubatch}) + "
          f"{a.decode} decode tokens, weights={a.weights}: {ubatches} ubatches ({prefills} prefill), {wall:.2f} s")
    print(f"  {'step':36s} {'calls':>7s} {'us/call':>9s} {'us/prefill ubatch':>18s}")
    for i, name in enumerate(STEPS):
        if cnt[i]:
            print(f"  {name:36s} {cnt[i]:7d} {ns[i] / cnt[i] / 1e3:9.1f} {ns[i] / prefills / 1e3:18.1f}")
    # the Python side of one ubatch, without llama_decode: what _decode does around it
    native = llm.native
    chunk = np.asarray(prompt[:a.ubatch], dtype=np.int32)
    out = np.zeros(len(chunk), dtype=np.int8)

    def py_side() -> None:
        n = len(chunk)
        pos = np.arange(0, n, dtype=np.int32)
        llm._tok[:n] = chunk
        llm._pos[:n] = pos
        llm._logits[:n] = out
        llm._batch.n_tokens = n
        llm.collector.reset((n, int(out.sum())))
        native.phase(0)

    fd = os.open("/proc/self/io", os.O_RDONLY)
    print(f"  python per ubatch (_decode around llama_decode): {per_call_us(py_side, 2000):.1f} us; "
          f"ctypes phase call {per_call_us(lambda: native.phase(-1), 20000):.2f} us; records() "
          f"{per_call_us(native.records, 20000):.2f} us")
    print(f"  for scale: pread /proc/self/io {per_call_us(lambda: os.pread(fd, 512, 0), 5000):.1f} us, getrusage "
          f"{per_call_us(lambda: resource.getrusage(resource.RUSAGE_SELF), 20000):.2f} us (the C tracer does "
          "each twice per ubatch)")
    os.close(fd)
    native.phase(-1)
    rec.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
