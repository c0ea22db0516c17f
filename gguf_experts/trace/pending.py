"""A trace whose header the C tracer (``gguf-experts run``) left pending: the C side cannot hash the model's
tensor list, so it writes the model path, empty digests and a ``.seqs`` sidecar of sequences. The reader
completes such a header in memory (``complete_header``); ``run``'s ``finalize`` writes it into the file.

Here rather than in trace/preload/run.py so that reading a trace never imports the launcher (see docs/run.md).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import GGUFExpertsError
from ..gguf.fingerprint import model_fingerprint
from .format import TraceHeader

#: sidecar columns, one line per trace sequence (written by the C side as sequences start)
SEQ_COLUMNS = ("seq", "context", "llama_seq_id", "request", "first_pos")


def sequences_path(trace: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(trace)}.seqs")


def read_sequences(path: Path) -> list[dict[str, int]]:
    """The sidecar's lines as dicts (a torn last line, from a killed program, is dropped)."""
    rows: list[dict[str, int]] = []
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != len(SEQ_COLUMNS) or not all(p.lstrip("-").isdigit() for p in parts):
            continue
        rows.append(dict(zip(SEQ_COLUMNS, map(int, parts))))
    return rows


def read_dropped(path: Path) -> int:
    """Rows the C tracer could not record (out of memory), from the sidecar's ``dropped\tN`` line written at
    exit; 0 when there is none (a program killed before its exit reports nothing: see docs/run.md)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return 0
    counts = [int(p[1]) for p in (line.split("\t") for line in text.splitlines())
              if len(p) == 2 and p[0] == "dropped" and p[1].isdigit()]
    return sum(counts)


def read_copies(path: Path) -> dict[str, int] | None:
    """Keep-alive's device-to-host copies, from the sidecar's ``copies\tUBATCHES\tCOPIES`` line written at the
    end (None when there is none: the callback, or a program killed before its exit)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None
    for parts in (line.split("\t") for line in text.splitlines()):
        if len(parts) == 3 and parts[0] == "copies" and parts[1].isdigit() and parts[2].isdigit():
            return {"ubatches": int(parts[1]), "copies": int(parts[2])}
    return None


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
        seqs = read_sequences(Path(trace).with_name(str(meta.get("sequences_file", ""))))
        meta["sequences"] = [[r[c] for c in SEQ_COLUMNS] for r in seqs]
        meta["sequence_columns"] = list(SEQ_COLUMNS)
        sidecar = Path(trace).with_name(str(meta.get("sequences_file", "")))
        meta["dropped_rows"] = read_dropped(sidecar)
        copies = read_copies(sidecar)
        if copies:
            meta["keepalive_copies"] = copies
    return TraceHeader(version=header.version, fingerprint=fp, meta=meta, size=header.size)
