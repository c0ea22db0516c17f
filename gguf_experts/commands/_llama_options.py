"""What the commands that run llama.cpp share: its options, and a progress bar that a terminal shows.

One copy for ``capture``, ``profile``, ``demo`` (and ``prune``'s bar), so a fix (0.1.0's ``capture`` crashed
in every real terminal: ``if bar`` on ``tqdm(total=None)`` raises) lands everywhere at once.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from ._types import at_least


def add_llama_options(p: argparse.ArgumentParser, ctx_help: str = "context size (default 2048)") -> None:
    """--ctx-size, --ubatch-size, --threads, --n-gpu-layers (llama.cpp's own spellings)."""
    p.add_argument("-c", "--ctx-size", type=at_least(8), default=2048, help=ctx_help)
    p.add_argument("--ubatch-size", type=at_least(1), default=512, help="tokens per ubatch in prefill (default 512)")
    p.add_argument("-t", "--threads", type=at_least(1), default=None, help="CPU threads (default: cores, at most 8)")
    p.add_argument("-ngl", "--n-gpu-layers", type=at_least(0), default=0,
                   help="layers to offload to a GPU (default 0; a large number offloads all)")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none anyway when stderr is not a terminal)")


@contextlib.contextmanager
def progress(args: argparse.Namespace, desc: str, unit: str, total: int | None = None,
             initial: int = 0, leave: bool = False, **tqdm_options: Any) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar on stderr when stderr is a terminal and --no-progress is not given: yields its update
    function, else None (piped and redirected runs stay quiet)."""
    if getattr(args, "no_progress", False) or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True,
               leave=leave, **tqdm_options)
    try:
        yield bar.update
    finally:
        bar.close()
