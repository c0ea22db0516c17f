"""Writing what we read: ordered formats from a trace, count formats from counts (atomically)."""
from __future__ import annotations

import json
import os
from typing import Any

from ..atomic import atomic_write
from ..errors import InputError
from ..trace.format import TraceData
from .counts import ExpertCounts

#: format -> what a conversion to it loses
ORDERED_WRITERS: dict[str, str] = {
    "mblt": "sequences, phases, positions, token ids and gate weights (inferred back from passes)",
    "moe-trace-csv": "sequences, phases, positions, token ids and gate weights (inferred back from passes)",
    "rtrace": "sequences, phases and real router probabilities (written: gate weights on the selected experts)",
    "routed-npy": "nothing (.npz: lengths, phases, positions, token ids, sequence ids and weights ride along); "
                  "a bare .npy keeps only the ids of one sequence",
}
COUNT_WRITERS: dict[str, str] = {
    "tracer-json": "token order (counts per layer and expert, with prefill/decode split)",
    "reap-json": "token order; reap/ean_mean only when the input had them",
    "imatrix": "token order and the phase split; in_sum2 is neutral (needs --model for tensor shapes)",
}
EXTENSIONS = {".mblt": "mblt", ".rtrace": "rtrace", ".csv": "moe-trace-csv", ".bin": "trace", ".npz": "routed-npy",
              ".npy": "routed-npy"}


def write_ordered(fmt: str, td: TraceData, path: str | os.PathLike[str]) -> int:
    """Write a trace in an ordered foreign format; returns rows (token x layer) written."""
    if fmt == "mblt":
        from .mblt import encode_mblt

        with atomic_write(path, "wb") as fh:
            fh.write(encode_mblt(td))
        return len(td)
    if fmt == "moe-trace-csv":
        from .moe_trace_csv import write_moe_trace_csv

        with atomic_write(path, "w") as fh:
            write_moe_trace_csv(td, fh)
        return len(td)
    if fmt == "rtrace":
        from .rtrace import write_rtrace

        with atomic_write(path, "wb") as fh:
            return write_rtrace(td, fh)
    if fmt == "routed-npy":
        from .routed import write_routed

        with atomic_write(path, "wb") as fh:
            return write_routed(td, fh, npy=str(path).lower().endswith(".npy"))
    raise InputError(f"--to {fmt}: not an ordered format; choose one of {', '.join(ORDERED_WRITERS)}")


def count_text(fmt: str, counts: ExpertCounts) -> str:
    """The JSON text of a count format."""
    if fmt == "tracer-json":
        from .tracer_json import tracer_document

        return json.dumps(tracer_document(counts), indent=1) + "\n"
    if fmt == "reap-json":
        from .reap_json import reap_document

        return json.dumps(reap_document(counts), indent=1) + "\n"
    raise InputError(f"{fmt}: not a JSON count format")


def write_counts(fmt: str, counts: ExpertCounts, path: str | os.PathLike[str], model: Any = None) -> None:
    """Write counts as tracer-json / reap-json or imatrix (needs the model for its *_exps tensor names and
    shapes)."""
    if fmt == "imatrix":
        if model is None:
            raise InputError("--format imatrix needs --model (the *_exps tensor names and shapes)")
        from ..gguf.reader import Model, open_model
        from .imatrix import write_imatrix

        write_imatrix(path, counts, model if isinstance(model, Model) else open_model(model))
        return
    text = count_text(fmt, counts)
    with atomic_write(path, "w") as fh:
        fh.write(text)
