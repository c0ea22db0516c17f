"""The fleet commands' Dask options (stats, join-trace, cache-sim, pins, report, diff): one group, added by one
helper, read by one function. Nothing here imports dask: only gguf_experts.fleet_dask does, when asked."""
from __future__ import annotations

import argparse

from ..fleet_dask import DEFAULT_PART_BYTES, DaskSettings
from ._trace_input import parse_int_list


def add_dask_options(p: argparse.ArgumentParser) -> None:
    """--scheduler ADDRESS, --workers N, --part-size BYTES (the [dask] extra; README, 'Fleets on Dask')."""
    g = p.add_argument_group("fleet on Dask (needs the [dask] extra; results equal the single process's)")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="spread the work over the running Dask cluster of this scheduler (e.g. tcp://10.0.0.5:8786): "
                        "one task per trace, and per part of a big trace.bin where counts add")
    g.add_argument("--workers", type=int, metavar="N",
                   help="spread the work over a local Dask cluster of N worker processes started for this call")
    g.add_argument("--part-size", metavar="BYTES", default=None,
                   help=f"with --scheduler/--workers: cut trace.bin files into parts of about BYTES where counts add "
                        f"(default {DEFAULT_PART_BYTES >> 20}M)")


def dask_settings(args: argparse.Namespace) -> DaskSettings:
    """The settings of a parsed command line (check() raises DaskError for a bad combination)."""
    part = parse_int_list(args.part_size, "--part-size") if args.part_size is not None else None
    s = DaskSettings(args.scheduler, args.workers, part[0] if part else DEFAULT_PART_BYTES)
    s.check()
    return s
