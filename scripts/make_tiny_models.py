#!/usr/bin/env python
"""Write the project's tiny runnable MoE models into a directory: every architecture x quantization.

F32 files come from gguf-py's GGUFWriter; the others from llama.cpp's own llama_model_quantize (needs the
[live] extra). Deterministic from --seed, so the files can be regenerated instead of stored.

    python scripts/make_tiny_models.py OUT_DIR [--seed 0] [--arch qwen3moe gpt-oss] [--quant F32 Q8_0 ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gguf_experts.errors import GGUFExpertsError
from gguf_experts.demo.tinymodel import ARCHES, QUANT_FTYPES, make_tiny_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", nargs="+", choices=ARCHES, default=list(ARCHES))
    ap.add_argument("--quant", nargs="+", choices=tuple(QUANT_FTYPES), default=["F32", "Q8_0", "Q4_K_M", "MXFP4_MOE"])
    a = ap.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for arch in a.arch:
        for q in a.quant:
            t0 = time.perf_counter()
            try:
                p = make_tiny_model(out / f"tiny-{arch}-{q.lower()}-s{a.seed}.gguf", arch=arch, seed=a.seed,
                                    quant=None if q == "F32" else q)
            except GGUFExpertsError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            print(f"{p}  {p.stat().st_size:>9} bytes  {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
