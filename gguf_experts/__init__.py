"""gguf-experts: byte-exact expert maps, live routing traces and cache analysis for MoE GGUF models."""
from __future__ import annotations

__version__ = "0.4.0"

__all__ = ["Recorder", "capture", "__version__"]


def __getattr__(name: str) -> object:
    """``Recorder`` and ``capture`` load llama-cpp-python only when used (the [live] extra)."""
    if name in ("Recorder", "capture"):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.trace.live.capture"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
