"""What the commands that run llama.cpp share: its options, and a progress bar that a terminal shows.

One copy for ``capture``, ``profile`` and ``demo``, so a fix (0.1.0's ``capture`` crashed in every real
terminal: ``if bar`` on ``tqdm(total=None)`` raises) lands everywhere at once.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator

from ..errors import InputError


def add_llama_options(p: argparse.ArgumentParser, ctx_help: str = "context size (default 2048)") -> None:
    """--ctx-size, --ubatch-size, --threads, --n-gpu-layers (llama.cpp's own spellings)."""
    p.add_argument("-c", "--ctx-size", type=int, default=2048, help=ctx_help)
    p.add_argument("--ubatch-size", type=int, default=512, help="tokens per ubatch in prefill (default 512)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: cores, at most 8)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers to offload to a GPU (default 0)")


def check_llama_options(args: argparse.Namespace) -> None:
    """Refuse values llama.cpp would misread, before the model is loaded."""
    if args.ctx_size < 8:
        raise InputError(f"--ctx-size {args.ctx_size}: must be at least 8")
    if args.ubatch_size < 1:
        raise InputError(f"--ubatch-size {args.ubatch_size}: must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads {args.threads}: must be at least 1 (or left out: one per core, at most 8)")
    if args.n_gpu_layers < 0:
        raise InputError(f"--n-gpu-layers {args.n_gpu_layers}: must be >= 0 (a large number offloads all)")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none anyway when stderr is not a terminal)")


@contextlib.contextmanager
def progress(args: argparse.Namespace, desc: str, unit: str, total: int | None = None,
             initial: int = 0) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar on stderr when stderr is a terminal and --no-progress is not given: yields its update
    function, else None (piped and redirected runs stay quiet)."""
    if getattr(args, "no_progress", False) or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True,
               leave=False)
    try:
        yield bar.update
    finally:
        bar.close()
