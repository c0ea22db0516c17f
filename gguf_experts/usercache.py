"""The user cache directory (generated models, preflight results): one rule for every module that keeps files."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$GGUF_EXPERTS_CACHE, else $XDG_CACHE_HOME/gguf-experts, else ~/.cache/gguf-experts."""
    env = os.environ.get("GGUF_EXPERTS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gguf-experts"
