#!/usr/bin/env python3
"""Forecast of the paging-facts experiment's shape without the 29.6 GiB model: the Qwen3-30B-A3B Q8_0 layout in
memory (bench_forecast.layout_30b), requests of --prompt tokens (one ubatch) then --gen decode tokens, routing
drawn from a hot set of --hot experts per layer (--flat: uniform inside it, else Zipf 0.7). Prints, per page-cache
size and mode, the load pass's bytes and per request: bytes read, major faults, decode GB and I/O s per token.

    python scripts/forecast_synthetic.py [--cache-gib 5,7,9,11] [--modes stock,random,prefetch] [--hot 40] [--flat]

Used in docs/forecast.md to compare with /work/shared/reference/paging-facts.md (stock at ~9.2 GiB: 121-122 GB
and ~12,900 major faults per request, load 62 GB).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_forecast import layout_30b  # noqa: E402

from gguf_experts.gguf.fingerprint import ModelFingerprint  # noqa: E402
from gguf_experts.paging.disk import DiskModel  # noqa: E402
from gguf_experts.paging.forecast import simulate  # noqa: E402
from gguf_experts.paging.model import PAGE  # noqa: E402
from gguf_experts.trace.format import TraceData, TraceHeader  # noqa: E402


def requests_trace(L: int, E: int, k: int, hot: int, flat: bool, n_req: int, prompt: int, gen: int,
                   seed: int = 0) -> TraceData:
    rng = np.random.default_rng(seed)
    hotsets = np.stack([rng.permutation(E)[:hot] for _ in range(L)])
    w = np.ones(hot) if flat else 1.0 / np.arange(1, hot + 1) ** 0.7
    ubs = [(req, ph, p0, n) for req in range(n_req) for ph, p0, n in [(0, 0, prompt)] + [(1, prompt + i, 1)
                                                                                          for i in range(gen)]]
    seq = np.concatenate([np.full(n * L, r, np.int32) for r, _, _, n in ubs])
    phase = np.concatenate([np.full(n * L, ph, np.uint8) for _, ph, _, n in ubs])
    layer = np.concatenate([np.repeat(np.arange(L), n) for _, _, _, n in ubs]).astype(np.int32)
    pos = np.concatenate([np.tile(np.arange(p0, p0 + n), L) for _, _, p0, n in ubs]).astype(np.int32)
    keys = np.log(w / w.sum())[None, :] - np.log(-np.log(rng.random((len(layer), hot))))  # Gumbel top-k
    pick = np.argsort(-keys, axis=1)[:, :k]
    experts = hotsets[layer[:, None], pick].astype(np.int32)
    fp = ModelFingerprint("qwen3moe", L, E, k, "", "")
    return TraceData(seq=seq, phase=phase, pos=pos, token=(3 + pos % 250).astype(np.int32), layer=layer,
                     experts=experts, weights=None, header=TraceHeader(2, fp, {}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-gib", default="5,7,9,11")
    ap.add_argument("--modes", default="stock,random,prefetch")
    ap.add_argument("--hot", type=int, default=40)
    ap.add_argument("--flat", action="store_true")
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=120)
    ap.add_argument("--gen", type=int, default=8)
    a = ap.parse_args()
    L, E, k = 48, 128, 8
    lay = layout_30b(L, E)
    tr = requests_trace(L, E, k, a.hot, a.flat, a.requests, a.prompt, a.gen)
    disk = DiskModel(1900, 19300, "facts")
    for gib in (float(x) for x in a.cache_gib.split(",")):
        for mode in a.modes.split(","):
            r = simulate([tr], lay, int(gib * 2**30) // PAGE, mode, 2048, 1024, disk)
            u = r.ubatches
            for req in range(a.requests):
                d = u[u["seq"] == req]
                dec = d[d["phase"] == 1]
                print(f"cache {gib:4.1f} GiB {mode:8s} req {req}: load {r.load['read_pages'] * PAGE / 1e9:5.1f} GB | "
                      f"read {d['read_pages'].sum() * PAGE / 1e9:6.1f} GB, {d['majflt'].sum():9,.0f} major faults | "
                      f"decode {dec['read_pages'].sum() * PAGE / 1e9 / max(len(dec), 1):5.2f} GB/token, "
                      f"I/O {dec['io_s'].sum() / max(len(dec), 1):5.2f} s/token", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
