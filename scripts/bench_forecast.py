#!/usr/bin/env python3
"""Throughput of the forecast's page-cache replay, against `cache-sim`'s global LRU on the same trace in the
same run.

    python scripts/bench_forecast.py [--tokens 20000] [--prefill 2048] [--layers 48] [--experts 128] [--k 8]
        [--budget-gib 9] [--modes stock,random,prefetch]

The layout is the Qwen3-30B-A3B shape at Q8_0 (make_big_model.py's default: 29.6 GiB, 48 blocks, expert slices
3 x 1.67 MB, ~20 MB of attention weights per block), built in memory (no file): the simulator only needs the
page ranges. The trace: --prefill prompt tokens in ubatches of 512, then --tokens decode tokens; Zipf-skewed
routing with a permutation per layer. Prints selections (token x layer x k) per CPU-second for each mode at the
budget, and the same for `cache-sim --budget` (one LRU over all experts, vectorised numpy), and the ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gguf_experts.analysis.cache.cachesim import CacheSimRequest, cache_sim  # noqa: E402
from gguf_experts.gguf.fingerprint import ModelFingerprint  # noqa: E402
from gguf_experts.paging.disk import DiskModel  # noqa: E402
from gguf_experts.paging.forecast import simulate  # noqa: E402
from gguf_experts.paging.model import PAGE, PageLayout, reclaim_batch_pages  # noqa: E402
from gguf_experts.trace.format import TraceData, TraceHeader  # noqa: E402


def layout_30b(n_layer: int, n_exp: int, embd: int = 2048, ff: int = 768, heads: int = 32, kv: int = 4,
               hd: int = 128) -> PageLayout:
    """make_big_model.py's file order and sizes at Q8_0 (34 bytes per 32 values), 32-byte aligned."""
    q8 = lambda n: n // 32 * 34  # noqa: E731
    pos = 4 << 20  # header + token_embd + output ahead of the blocks (rounded)
    ne_a, ne_b, ne_idx, ex_base, ex_slice, ex_idx, ranges = [], [], [0], [], [], [0], []
    for _ in range(n_layer):
        for nbytes in (embd * 4, q8(embd * heads * hd), q8(embd * kv * hd), q8(embd * kv * hd),
                       q8(heads * hd * embd), hd * 4, hd * 4, embd * 4, n_exp * embd * 4):
            ne_a.append(pos // PAGE)
            ne_b.append(-(-(pos + nbytes) // PAGE))
            pos += -(-nbytes // 32) * 32
        ne_idx.append(len(ne_a))
        for _ in range(3):
            sl = q8(embd) * ff
            ex_base.append(pos)
            ex_slice.append(sl)
            ranges.append((pos // PAGE, -(-(pos + sl * n_exp) // PAGE)))
            pos += sl * n_exp
        ex_idx.append(len(ex_base))
    ne_a.append(0)
    ne_b.append(1)
    ne_idx.append(len(ne_a))
    i64 = lambda x: np.array(x, np.int64)  # noqa: E731
    return PageLayout(n_pages=-(-pos // PAGE), n_block=n_layer, n_expert=n_exp, ne_idx=i64(ne_idx), ne_a=i64(ne_a),
                      ne_b=i64(ne_b), ex_idx=i64(ex_idx), ex_base=i64(ex_base), ex_slice=i64(ex_slice),
                      embd_off=0, embd_row=q8(embd), expert_ranges=ranges, moe_blocks=list(range(n_layer)),
                      file_bytes=pos)


def make_trace(n_prefill: int, n_decode: int, L: int, E: int, k: int, seed: int = 0) -> TraceData:
    rng = np.random.default_rng(seed)
    perm = np.stack([rng.permutation(E) for _ in range(L)])
    ubs = [(0, s, min(512, n_prefill - s)) for s in range(0, n_prefill, 512)]
    n_tok = n_prefill + n_decode
    phase = np.concatenate([np.zeros(n_prefill * L, np.uint8), np.ones(n_decode * L, np.uint8)])
    layer = np.concatenate([np.repeat(np.arange(L), n) for _, _, n in ubs] + [np.tile(np.arange(L), n_decode)])
    pos = np.concatenate([np.tile(np.arange(p0, p0 + n), L) for _, p0, n in ubs]
                         + [np.repeat(np.arange(n_prefill, n_tok), L)])
    n = len(layer)
    ranks = np.minimum(rng.zipf(1.6, (n, k * 2)) - 1, E - 1)  # skewed ranks; duplicates replaced below
    ex = np.zeros((n, k), np.int32)
    ex[:] = ranks[:, :k]
    dup = (np.sort(ex, axis=1)[:, 1:] == np.sort(ex, axis=1)[:, :-1]).any(axis=1)
    ex[dup] = np.argsort(rng.random((int(dup.sum()), E)), axis=1)[:, :k]
    experts = perm[layer[:, None], ex].astype(np.int32)
    fp = ModelFingerprint("qwen3moe", L, E, k, "", "")
    return TraceData(seq=np.zeros(n, np.int32), phase=phase, pos=pos.astype(np.int32),
                     token=(3 + pos % 250).astype(np.int32), layer=layer.astype(np.int32), experts=experts,
                     weights=None, header=TraceHeader(2, fp, {}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--budget-gib", type=float, default=9.0)
    ap.add_argument("--modes", default="stock,random,prefetch")
    a = ap.parse_args()
    lay = layout_30b(a.layers, a.experts)
    tr = make_trace(a.prefill, a.tokens, a.layers, a.experts, a.k)
    sel = len(tr) * a.k
    chunks = [tr.select(np.arange(i, min(i + (1 << 16), len(tr)))) for i in range(0, len(tr), 1 << 16)]
    print(f"layout {lay.file_bytes / 2**30:.1f} GiB, trace {a.prefill} prefill + {a.tokens} decode tokens = "
          f"{sel:,} selections; page cache {a.budget_gib} GiB")
    eb = np.zeros((a.layers, a.experts))
    for t in range(len(lay.ex_base)):
        eb[t // 3] += lay.ex_slice[t]
    req = CacheSimRequest(a.layers, a.experts, a.k, budgets=[int(a.budget_gib * 2**30)], capacities=[1],
                          expert_bytes=eb)
    t0 = time.process_time()
    cache_sim(((c.layer, c.experts) for c in chunks), req)
    peer = sel / (time.process_time() - t0)
    print(f"cache-sim --budget (global LRU, numpy): {peer:,.0f} selections/s")
    disk = DiskModel(1900, 19300, "assumed")
    for mode in a.modes.split(","):
        t0 = time.process_time()
        # as forecast() runs it for llama.cpp: read_ahead_kb 8192 doubled by its POSIX_FADV_SEQUENTIAL, kswapd batches
        res = simulate(chunks, lay, int(a.budget_gib * 2**30) // PAGE, mode, 4096, 1024, disk, populate=True,
                       reclaim_batch=reclaim_batch_pages())
        dt = time.process_time() - t0
        dec = res.ubatches[res.ubatches["phase"] == 1]
        print(f"forecast {mode:8s}: {sel / dt:,.0f} selections/s ({dt:.1f} s; {sel / dt / peer:.2f}x cache-sim); "
              f"decode {dec['read_pages'].sum() * PAGE / max(len(dec), 1) / 2**20:,.0f} MiB/token, "
              f"{dec['majflt'].sum() / max(len(dec), 1):,.0f} major faults/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
