"""Routing traces: the file format (format.py), writing (writer.py), reading (reader.py) and live capture
from llama.cpp (capture.py, imported lazily: it needs llama-cpp-python)."""
from __future__ import annotations

from typing import Any

from .format import (
    MAGIC,
    PHASE_DECODE,
    PHASE_PREFILL,
    VERSION,
    IoTable,
    ModelFingerprint,
    TraceData,
    TraceHeader,
    TraceRecoveryWarning,
    check_fingerprint,
    concat,
)
from .reader import iter_trace_chunks, read_trace, read_trace_header
from .writer import TraceWriter

__all__ = [
    "MAGIC", "VERSION", "PHASE_PREFILL", "PHASE_DECODE", "IoTable", "ModelFingerprint", "TraceData", "TraceHeader",
    "TraceRecoveryWarning", "TraceWriter", "check_fingerprint", "concat", "iter_trace_chunks", "read_trace",
    "read_trace_header",
]


def __getattr__(name: str) -> Any:
    """``Recorder`` and ``capture`` live in capture.py, which imports llama-cpp-python: load on first use."""
    if name in ("Recorder", "capture"):
        import importlib  # not `from . import capture`: that looks up this __getattr__ again and recurses

        return getattr(importlib.import_module(f"{__name__}.capture"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
