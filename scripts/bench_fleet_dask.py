#!/usr/bin/env python
"""Benchmark fleets on Dask: the speed-up of 2 local Dask workers over the single process, and peak memory.

Makes a synthetic fleet in a temp dir: a model with the shape of a 48-layer, 128-expert, top-8 MoE (tiny
tensors) and --traces traces of about --selections expert selections each, written as captures write them
(per request a prefill record of --prompt tokens per layer, then one-token decode records). Then, for each of
join-trace, cache-sim and stats over the whole fleet (a quoted glob):
  one:  `gguf-experts CMD ...` in one process (the default path), in a child process: wall time, peak RSS;
  dask: the same command with --scheduler ADDRESS of a LocalCluster of 2 worker processes (1 thread each)
        started once by this script and restarted before each command (fresh workers, which then import
        the command's module, as a running cluster's have: their peak RSS is that command's); wall time,
        the driver's peak RSS and each worker's (ru_maxrss on the worker).
Both outputs are compared byte for byte. The ratios are of runs made here, one after the other; the machine
may be shared, so the load average is printed with them, and the CPU seconds each side used (1 process;
driver + each worker): a speed-up well under 2 with CPU seconds split evenly between the workers means that
they did not get two cores. The cluster's start-up (paid once by --workers N per call) is printed too.
Usage: bench_fleet_dask.py [--traces 16] [--selections 50000000] [--part-size 64M] [--keep DIR]
"""
from __future__ import annotations

import argparse
import filecmp
import importlib
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_LAYER, N_EXPERT, K = 48, 128, 8


def make_fleet(d: Path, traces: int, selections: int, prompt: int = 32, gen: int = 96) -> tuple[Path, int]:
    """The model and the traces; returns (model path, selections written in all)."""
    from gguf_experts.demo import tinymodel
    from gguf_experts.gguf.fingerprint import fingerprint
    from gguf_experts.gguf.reader import open_model
    from gguf_experts.trace.writer import TraceWriter

    model = tinymodel.make_tiny_model(d / "model.gguf", n_layer=N_LAYER, n_expert=N_EXPERT, n_expert_used=K,
                                      n_embd=32, n_head=2, n_head_kv=1, n_ff_exp=16)
    fp = fingerprint(open_model(model))
    per_seq = (prompt + gen) * N_LAYER * K
    n_seq = max(1, selections // per_seq)
    offsets = (np.arange(K) * 17) % N_EXPERT  # distinct experts per token (17 is prime to 128)
    total = 0
    for t in range(traces):
        rng = np.random.default_rng(t)
        p = rng.dirichlet(np.full(N_EXPERT, 0.3))  # skewed routing, one skew per server
        with TraceWriter(d / f"server{t:02d}.bin", fp, {"synthetic": True}) as w:
            for s in range(n_seq):
                base = rng.choice(N_EXPERT, size=(N_LAYER, prompt), p=p)
                ex = ((base[..., None] + offsets) % N_EXPERT).astype(np.int32)
                pos = np.tile(np.arange(prompt), (N_LAYER, 1))
                w.write_many(np.full(N_LAYER, s), np.zeros(N_LAYER, int), np.arange(N_LAYER), pos, pos, ex)
                m = gen * N_LAYER
                base = rng.choice(N_EXPERT, size=(m, 1), p=p)
                ex = ((base[..., None] + offsets) % N_EXPERT).astype(np.int32)
                idx = np.arange(m)
                pos = (prompt + idx // N_LAYER)[:, None]
                w.write_many(np.full(m, s), np.ones(m, int), idx % N_LAYER, pos, pos, ex)
        total += n_seq * per_seq
    return model, total


def run_cli(argv: list[str]) -> tuple[float, int, float]:
    """(wall seconds, peak RSS in bytes, CPU seconds) of `python -m gguf_experts argv` in a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gguf_experts", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(argv)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def worker_usage() -> tuple[int, float]:
    """(peak RSS in bytes, CPU seconds) of this worker process so far."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_maxrss * 1024, u.ru_utime + u.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=int, default=16)
    ap.add_argument("--selections", type=float, default=50e6, help="expert selections per trace (default 50 M)")
    ap.add_argument("--part-size", default="64M", help="--part-size of the Dask runs (default 64M)")
    ap.add_argument("--commands", default="join-trace,cache-sim,stats")
    ap.add_argument("--keep", metavar="DIR", help="make the fleet in DIR and keep it (reused when present)")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="bench_fleet_dask_")
    d = Path(args.keep or tmp.name)  # type: ignore[union-attr]
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, total = make_fleet(d, args.traces, int(args.selections))
    size = sum(p.stat().st_size for p in d.glob("server*.bin"))
    print(f"fleet: {args.traces} traces x {total / args.traces / 1e6:.1f} M selections = {total / 1e6:.0f} M "
          f"({size / 2**20:.0f} MiB of trace.bin), made in {time.perf_counter() - t0:.1f} s; model {N_LAYER} layers "
          f"x {N_EXPERT} experts, top-{K}")
    glob = str(d / "server*.bin")
    argvs = {"join-trace": ["join-trace", glob, "-m", str(model), "-f", "csv"],
             "cache-sim": ["cache-sim", glob, "-f", "csv"],
             "stats": ["stats", glob, "-f", "csv"]}
    t0 = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        start = time.perf_counter() - t0
        print(f"LocalCluster of 2 workers started in {start:.1f} s (paid by each --workers 2 call; not in the "
              "times below, which use --scheduler)")
        print(f"{'command':<11} {'1 proc s':>9} {'2 workers s':>11} {'speed-up':>8} {'CPU s 1 proc/dask':>17} "
              f"{'1 proc RSS':>10} {'driver RSS':>10} {'worker RSS (each)':>18}  same output")
        for name in args.commands.split(","):
            argv = argvs[name]
            one_out, many_out = d / f"{name}.one.csv", d / f"{name}.dask.csv"
            t1, rss1, cpu1 = run_cli([*argv, "-o", str(one_out)])
            client.restart()  # fresh worker processes: their ru_maxrss is this command's
            client.run(importlib.import_module, f"gguf_experts.commands.{name.replace('-', '_')}")  # warm, as a
            # running cluster's workers are after their first task
            before = client.run(worker_usage)
            t2, rss_driver, cpu_driver = run_cli([*argv, "-o", str(many_out), "--scheduler",
                                                  cluster.scheduler_address, "--part-size", args.part_size])
            after = client.run(worker_usage)
            peaks = sorted(a[0] for a in after.values())
            cpu_w = [after[w][1] - before[w][1] for w in sorted(after)]
            cpu2 = cpu_driver + sum(cpu_w)
            same = filecmp.cmp(one_out, many_out, shallow=False)
            print(f"{name:<11} {t1:>9.1f} {t2:>11.1f} {t1 / t2:>7.2f}x {cpu1:>8.1f}/{cpu2:<8.1f} "
                  f"{rss1 / 2**20:>8.0f}Mi {rss_driver / 2**20:>8.0f}Mi "
                  f"{' '.join(f'{p / 2**20:.0f}Mi' for p in peaks):>18}  {'yes' if same else 'NO'}  "
                  f"(worker CPU s: {' '.join(f'{c:.1f}' for c in cpu_w)})")
            if not same:
                return 1
    la = os.getloadavg()
    print(f"load average (1/5/15 min): {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} CPUs")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
