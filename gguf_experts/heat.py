"""Join a routing trace with a model's byte map: per-expert, per-slice, per-layer and per-page access heat.

The trace is streamed chunk by chunk into one ``bincount`` of (layer, expert) per chunk, so memory is
bounded by the chunk size, not the trace size. Everything after the counting is a pure function of the
count matrix and the expert-slice table (``layout.expert_slices``), so it is tested with hand-built tables.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

from .errors import InputError, TraceFormatError
from .formats.counts import ExpertCounts
from .gguf.fingerprint import ModelFingerprint, QuantizationMismatchWarning, check_fingerprint, check_model
from .trace.format import TraceData, TraceHeader
from .trace.reader import DEFAULT_MAX_ROWS, iter_trace_chunks

EXPERT_COLUMNS = ["layer", "expert", "activations", "share", "bytes_per_activation", "bytes_read"]
SLICE_COLUMNS = ["layer", "expert", "name", "base_name", "component", "file", "offset", "size",
                 "activations", "bytes_read"]
LAYER_COLUMNS = ["layer", "tokens", "activations", "bytes_read", "dense_bytes"]
PAGE_COLUMNS = ["file", "page_start", "page_end", "offset_start", "offset_end", "activations", "bytes_read"]


@dataclass
class Counts:
    """What join needs from a trace: activations per (layer, expert) and rows per (layer, phase)."""

    activations: np.ndarray  # int64 [n_layer, n_expert]
    phase_rows: np.ndarray  # int64 [n_layer, 2]: rows (tokens) per layer, prefill and decode
    sequences: int = 0
    records: int = 0
    recovered: bool = False
    dropped_bytes: int = 0

    @classmethod
    def from_expert_counts(cls, counts: ExpertCounts) -> Counts:
        """A count-only input (imatrix, REAP JSON, ...) as join's counts: activations, rows per (layer, phase)."""
        return cls(counts.activations.astype(np.int64), counts.tokens.T.copy())

    @property
    def tokens(self) -> np.ndarray:
        return self.phase_rows.sum(axis=1)


@dataclass
class HeatResult:
    """Byte-level access heat of one trace on one model (the reports are built from these frames)."""

    experts: pd.DataFrame  # EXPERT_COLUMNS, one row per (layer, expert) of every MoE layer
    slices: pd.DataFrame  # SLICE_COLUMNS, one row per expert slice
    layers: pd.DataFrame  # LAYER_COLUMNS
    summary: dict[str, Any] = field(default_factory=dict)

    def pages(self, page_size: int = 4096) -> pd.DataFrame:
        """Heat per file page as runs of equal heat (see ``page_heat``)."""
        return page_heat(self.slices, page_size)


def count_chunks(chunks: Iterable[TraceData], fp: ModelFingerprint) -> Counts:
    """One pass over the chunks: a bincount of layer * n_expert + expert per chunk."""
    n_layer, n_expert = int(fp.n_layer), int(fp.n_expert)
    acts = np.zeros(n_layer * n_expert, np.int64)
    phase_rows = np.zeros(n_layer * 2, np.int64)
    seqs: set[int] = set()
    out = Counts(acts.reshape(n_layer, n_expert), phase_rows.reshape(n_layer, 2))
    for c in chunks:
        out.records += c.n_records
        out.recovered |= c.recovered
        out.dropped_bytes += c.dropped_bytes
        if len(c) == 0:
            continue
        _check_ranges(c, n_layer, n_expert)
        base = c.layer.astype(np.int64) * n_expert
        idx = c.experts + base[:, None]
        acts += np.bincount(idx.ravel(), minlength=n_layer * n_expert)
        phase_rows += np.bincount(c.layer.astype(np.int64) * 2 + c.phase, minlength=n_layer * 2)
        change = np.flatnonzero(c.seq[1:] != c.seq[:-1]) + 1
        seqs.update(np.unique(c.seq[np.r_[0, change]]).tolist())
    out.sequences = len(seqs)
    return out


def _check_ranges(c: TraceData, n_layer: int, n_expert: int) -> None:
    """Ids outside the model cannot come from a capture of it: refuse rather than miscount."""
    lo, hi = int(c.layer.min()), int(c.layer.max())
    if lo < 0 or hi >= n_layer:
        raise TraceFormatError(f"trace has layer {lo if lo < 0 else hi} but the model has {n_layer} layers; "
                               "the trace is damaged or from another model")
    elo, ehi = int(c.experts.min()), int(c.experts.max())
    if elo < 0 or ehi >= n_expert:
        raise TraceFormatError(f"trace has expert id {elo if elo < 0 else ehi} but the model has {n_expert} "
                               "experts; the trace is damaged or from another model")
    if int(c.phase.max()) > 1:
        raise TraceFormatError("trace has a phase other than 0 (prefill) / 1 (decode); the trace is damaged")


def heat(counts: Counts, slices: pd.DataFrame, model_name: str = "", files: list[str] | None = None
         ) -> HeatResult:
    """The heat frames from counts and an expert-slice table (layout.expert_slices columns)."""
    n_layer, n_expert = counts.activations.shape
    s_layer = slices["layer"].to_numpy(dtype=np.int64)
    s_expert = slices["expert_id"].to_numpy(dtype=np.int64)
    size = slices["size"].to_numpy(dtype=np.int64)
    if len(slices) and (s_layer.max() >= n_layer or s_expert.max() >= n_expert or s_layer.min() < 0):
        raise InputError(f"expert slices reach layer {s_layer.max()} / expert {s_expert.max()} but the "
                         f"fingerprint says {n_layer} layers x {n_expert} experts; the byte map is inconsistent")
    slice_acts = counts.activations[s_layer, s_expert]
    sl = pd.DataFrame({
        "layer": s_layer, "expert": s_expert, "name": slices["name"].to_numpy(),
        "base_name": slices["base_name"].to_numpy(), "component": slices["component"].to_numpy(),
        "file": slices["file"].to_numpy(), "offset": slices["offset"].to_numpy(dtype=np.int64),
        "size": size, "activations": slice_acts, "bytes_read": slice_acts * size,
    }, columns=SLICE_COLUMNS)

    per_expert = np.zeros((n_layer, n_expert), np.int64)
    np.add.at(per_expert, (s_layer, s_expert), size)
    tokens = counts.tokens
    moe = np.zeros(n_layer, bool)
    moe[s_layer] = True
    layer_ids = np.flatnonzero(moe | (tokens > 0))
    acts = counts.activations[layer_ids]  # [L, E]
    layer_acts = acts.sum(axis=1)
    share = np.divide(acts, layer_acts[:, None], out=np.zeros(acts.shape), where=layer_acts[:, None] > 0)
    bpa = per_expert[layer_ids]
    ex = pd.DataFrame({
        "layer": np.repeat(layer_ids, n_expert), "expert": np.tile(np.arange(n_expert), len(layer_ids)),
        "activations": acts.ravel(), "share": share.ravel(), "bytes_per_activation": bpa.ravel(),
        "bytes_read": (acts * bpa).ravel(),
    }, columns=EXPERT_COLUMNS)
    layer_bytes = (acts * bpa).sum(axis=1)
    dense = tokens[layer_ids] * bpa.sum(axis=1)
    ly = pd.DataFrame({"layer": layer_ids, "tokens": tokens[layer_ids], "activations": layer_acts,
                       "bytes_read": layer_bytes, "dense_bytes": dense}, columns=LAYER_COLUMNS)

    n_tok = int(tokens.max()) if tokens.size else 0
    top = int(np.argmax(tokens)) if tokens.size else 0
    total_bytes, total_dense = int(layer_bytes.sum()), int(dense.sum())
    summary = {
        "model": model_name, "tokens": n_tok, "sequences": counts.sequences,
        "prefill_tokens": int(counts.phase_rows[top, 0]) if tokens.size else 0,
        "decode_tokens": int(counts.phase_rows[top, 1]) if tokens.size else 0,
        "n_layer_moe": int(moe.sum()), "records": counts.records, "selections": int(counts.activations.sum()),
        "bytes_read": total_bytes, "bytes_per_token": total_bytes / n_tok if n_tok else 0.0,
        "dense_bytes_per_token": total_dense / n_tok if n_tok else 0.0,
        "ratio": total_bytes / total_dense if total_dense else 0.0,
        "files": list(files) if files is not None else sorted(set(sl["file"].tolist())),
        "recovered": counts.recovered, "dropped_bytes": counts.dropped_bytes,
    }
    return HeatResult(experts=ex, slices=sl, layers=ly, summary=summary)


def page_heat(slices: pd.DataFrame, page_size: int = 4096) -> pd.DataFrame:
    """Activations per file page, as runs of pages with equal heat (never a dense array over the file).

    A page's heat is the number of activations whose slices touch it: memory traffic, not disk reads
    (llama.cpp prefetches the whole mapping; see the README). Pages of cold experts (heat 0) are listed;
    pages of no expert slice (attention, norms) are not.
    bytes_read is heat x the run's bytes (page granular: a partly used page is read whole).
    """
    if page_size <= 0 or page_size & (page_size - 1):
        raise InputError(f"--page-size {page_size}: must be a positive power of two (e.g. 4096)")
    parts = []
    sized = slices[slices["size"] > 0]
    for fname, g in sized.groupby("file", sort=True):
        off = g["offset"].to_numpy(dtype=np.int64)
        first = off // page_size
        last = (off + g["size"].to_numpy(dtype=np.int64) - 1) // page_size
        a = g["activations"].to_numpy(dtype=np.int64)
        at = np.concatenate([first, last + 1])
        order = np.argsort(at, kind="stable")
        at_s = at[order]
        cum_h = np.cumsum(np.concatenate([a, -a])[order])
        cum_c = np.cumsum(np.concatenate([np.ones_like(a), -np.ones_like(a)])[order])
        lastof = np.flatnonzero(np.r_[at_s[1:] != at_s[:-1], True])  # last event at each page
        pts, h, cov = at_s[lastof], cum_h[lastof][:-1], cum_c[lastof][:-1]
        start, end = pts[:-1], pts[1:] - 1  # run i covers pages [start, end] with heat h[i]
        keep = cov > 0
        start, end, h = start[keep], end[keep], h[keep]
        new = np.r_[True, (start[1:] != end[:-1] + 1) | (h[1:] != h[:-1])] if len(h) else np.zeros(0, bool)
        heads = np.flatnonzero(new)
        tails = np.r_[heads[1:] - 1, len(h) - 1] if len(h) else heads
        rs, re_, rh = start[heads], end[tails], h[heads]
        parts.append(pd.DataFrame({
            "file": fname, "page_start": rs, "page_end": re_, "offset_start": rs * page_size,
            "offset_end": (re_ + 1) * page_size, "activations": rh,
            "bytes_read": rh * (re_ - rs + 1) * page_size,
        }, columns=PAGE_COLUMNS))
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object if c == "file" else np.int64) for c in PAGE_COLUMNS})
    return pd.concat(parts, ignore_index=True)


def _chunks(trace: Any, max_rows: int) -> tuple[Iterator[TraceData], str]:
    if isinstance(trace, (str, os.PathLike)):
        return iter_trace_chunks(trace, max_rows=max_rows, weights=False), str(trace)
    if isinstance(trace, TraceData):
        return iter([trace]), "trace"
    return iter(trace), "trace"


def join(trace: Any, model: Any, max_rows: int = DEFAULT_MAX_ROWS, counts: Counts | None = None,
         name: str | None = None) -> HeatResult:
    """Heat of a trace (path, TraceData, iterable of chunks, or formats.ExpertCounts) on a model (path or
    gguf_file.Model). ``counts``: the trace's counts, made elsewhere (by Dask workers, fleet_dask); the trace
    then gives only its first chunk, whose header is checked against the model. ``name``: the trace's name in
    messages (default: its path, or 'trace').

    Raises ModelMismatchError when the trace was captured from another model; warns
    (QuantizationMismatchWarning) when only the quantization differs.
    """
    from .gguf.reader import Model, open_model
    from .gguf.layout import expert_slices
    from .gguf.expert_ids import model_view, to_original

    m = model if isinstance(model, Model) else open_model(model)
    if isinstance(trace, ExpertCounts):  # a count-only input (imatrix, tracer or REAP JSON): no sequences
        from .gguf.fingerprint import fingerprint

        fp = fingerprint(m)
        trace.check_model(fp, trace.source or "counts")
        res = heat(Counts.from_expert_counts(trace.resized(fp.n_layer)), expert_slices(m), model_name=m.name,
                   files=[s.path.name for s in m.shards])
        res.summary["source_format"] = trace.source
        return res
    chunks, where = _chunks(trace, max_rows)
    where = name or where
    first = next(chunks, None)
    if first is None:
        raise InputError(f"{where}: no trace data given")
    fp0 = first.header.fingerprint
    if not fp0.tensor_digest:  # made from a foreign log without the model: checked by shape, then counted as its
        from .gguf.fingerprint import fingerprint_for
        from .gguf.fingerprint import fingerprint

        mfp = fingerprint(m)
        fingerprint_for(where, mfp, fp0.n_layer, fp0.n_expert, fp0.n_expert_used)
        first.header = TraceHeader(first.header.version, mfp, first.header.meta)
    # a trace of a pruned model speaks in the original model's expert ids (prune_map)
    chunks = to_original(chain([first], chunks), m)
    first = next(chunks)
    model_fp, pruned = model_view(m)
    msg = None
    if pruned is not None:  # a pruned model: checked against (and its slices labelled with) the original's ids
        msg = check_fingerprint(first.header.fingerprint, model_fp, trace_name=where, model_name=str(m.path))
        if msg:
            warnings.warn(QuantizationMismatchWarning(msg), stacklevel=2)
    elif fp0.tensor_digest:
        msg = check_model(first.header.fingerprint, m, where)
    slices = expert_slices(m) if pruned is None else pruned.relabel(expert_slices(m))
    if counts is None:
        counts = count_chunks(chain([first], chunks), first.header.fingerprint)
    res = heat(counts, slices, model_name=m.name, files=[s.path.name for s in m.shards])
    if msg:
        res.summary["warning"] = msg
    return res
