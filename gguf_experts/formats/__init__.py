"""Formats other tools write (and we write back): llama-imatrix GGUF, tracer JSON statistics, llama-expert-profile
REAP JSON, llama-moe-trace CSV, mbolt MBLT, fitz-tec RTRACE01. Detected by content. Ordered formats load as a
TraceData, count-only formats as ExpertCounts. See README "Formats other tools write"."""
from __future__ import annotations

from .counts import ExpertCounts
from .load import FORMATS, Input, NeedsTraceError, detect_format, load_counts, load_trace, open_input
from .write import COUNT_WRITERS, ORDERED_WRITERS, write_counts, write_ordered

__all__ = ["ExpertCounts", "FORMATS", "Input", "NeedsTraceError", "detect_format", "load_counts", "load_trace",
           "open_input", "COUNT_WRITERS", "ORDERED_WRITERS", "write_counts", "write_ordered"]
