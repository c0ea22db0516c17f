"""Benchmark `gguf-experts prune` against `cp` of the same file, in the same run; and its memory as the model grows.

A Qwen3-30B-A3B-shaped Q8_0 qwen3moe (64 experts, n_embd 2048, expert ff 768; --layers sets the size) is
written with real (non-zero) bytes, so neither cp nor prune can skip holes. Each copy is timed to the end
of its fsync (prune fsyncs its output; cp is followed by an fsync of the copy). cp runs first (it also warms
the page cache), then prune, then cp again; the ratios use the better cp. Peak RSS of prune (a child
process) is measured for a small and the large model: it should not grow with the model.

    python scripts/bench_prune.py [--layers 8] [--dir /tmp] [--keep-fraction 0.5]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gguf_experts.gguf.reader import read_header
from gguf_experts.gguf.writer import TensorSpec, write_gguf

N_EXPERT, K, EMBD, FF, VOCAB = 64, 8, 2048, 768, 32000


def make_model(path: Path, n_layer: int) -> Path:
    kv = {"general.architecture": "qwen3moe", "general.name": "bench", "qwen3moe.block_count": n_layer,
          "qwen3moe.expert_count": N_EXPERT, "qwen3moe.expert_used_count": K,
          "qwen3moe.expert_feed_forward_length": FF, "qwen3moe.embedding_length": EMBD}
    t = [TensorSpec.make("token_embd.weight", (EMBD, VOCAB), "Q8_0")]
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [TensorSpec.make(p + "attn_q.weight", (EMBD, 4096), "Q8_0"),
              TensorSpec.make(p + "attn_k.weight", (EMBD, 512), "Q8_0"),
              TensorSpec.make(p + "attn_v.weight", (EMBD, 512), "Q8_0"),
              TensorSpec.make(p + "attn_output.weight", (4096, EMBD), "Q8_0"),
              TensorSpec.make(p + "ffn_gate_inp.weight", (EMBD, N_EXPERT), "F32"),
              TensorSpec.make(p + "ffn_gate_exps.weight", (EMBD, FF, N_EXPERT), "Q8_0"),
              TensorSpec.make(p + "ffn_up_exps.weight", (EMBD, FF, N_EXPERT), "Q8_0"),
              TensorSpec.make(p + "ffn_down_exps.weight", (FF, EMBD, N_EXPERT), "Q8_0")]
    t.append(TensorSpec.make("output.weight", (EMBD, VOCAB), "Q8_0"))
    write_gguf(path, kv, t)  # sparse; now fill the data section with real bytes
    h = read_header(path)
    block = (bytes(range(1, 256)) * ((64 << 20) // 255 + 1))[:64 << 20]
    with open(path, "r+b") as fh:
        fh.seek(h.data_offset)
        left = h.file_size - h.data_offset
        while left > 0:
            left -= fh.write(block[:min(left, len(block))])
        fh.flush()
        os.fsync(fh.fileno())
    return path


def time_cp(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", "--reflink=never", str(src), str(dst)], check=True)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    dt = time.perf_counter() - t0
    dst.unlink()
    return dt


def drop_csv(path: Path, n_layer: int, keep_fraction: float) -> Path:
    drop = N_EXPERT - round(keep_fraction * N_EXPERT)
    path.write_text("layer,expert\n" + "".join(f"{la},{e}\n" for la in range(n_layer)
                                              for e in range(0, 2 * drop, 2)))  # every other one: many runs
    return path


def time_prune(src: Path, plan: Path, dst: Path) -> tuple[float, int, int]:
    """(seconds, bytes written, peak RSS in bytes) of a prune in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    code = ("import resource,sys; from gguf_experts.cli import main; rc = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "prune", str(src), "--plan", str(plan), "-o", str(dst),
                        "--no-progress"], check=True, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    rss = int(r.stderr.strip().splitlines()[-1]) * 1024
    del before
    size = dst.stat().st_size
    dst.unlink()
    return dt, size, rss


def time_startup() -> float:
    """Interpreter start-up and imports of the prune command, the fixed part of every prune run."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import gguf_experts.cli, gguf_experts.commands.prune, "
                    "gguf_experts.prune.cut, pandas"], check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="MoE layers of the big model (8: about 2.6 GB)")
    ap.add_argument("--dir", default=None, help="where to write the models (default: a temp dir)")
    ap.add_argument("--keep-fraction", type=float, default=0.5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-prune-", dir=args.dir))
    try:
        need = 3.2 * args.layers * 0.33e9
        free = shutil.disk_usage(work).free
        if free < need:
            print(f"not enough disk in {work}: {free / 1e9:.1f} GB free, ~{need / 1e9:.1f} GB needed", file=sys.stderr)
            return 2
        rss = {}
        startup = min(time_startup() for _ in range(3))
        for n_layer in (1, args.layers):
            src = make_model(work / f"m{n_layer}.gguf", n_layer)
            plan = drop_csv(work / f"drop{n_layer}.csv", n_layer, args.keep_fraction)
            size = src.stat().st_size
            cp1 = time_cp(src, work / "cp.gguf")
            dt, written, rss[n_layer] = time_prune(src, plan, work / "out.gguf")
            cp2 = time_cp(src, work / "cp.gguf")
            cp = min(cp1, cp2)
            print(f"model {size / 1e9:.2f} GB ({n_layer} MoE layers x {N_EXPERT} experts, Q8_0), keep "
                  f"{args.keep_fraction:.0%} of experts -> {written / 1e9:.2f} GB")
            print(f"  cp:    {cp:.2f} s ({size / cp / 1e9:.2f} GB/s written)  [runs: {cp1:.2f} s, {cp2:.2f} s]")
            print(f"  prune: {dt:.2f} s ({written / dt / 1e9:.2f} GB/s written), "
                  f"peak RSS {rss[n_layer] / 2**20:.0f} MiB; of which start-up and imports {startup:.2f} s")
            print(f"  throughput ratio prune/cp (bytes written per second): {(written / dt) / (size / cp):.2f}x; "
                  f"wall-time ratio cp/prune: {cp / dt:.2f}x")
            src.unlink()
        small, big = rss[1], rss[args.layers]
        print(f"peak RSS: {small / 2**20:.0f} MiB (1 layer) vs {big / 2**20:.0f} MiB ({args.layers} layers): "
              f"{big / small:.2f}x for a {args.layers}x larger model")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
