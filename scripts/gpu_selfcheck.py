#!/usr/bin/env python
"""Is a capture right on its own backend, and are CPU/GPU differences near-ties?

For each model and each -ngl, runs the prompts with the router's probabilities observed too
(``observe_extra``: ``ffn_moe_probs``, copied with the same ``ggml_backend_tensor_get`` path) and checks,
row by row, that the recorded top-k ids are the k largest probabilities of that same run (a wrong stride,
row mapping or stale buffer would break this). Then, for the rows whose ids differ between the first and
the second -ngl, it prints the CPU run's probability gap between the two experts that changed places:
tiny gaps mean the backends' rounding decided a near-tie, not that capture misread anything.

    python scripts/gpu_selfcheck.py MODEL [MODEL ...] --prompts FILE [-n 16] [--ngl 0 99] [--modes callback keepalive]
`--modes ... keepalive` also checks `capture`'s keep-alive path: the ids are those the in-process C tracer wrote to
its trace, the probabilities those the callback observed in the same run (the C tracer wraps a program's callback).
Exit code 0 when every row of every run is self-consistent.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from gguf_experts.trace.live.llama import MemorySink, TracedLlama
from gguf_experts.gguf.fingerprint import model_fingerprint


def run(model: str, prompts: list[str], n: int, ngl: int,
        mode: str = "callback") -> dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]]:
    """(seq, pos, layer) -> (ids [k], probs [n_expert]) for every routed row."""
    fp = model_fingerprint(model)
    native = None
    if mode == "keepalive":
        from gguf_experts.trace.live.ggml_ctypes import load_llama_cpp
        from gguf_experts.trace.live.native import NativeTrace

        tpath = Path(tempfile.mkdtemp()) / "keepalive.bin"
        native = NativeTrace(tpath, False, load_llama_cpp())
    llm = TracedLlama(model, MemorySink(), fp, n_ctx=2048, n_threads=8, n_gpu_layers=ngl, observe_extra=True,
                      native=native)
    try:
        for p in prompts:
            llm.generate(p, n, ignore_eos=True)
    finally:
        llm.close()
        if native is not None:
            native.finish()
    probs_of: dict[tuple[int, int, int], np.ndarray] = {}
    rows: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
    for e in llm.extras_log:
        for layer, ids in e["topk"].items():
            probs = e["ffn_moe_probs"][layer]
            pos = e["pos"] if len(ids) == len(e["pos"]) else e["pos"][e["out"]]
            for i, ps in enumerate(pos):
                rows[(e["seq"], int(ps), layer)] = (ids[i], probs[i])
                probs_of[(e["seq"], int(ps), layer)] = probs[i]
    if native is None:
        return rows
    from gguf_experts.trace.reader import read_trace

    d = read_trace(tpath)
    out = {}
    for i in range(len(d)):
        key = (int(d.seq[i]), int(d.pos[i]), int(d.layer[i]))
        out[key] = (d.experts[i], probs_of[key])
    if len(out) != len(rows):
        raise SystemExit(f"keep-alive trace has {len(out)} rows, the callback saw {len(rows)}")
    return out


def self_consistent(rows: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]]) -> tuple[int, float]:
    """Rows whose top-k ids are not the k largest probabilities (beyond float ties), and the worst excess."""
    ids = np.stack([v[0] for v in rows.values()]).astype(np.int64)
    probs = np.stack([v[1] for v in rows.values()]).astype(np.float64)
    sel = np.take_along_axis(probs, ids, axis=1)
    mask = np.ones_like(probs, dtype=bool)
    np.put_along_axis(mask, ids, False, axis=1)
    best_unsel = np.where(mask, probs, -np.inf).max(axis=1)
    excess = best_unsel - sel.min(axis=1)  # > 0: an expert left out beats one taken
    order_bad = (np.diff(sel, axis=1) > 1e-6 * np.abs(sel[:, :-1]).clip(1e-30)).any(axis=1)
    bad = (excess > 1e-6) | order_bad
    return int(bad.sum()), float(excess.max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--ngl", type=int, nargs=2, default=[0, 99])
    ap.add_argument("--modes", nargs="+", default=["callback"], choices=("callback", "keepalive"),
                    help="check each; the CPU/GPU comparison uses the first")
    a = ap.parse_args(argv)
    with open(a.prompts, encoding="utf-8") as f:
        prompts = [ln for ln in f.read().splitlines() if ln.strip()]
    ok = True
    for m in a.models:
        for mode in a.modes[1:]:
            for g in dict.fromkeys(a.ngl):
                nbad, worst = self_consistent(rows := run(m, prompts, a.n, g, mode))
                ok &= nbad == 0
                print(f"{m} -ngl {g} {mode}: {len(rows)} rows; ids not the top-k of the same run's probabilities: "
                      f"{nbad} (worst excess {worst:.3g})")
        runs = {g: run(m, prompts, a.n, g, a.modes[0]) for g in dict.fromkeys(a.ngl)}
        for g, rows in runs.items():
            nbad, worst = self_consistent(rows)
            ok &= nbad == 0
            print(f"{m} -ngl {g} {a.modes[0]}: {len(rows)} rows; ids not the top-k of the same run's probabilities: "
                  f"{nbad} (worst excess {worst:.3g})")
        ra, rb = runs[a.ngl[0]], runs[a.ngl[1]]
        keys = [k for k in ra if k in rb and not np.array_equal(ra[k][0], rb[k][0])]
        gaps = []
        for k in keys:  # CPU-run probability gap between the experts the two runs disagree on
            ia, ib, pa = ra[k][0], rb[k][0], ra[k][1].astype(np.float64)
            s = int(np.argmax(ia != ib))
            gaps.append(abs(pa[ia[s]] - pa[ib[s]]))
        g = np.array(gaps) if gaps else np.zeros(1)
        allp = np.stack([v[1] for v in ra.values()]).astype(np.float64)
        srt = -np.sort(-allp, axis=1)
        typical = np.median(np.abs(np.diff(srt, axis=1)))
        print(f"  -ngl {a.ngl[0]} vs {a.ngl[1]}: {len(keys)} of {len(ra)} rows differ; probability gap between the "
              f"swapped experts (first run): median {np.median(g):.3g}, 99th pct {np.quantile(g, 0.99):.3g}, max "
              f"{g.max():.3g}; typical gap between neighbouring probabilities: {typical:.3g}; "
              f"max |prob diff| between runs over all rows: "
              f"{max(float(np.abs(ra[k][1] - rb[k][1]).max()) for k in ra if k in rb):.3g}")
    print("=> SELF-CONSISTENT" if ok else "=> INCONSISTENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
