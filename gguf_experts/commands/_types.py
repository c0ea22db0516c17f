"""argparse value types that refuse what --help rules out (negative counts, zero sizes), so a bad option is one
line and exit 2 before any work, in every command alike."""
from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """An int type for argparse that refuses values below ``minimum``."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value
    convert.__name__ = f"int >= {minimum}"
    return convert
