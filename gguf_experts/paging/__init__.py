"""Paging forecast: replay a routing trace through a model of the Linux page cache (C core, pagesim.c) and
say how many bytes the kernel reads per token for a RAM budget, read-ahead and paging mode (docs/forecast.md).

Public API: :func:`gguf_experts.paging.forecast.forecast` (one DataFrame row per budget and advice),
:func:`gguf_experts.paging.forecast.recommend`, :mod:`gguf_experts.paging.disk` (device read-ahead, disk
model, ``measure_disk``), :mod:`gguf_experts.paging.model` (page ranges and the RAM llama.cpp takes).
"""
from __future__ import annotations

ADVICE = ("stock", "random", "prefetch")
