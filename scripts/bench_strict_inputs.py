#!/usr/bin/env python3
"""Benchmark: what the strict readers of issue 8 cost, against the plain reads they replaced, in one run.

- check-overlaps' byte-map loader (``check.load_ranges``: UTF-8 and binary check, field count per line,
  aliasing columns, typed values) on a DeepSeek-V3-shaped ``dump --split-experts`` CSV, against the plain
  ``pandas.read_csv`` + numeric conversion it used before;
- ``convert``'s CSV expert-log reader (``csvlog.read_csv_log``, with its streaming pre-scan, 32-bit and
  repeated-expert checks) against the same pandas integer read without them.
Prints median milliseconds of --repeat runs and the ratio strict / plain.

    .venv/bin/python scripts/bench_strict_inputs.py [--repeat 7] [--log-rows 1000000]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # fixtures: realistic shapes
from shapes import SHAPES  # noqa: E402

from gguf_experts.gguf.check import load_ranges  # noqa: E402
from gguf_experts.cli import main  # noqa: E402
from gguf_experts.gguf.fingerprint import ModelFingerprint  # noqa: E402
from gguf_experts.formats.csvlog import plain_header, read_csv_log  # noqa: E402


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def plain_map(path: Path) -> pd.DataFrame:
    """The loader before issue 8: pandas' inference, then numbers."""
    df = pd.read_csv(path, skipinitialspace=True)
    for c in ("offset", "size"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.int64)
    return df


def plain_log(path: Path, k: int) -> int:
    names = ["pos", "layer"] + [f"expert_{i}" for i in range(k)]
    n = 0
    for df in pd.read_csv(path, header=None, names=names, skiprows=1, dtype=np.int64, engine="c",
                          chunksize=1 << 20):
        n += len(df)
    return n


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--log-rows", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        shard = SHAPES["deepseek-v3"]().write(Path(d))
        csv_map = Path(d) / "map.csv"
        assert main(["dump", str(shard), "--split-experts", "-o", str(csv_map)]) == 0
        rows = sum(1 for _ in open(csv_map)) - 1
        strict = median_ms(lambda: load_ranges(csv_map), args.repeat)
        plain = median_ms(lambda: plain_map(csv_map), args.repeat)
        print(f"byte map CSV ({rows} rows): strict {strict:.1f} ms, plain pandas {plain:.1f} ms, "
              f"ratio {strict / plain:.2f}")

        k, n_layer, n_expert = 8, 48, 128
        rng = np.random.default_rng(0)
        n = args.log_rows
        experts = np.argsort(rng.random((n, n_expert)), axis=1)[:, :k]
        log = Path(d) / "log.csv"
        with open(log, "w") as fh:
            fh.write(plain_header(k))
            pd.DataFrame(np.column_stack([np.arange(n) // n_layer, np.arange(n) % n_layer, experts])).to_csv(
                fh, header=False, index=False)
        fp = ModelFingerprint("qwen3moe", n_layer, n_expert, k, "t" * 32, "q" * 32)
        strict = median_ms(lambda: sum(len(c["pos"]) for c in read_csv_log(log, fp)), max(1, args.repeat // 2))
        plain = median_ms(lambda: plain_log(log, k), max(1, args.repeat // 2))
        print(f"expert log CSV ({n} rows, {log.stat().st_size / 1e6:.0f} MB): strict {strict:.0f} ms, "
              f"plain pandas {plain:.0f} ms, ratio {strict / plain:.2f}")


if __name__ == "__main__":
    main_()
