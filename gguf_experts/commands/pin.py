"""gguf-experts pin: hold the hot experts' bytes in the page cache (mlock) for every process mapping the model."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import numpy as np

from ..errors import InputError
from ..reporters.tabular import add_output_options
from ._trace_input import parse_int_list

NAME = "pin"
HELP = "hold the hot experts' byte ranges of a model resident (mlock) for every process that maps it, until stopped"
DESCRIPTION = (HELP + ". The experts are those `pins --budget` picks from --trace (most requests per byte), or a "
               "`pins --list-csv` file in its order, up to --budget bytes. Runs until SIGTERM/SIGINT, then "
               "unlocks. A budget above RLIMIT_MEMLOCK (`ulimit -l`) or MemAvailable is refused. "
               "Example: gguf-experts pin MODEL.gguf --budget 4G --trace t.bin & llama-server -m MODEL.gguf ... "
               "Measured (docs/paging-results.md, run 4): with stock llama.cpp it cut decode reads 3.8x; with "
               "`run --paging prefetch` it cut reads further but decoded no faster, so use it where the preload "
               "cannot go (a program not started through `run`, several processes sharing one model file).")
ORDER = 33


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the GGUF model (first shard of a split one)")
    p.add_argument("--budget", required=True, metavar="SIZE", help="bytes to lock (e.g. 4G, binary suffixes)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", metavar="T.bin", help="learn the hot experts from this trace of the model")
    src.add_argument("--pins", metavar="PINS.csv", help="a pin list written by `pins --list-csv`")
    add_output_options(p, output=False, what="what was pinned (experts, bytes, ranges, pid), once locked")
    p.add_argument("--ready-file", metavar="FILE",
                   help="write this file (the pid) once everything is locked (for scripts that wait on it)")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..paging import pin
    from ..atomic import atomic_write
    from ..reporters.tabular import Output, emit
    from ..paging.modes import mem_available

    budgets = parse_int_list(args.budget, "--budget")
    if not budgets or len(budgets) != 1:
        raise InputError(f"--budget {args.budget}: give one size, e.g. 4G")
    budget = budgets[0]
    if not os.path.isfile(args.model):
        raise InputError(f"{args.model}: no such model file; check the path")
    pin.check_budget(budget, mem_available())  # before anything is mapped: nothing to undo
    experts = (_from_trace(args.model, args.trace, budget) if args.trace
               else pin.experts_from_csv(args.model, args.pins, budget))
    plan = pin.plan(args.model, experts)
    pin.check_budget(plan.locked_bytes, None)
    stop: list[int] = []
    old = {s: signal.signal(s, lambda n, f: stop.append(n)) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        with pin.Pinned(plan):
            row = {"model": args.model, "experts": int(experts.sum()), "bytes": plan.bytes,
                   "locked_bytes": plan.locked_bytes, "ranges": len(plan.ranges), "pid": os.getpid()}
            text = (f"pinned {row['experts']} experts ({plan.locked_bytes / 2**30:.2f} GiB in {len(plan.ranges)} "
                    f"ranges) of {args.model}; pid {os.getpid()}; stop with kill -TERM {os.getpid()}\n")
            emit(Output(pd.DataFrame([row]), document=row, text=text), args.format, None)
            sys.stdout.flush()
            if args.ready_file:
                with atomic_write(args.ready_file) as fh:
                    fh.write(f"{os.getpid()}\n")
            while not stop:  # (pause() could miss a signal that lands between the test and the call)
                time.sleep(0.25)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    sys.stderr.write("gguf-experts: unpinned\n")
    return 0


def _from_trace(model: str, trace: str, budget: int) -> np.ndarray:
    from ..paging import pin
    from ..analysis.pins import counts_of
    from ._trace_input import expert_bytes, open_trace

    header, chunks = open_trace(trace)
    fp = header.fingerprint
    counts = np.zeros((fp.n_layer, fp.n_expert), np.int64)
    for c in chunks:
        counts += counts_of(c.layer, c.experts, fp.n_layer, fp.n_expert)
    eb = expert_bytes(model, header, trace)
    assert eb is not None
    return pin.experts_from_counts(counts, eb, budget)
