#!/usr/bin/env python
"""CPU vs GPU routing agreement on identical inputs, layer by layer, with the near-tie share.

Why not compare two generations: once greedy decoding picks another token the texts differ and every
later row differs for a reason that says nothing about routing. Here both backends get the same tokens:
each prompt is prefilled, then a fixed continuation is fed one token at a time (decode-shaped ubatches,
teacher-forced). For every (sequence, position, layer) row we compare the recorded top-k ids and, from the
first run's router probabilities (`ffn_moe_probs`), the margin between the k-th and the (k+1)-th expert
as a logit gap, ln(p_k / p_(k+1)) (a probability difference says little in the tail of a softmax):
a small margin is a near-tie that the backends' rounding may decide either way. Differences grow with depth
because each layer's input carries the earlier layers' rounding: the table is per layer.

    python scripts/gpu_agree.py MODEL [--ngl 0 99] [--prompts 4] [--prompt-tokens 256] [--decode 16]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from gguf_experts.trace.live.llama import MemorySink, TracedLlama
from gguf_experts.gguf.fingerprint import model_fingerprint
from gguf_experts.trace.format import PHASE_DECODE


def run(model: str, ngl: int, seqs: list[tuple[list[int], list[int]]]) -> dict[tuple[int, int, int], tuple]:
    fp = model_fingerprint(model)
    n_ctx = max(len(p) + len(c) for p, c in seqs) + 8
    llm = TracedLlama(model, MemorySink(), fp, n_ctx=n_ctx, n_threads=16, n_gpu_layers=ngl, observe_extra=True)
    try:
        for prompt, cont in seqs:
            llm.new_sequence()
            llm.eval(prompt, logits="all")
            for t in cont:
                llm.eval([t], PHASE_DECODE, logits="all")
        rows = {}
        for e in llm.extras_log:
            for layer, ids in e["topk"].items():
                probs = e["ffn_moe_probs"][layer]
                pos = e["pos"] if len(ids) == len(e["pos"]) else e["pos"][e["out"]]
                for i, ps in enumerate(pos):
                    rows[(e["seq"], int(ps), layer)] = (ids[i].copy(), probs[i].astype(np.float64))
        return rows
    finally:
        llm.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--ngl", type=int, nargs=2, default=[0, 99])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode", type=int, default=16)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(1)
    seqs = [([1] + [int(x) for x in rng.integers(3, 259, a.prompt_tokens - 1)],
             [int(x) for x in rng.integers(3, 259, a.decode)]) for _ in range(a.prompts)]
    ra, rb = (run(a.model, g, seqs) for g in a.ngl)
    keys = sorted(k for k in ra if k in rb)
    layers = sorted({k[2] for k in keys})
    k = len(next(iter(ra.values()))[0])
    print(f"{a.model}: -ngl {a.ngl[0]} vs {a.ngl[1]}, {a.prompts} sequences x ({a.prompt_tokens} prefill + {a.decode} "
          f"teacher-forced decode) tokens; {len(keys)} rows; margin = ln(p_k / p_(k+1)) of the -ngl {a.ngl[0]} run")
    print("| layer | rows | same ids, same order | same set | logit gap < 1e-3 | median margin "
          "| median margin where ids differ |")
    print("|---|---|---|---|---|---|---|")
    tot_same = tot_set = tot = tot_tie = 0
    for layer in layers:
        ks = [x for x in keys if x[2] == layer]
        ia = np.stack([ra[x][0] for x in ks])
        ib = np.stack([rb[x][0] for x in ks])
        pa = np.stack([ra[x][1] for x in ks])
        srt = -np.sort(-pa, axis=1)
        margin = np.log(np.maximum(srt[:, k - 1], 1e-300)) - np.log(np.maximum(srt[:, k], 1e-300))
        same = (ia == ib).all(axis=1)
        same_set = (np.sort(ia, axis=1) == np.sort(ib, axis=1)).all(axis=1)
        tie = margin < 1e-3
        dm = np.median(margin[~same_set]) if (~same_set).any() else float("nan")
        tot += len(ks)
        tot_same += int(same.sum())
        tot_set += int(same_set.sum())
        tot_tie += int(tie.sum())
        print(f"| {layer} | {len(ks)} | {same.mean():.4f} | {same_set.mean():.4f} | {tie.mean():.4f} | "
              f"{np.median(margin):.3g} | {dm:.3g} |")
    print(f"| all | {tot} | {tot_same / tot:.4f} | {tot_set / tot:.4f} | {tot_tie / tot:.4f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
