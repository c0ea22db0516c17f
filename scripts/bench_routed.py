#!/usr/bin/env python3
"""Reading vLLM/SGLang routed experts ([tokens, layers, k] .npz) into trace rows, against peers in the same run.

    python scripts/bench_routed.py [--tokens 50000] [--requests 64]

Model: Qwen3-30B-A3B's header (48 layers, 128 experts, top-8; tests/shapes.py, data a sparse hole). Ours:
``load_trace(routed.npz, model)`` (np.load, checks, the vectorised mapping onto blocks and rows). Peers: the
same rows read back from a trace.bin (our own reader, ``read_trace``), and a per-(token, layer) Python loop
building the rows from the array (what a hand-written converter does), timed on a prefix. Prints selections
per CPU-second (process time: other load on a shared machine does not count) and the ratios; ours includes
opening the GGUF header (its tokenizer strings: about 0.15 s).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import shapes  # noqa: E402

from gguf_experts.formats.load import load_trace  # noqa: E402
from gguf_experts.formats.routed import from_trace, write_routed  # noqa: E402
from gguf_experts.gguf.fingerprint import fingerprint  # noqa: E402
from gguf_experts.gguf.reader import open_model  # noqa: E402
from gguf_experts.formats.csvlog import encode_trace  # noqa: E402
from gguf_experts.trace.reader import read_trace  # noqa: E402


def cpu(fn):  # type: ignore[no-untyped-def]
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=2_000, help="tokens the Python-loop peer converts")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        model_path = shapes.qwen3_30b_a3b().write(d)
        model = open_model(model_path)
        L, M, k = model.block_count, model.expert_count, model.expert_used_count
        rng = np.random.default_rng(0)
        e = np.argsort(rng.random((a.tokens, L, M), dtype=np.float32), axis=2)[:, :, :k].astype(np.int32)
        cuts = np.sort(rng.choice(np.arange(1, a.tokens), a.requests - 1, replace=False))
        lengths = np.diff(np.r_[0, cuts, a.tokens])
        npz = Path(d) / "r.npz"
        np.savez(npz, routed_experts=e, lengths=lengths, prompt_lengths=lengths // 2)
        sel = e.size
        td, t_ours = cpu(lambda: load_trace(npz, model_path))
        assert len(td) == a.tokens * L
        # peer 1: the same rows from a trace.bin
        tb = Path(d) / "t.bin"
        rows = {"seq": td.seq, "phase": td.phase, "pos": td.pos, "token": td.token, "layer": td.layer,
                "experts": td.experts, "weights": None}
        with open(tb, "wb") as fh:
            for blob in encode_trace([rows], fingerprint(model), {"weights": False}):
                fh.write(blob)
        back, t_bin = cpu(lambda: read_trace(tb))
        assert len(back) == len(td)
        # peer 2: a Python loop over (token, layer) on a prefix

        def loop() -> int:
            out = []
            n = min(a.prefix, a.tokens)
            for t in range(n):
                for layer in range(L):
                    ids = e[t, layer].tolist()
                    if all(0 <= i < M for i in ids):
                        out.append((t, layer, ids))
            return len(out) * k
        done, t_loop = cpu(loop)
        # and back out: a trace as the engines lay it out
        ra, t_write = cpu(lambda: from_trace(td))
        assert np.array_equal(ra.experts, e)
        with open(os.devnull, "wb") as fh:
            _, t_save = cpu(lambda: write_routed(td, fh))
    r = sel / t_ours
    print(f"qwen3-30b-a3b shape, {a.tokens:,} tokens x {L} layers x top-{k} = {sel:,} selections, "
          f"{a.requests} requests")
    print(f"ours   routed .npz -> trace rows: {r / 1e6:8.1f} M selections/CPU-s")
    print(f"peer   trace.bin -> trace rows:    {sel / t_bin / 1e6:8.1f} M selections/CPU-s "
          f"(ours/peer {r * t_bin / sel:.2f}x)")
    print(f"peer   Python loop (prefix):       {done / t_loop / 1e6:8.3f} M selections/CPU-s "
          f"(ours/peer {r / (done / t_loop):.0f}x)")
    print(f"ours   trace -> routed arrays:     {sel / t_write / 1e6:8.1f} M selections/CPU-s; "
          f"with .npz encoding {sel / t_save / 1e6:.1f}")


if __name__ == "__main__":
    main()
