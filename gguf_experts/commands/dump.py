"""gguf-experts dump: the byte map of a model (tensors, or per-expert slices)."""
from __future__ import annotations

import argparse

from ..gguf.reader import open_model
from ..gguf.layout import byte_columns, memory_map
from ..reporters.tabular import Output, add_output_options, emit

NAME = "dump"
HELP = "byte map of a GGUF model: every tensor (or expert slice) with file, offset and size"
ORDER = 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="GGUF file (any shard of a split model)")
    p.add_argument("--split-experts", action="store_true",
                   help="one row per expert of every *_exps tensor (weights, biases, scales)")
    add_output_options(p)


def run(args: argparse.Namespace) -> int:
    model = open_model(args.model)
    cols = byte_columns(model, split_experts=args.split_experts)  # no pandas: start-up matters here

    def text() -> str:
        from ..reporters.model_table import model_table

        return model_table(model)

    emit(Output(cols, document=lambda: memory_map(model, cols), text=text), args.format, args.output)
    return 0
