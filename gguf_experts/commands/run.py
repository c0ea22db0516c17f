"""gguf-experts run: trace an unchanged llama.cpp program (llama-server, llama-cli, a llama-cpp-python app)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from ..crash import describe_signal
from ..errors import InputError

if TYPE_CHECKING:
    from ..trace.preload.run import RunResult

NAME = "run"
HELP = "run an unchanged llama.cpp program with the C tracer preloaded and record its expert routing"
DESCRIPTION = (HELP + ". Example: gguf-experts run -o t.bin -- llama-server -m MODEL.gguf --port 8080. "
               "Exits with the program's status; SIGINT/SIGTERM reach the program. Without our Python parent: "
               "GGUF_EXPERTS_TRACE=t.bin LD_PRELOAD=$(gguf-experts run --print-preload) PROGRAM ... "
               "(Linux, programs built with shared libllama/libggml; see docs/run.md).")
ORDER = 31


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="trace.bin", metavar="TRACE.bin",
                   help="the trace file to write (default trace.bin)")
    p.add_argument("--weights", action="store_true",
                   help="also record the gate weights the model applies (the last weight stage)")
    p.add_argument("--mode", choices=("callback", "keepalive"),
                   default=os.environ.get("GGUF_EXPERTS_MODE") or "keepalive",
                   help="how the tracer gets the data: keeping each layer's top-k alive and reading it once per "
                        "ubatch (default; no graph splits: 1.9%% of decode on a GPU), or an eval callback per MoE "
                        "layer (a graph split and sync per layer: 28%% on a GPU); env GGUF_EXPERTS_MODE")
    p.add_argument("--paging", default="auto", metavar="MODE",
                   help="how the model's pages are read (docs/paging.md): stock (llama.cpp unchanged), random "
                        "(MADV_RANDOM on the expert tensors), prefetch (random, plus reading exactly the experts "
                        "each layer selected as soon as its router has run), or auto (default: stock when the "
                        "model fits in MemAvailable minus a reserve, else the mode `forecast` recommends for this "
                        "model, RAM and device); never changes results")
    p.add_argument("--paging-trace", metavar="TRACE.bin",
                   help="auto: forecast on this trace of your workload (default: a synthetic request whose "
                        "routing is uniform over every expert, the hard case)")
    p.add_argument("--no-trace", action="store_true",
                   help="write no trace: only the paging mode applies (-o is ignored)")
    p.add_argument("--print-preload", action="store_true",
                   help="build the tracer if needed and print its path (for LD_PRELOAD), then exit")
    p.add_argument("--finalize", metavar="TRACE.bin",
                   help="write the model fingerprint and sequence map into a trace written in the env form")
    p.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS...: the program to trace")


def _report(res: RunResult, program: str, no_trace: bool) -> None:
    """The run's one closing line: a death by signal named, the trace written, or why there is none."""
    if res.signal is not None:
        lost = "" if res.written or no_trace else "; no trace written"
        sys.stderr.write(f"gguf-experts: {describe_signal(res.signal, program)}{lost}; exit status {res.returncode}\n")
    if no_trace:
        return
    if res.written and res.header is not None:
        seqs = len(res.header.meta.get("sequences") or [])
        sys.stderr.write(f"gguf-experts: trace {res.trace} ({seqs} sequences, model "
                         f"{res.header.meta.get('model')}); program exit status {res.returncode}\n")
    elif res.signal is None:
        sys.stderr.write(f"gguf-experts: no trace written: {program} decoded no Mixture-of-Experts model through "
                         "a shared libllama (a static build, or not a llama.cpp program? see docs/run.md); "
                         f"program exit status {res.returncode}\n")


def run(args: argparse.Namespace) -> int:
    from ..paging import modes as paging
    from ..trace.preload import run as tracer

    if args.print_preload:
        print(tracer.build_preload())
        return 0
    if args.finalize:
        if not os.path.exists(args.finalize):
            raise InputError(f"{args.finalize}: no such trace; check the path")
        tracer.finalize(args.finalize)
        return 0
    argv = list(args.program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    paging.check_mode(args.paging)  # before anything runs: an unknown mode is one line and exit 2
    if args.paging_trace and not os.path.isfile(args.paging_trace):
        raise InputError(f"--paging-trace {args.paging_trace}: no such trace; check the path")
    choice = paging.resolve(args.paging, paging.model_in_argv(argv), trace=args.paging_trace)

    def say_mode() -> None:  # once every check has passed: an error stays one line
        if choice.fallback:
            sys.stderr.write(f"gguf-experts: warning: {choice.reason}\n")
        elif choice.mode != "auto" and (args.paging == "auto" or choice.mode != "stock"):  # (auto: the preload says)
            load = {"skip": ", no load pass", "keep": ", load pass kept", "auto": ""}[choice.load] \
                if choice.mode != "stock" else ""
            sys.stderr.write(f"gguf-experts: paging {choice.mode} ({choice.reason}{load})\n")
        sys.stderr.flush()

    res = tracer.launch(argv, None if args.no_trace else args.output, weights=args.weights, mode=args.mode,
                        env=paging.paging_env(choice), extra_meta={"paging": choice.mode}, on_start=say_mode)
    _report(res, argv[0], args.no_trace)
    return res.returncode
