"""A trace whose header the C tracer (``gguf-experts run``) left pending: the C side cannot hash the model's
tensor list, so it writes the model path, empty digests and a ``.seqs`` sidecar of sequences. The reader
completes such a header in memory (``complete_header``); ``run``'s ``finalize`` writes it into the file.

Here rather than in trace/preload/run.py so that reading a trace never imports the launcher (see docs/run.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GGUFExpertsError
from ..gguf.fingerprint import model_fingerprint
from .format import TraceHeader

#: sidecar columns, one line per trace sequence (written by the C side as sequences start)
SEQ_COLUMNS = ("seq", "context", "llama_seq_id", "request", "first_pos")


def sequences_path(trace: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(trace)}.seqs")


@dataclass
class Sidecar:
    """What the C tracer's ``.seqs`` sidecar says: one line per trace sequence (written as sequences start; a torn
    last line, from a killed program, is dropped), and the counts it writes at exit: ``dropped\tN`` (rows it could
    not record for want of memory; 0 when none is written, as by a killed program: docs/run.md) and
    ``copies\tUBATCHES\tCOPIES`` (keep-alive's device-to-host copies; None without one)."""

    sequences: list[dict[str, int]] = field(default_factory=list)
    dropped: int = 0
    copies: dict[str, int] | None = None


def read_sidecar(path: Path) -> Sidecar:
    out = Sidecar()
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == len(SEQ_COLUMNS) and all(p.lstrip("-").isdigit() for p in parts):
            out.sequences.append(dict(zip(SEQ_COLUMNS, map(int, parts))))
        elif len(parts) == 2 and parts[0] == "dropped" and parts[1].isdigit():
            out.dropped += int(parts[1])
        elif (len(parts) == 3 and parts[0] == "copies" and parts[1].isdigit() and parts[2].isdigit()
              and out.copies is None):
            out.copies = {"ubatches": int(parts[1]), "copies": int(parts[2])}
    return out


def read_sequences(path: Path) -> list[dict[str, int]]:
    """The sidecar's sequence lines as dicts."""
    return read_sidecar(path).sequences


def complete_header(header: TraceHeader, trace: str | os.PathLike[str]) -> TraceHeader:
    """A header written by the C tracer with the digests still pending: filled from the model file it names
    (and its sequence map from the sidecar), in memory. Unchanged when the model is gone (join then refuses)."""
    meta = header.meta
    if not meta.get("fingerprint_pending"):
        return header
    meta = dict(meta)
    fp = header.fingerprint
    model = meta.get("model_path")
    if isinstance(model, str) and os.path.exists(model):
        try:
            fp = model_fingerprint(model)
            meta["fingerprint_pending"] = False
        except GGUFExpertsError:
            pass
    if "sequences" not in meta:
        side = read_sidecar(Path(trace).with_name(str(meta.get("sequences_file", ""))))
        meta["sequences"] = [[r[c] for c in SEQ_COLUMNS] for r in side.sequences]
        meta["sequence_columns"] = list(SEQ_COLUMNS)
        meta["dropped_rows"] = side.dropped
        if side.copies:
            meta["keepalive_copies"] = side.copies
    return TraceHeader(version=header.version, fingerprint=fp, meta=meta, size=header.size)
