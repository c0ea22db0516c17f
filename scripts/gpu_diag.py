#!/usr/bin/env python
"""Isolate a crash of live capture on a GPU build: one variant per process, stage markers on stdout.

    python -X faulthandler scripts/gpu_diag.py MODEL VARIANT [NGL]
VARIANT: highlevel (llama_cpp.Llama, no gguf-experts code), plain (TracedLlama trace=False), traced,
nopool (traced, no ggml threadpool attached), nolog (traced, llama.cpp's log not captured).
"""
from __future__ import annotations

import sys

import numpy as np


def main() -> int:
    model, variant = sys.argv[1], sys.argv[2]
    ngl = int(sys.argv[3]) if len(sys.argv) > 3 else 99
    print(f"[{variant} ngl={ngl}] start", flush=True)
    if variant == "highlevel":
        import llama_cpp
        llm = llama_cpp.Llama(model, n_gpu_layers=ngl, n_ctx=256, verbose=False)
        print(f"[{variant}] loaded", flush=True)
        try:
            out = llm("Once upon a time", max_tokens=8, temperature=0.0)
            print(f"[{variant}] generated {out['usage']}", flush=True)
        except RuntimeError as e:  # tiny random models can trip the high-level API; loading is the point
            print(f"[{variant}] generate raised {e}", flush=True)
        return 0
    from gguf_experts.trace.live import capture, ggml_ctypes
    from gguf_experts.trace.live import llama as driver
    if variant == "nopool":
        class NoPool:
            def __init__(self, *a: object) -> None: ...
            def close(self) -> None: ...
        driver.ThreadPool = NoPool  # type: ignore[misc,assignment]  (TracedLlama looks it up there)
    if variant == "nolog":
        ggml_ctypes._LogRing.install = lambda self, lc: None  # type: ignore[method-assign]
    fp = capture.model_fingerprint(model)
    print(f"[{variant}] fingerprint ok", flush=True)
    llm = capture.TracedLlama(model, capture.MemorySink(), fp, n_gpu_layers=ngl, n_ctx=256,
                              trace=variant != "plain")
    print(f"[{variant}] context ok", flush=True)
    print("\n".join(ln for ln in ggml_ctypes._LOG.lines if "offload" in ln or "buffer size" in ln), flush=True)
    toks = llm.tokenize("Once upon a time")
    llm.new_sequence()
    llm.eval(toks)
    print(f"[{variant}] prefill ok", flush=True)
    for _ in range(8):
        llm._decode(np.array([llm.greedy()], dtype=np.int32), np.ones(1, dtype=np.int8), 1)
    print(f"[{variant}] decode ok: {len(llm.sink.records)} records", flush=True)
    llm.close()
    print(f"[{variant}] closed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
