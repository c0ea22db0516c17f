"""``forecast``: replay a trace's accesses in llama.cpp's order through the page-cache model (pagesim.c) for
each RAM budget and paging mode, and turn the kernel's reads into bytes, faults and tokens/s per phase.

Library API (used by ``gguf-experts forecast`` and the paging harness)::

    df = forecast(trace, model, budgets=[9 << 30], advice=("stock", "random", "prefetch"), readahead_kb=8192,
                  ctx_size=2048, disk=DiskModel(1900, 19300, "given"), measured=None)

``trace``: a trace path (any ordered input), a TraceData or an iterable of TraceData chunks; ``model``: a path or
an open Model. ``measured`` (optional): one row per ubatch with columns phase, n_tokens, read_bytes, majflt,
wall_ns (-1 = unknown), as the trace's IoTable carries them; chunks with an ``io`` table are collected when
``measured`` is None. One row per (budget, advice); ``df.attrs`` holds the RAM model, disk model and notes.
"""
from __future__ import annotations

import ctypes
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ..gguf.reader import Model, open_model
from ..trace.format import VERSION, TraceData, TraceHeader
from . import ADVICE, native
from .disk import DEFAULT_IOPS, DEFAULT_SEQ_MBPS, DiskModel
from .model import PAGE, PageLayout, check_budgets, page_layout, ram_model, reclaim_batch_pages

MODES = {"stock": 0, "random": 1, "prefetch": 2}
WHOLE_FRAC = 0.5  # GGUF_EXPERTS_PREFETCH_WHOLE's default (PAGING_SPEC.md)
#: Bytes per MADV_WILLNEED call of a step-wise prefetch whose calls are longer than the kernel reads (it reads at most
#: max(io_pages, ra_pages) pages of each call). 0: `run --paging prefetch` as it is, whose calls are cut to that cap
#: (trace/preload/ggexp_paging.c g_step), so every selected byte is read.
PREFETCH_STEP = 0
WARMUP_TOKENS = (1, 2)  # llama.cpp's warm-up decodes BOS and EOS (token_embd rows; routing: startup_selections)
STARTUP_ROWS = 1 << 16  # trace rows whose routing frequencies stand in for the start-up's unknown rows
SEQ_RM_TOKENS = (0, 0)  # llama-server's partial-removal check (common_context_can_seq_rm)
MEASURED_COLUMNS = ("phase", "n_tokens", "read_bytes", "majflt", "wall_ns")


@dataclass
class Records:
    """One chunk of trace rows as replay records: one per (ubatch, MoE block), in order."""

    ub: np.ndarray  # int64 global ubatch id
    layer: np.ndarray  # int32
    sel: np.ndarray  # uint8 [n_rec, n_expert]: the union of the ubatch's selections at that block
    tok_off: np.ndarray  # int64 [n_rec + 1]
    tok: np.ndarray  # int32
    ub_new: np.ndarray  # bool: this record starts its ubatch
    phase: np.ndarray  # uint8 per record
    seq: np.ndarray  # int32 per record
    n_rows: np.ndarray  # int64 per record (the ubatch's tokens)

    def __len__(self) -> int:
        return int(self.ub.shape[0])


@dataclass
class _Grouper:
    """Rows -> records -> ubatches, across chunks: a ubatch starts where the block index does not increase (or
    the sequence or phase changes); the last record of a chunk waits for the next chunk (it may go on there)."""

    n_expert: int
    n_block: int
    ub: int = -1
    prev: tuple[int, int, int] | None = None
    carry: dict[str, np.ndarray] | None = None

    def feed(self, chunk: TraceData | None) -> Records:
        parts = [self.carry] if self.carry is not None else []
        if chunk is not None and len(chunk):
            parts.append({"layer": chunk.layer.astype(np.int32), "seq": chunk.seq.astype(np.int32),
                          "phase": chunk.phase.astype(np.uint8), "token": chunk.token.astype(np.int32),
                          "experts": chunk.experts.astype(np.int32)})
        self.carry = None
        if not parts:
            return _empty_records(self.n_expert)
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        lay, seq, ph = rows["layer"], rows["seq"], rows["phase"]
        n = len(lay)
        brk = np.ones(n, bool)
        brk[1:] = (lay[1:] != lay[:-1]) | (seq[1:] != seq[:-1]) | (ph[1:] != ph[:-1])
        starts = np.flatnonzero(brk)
        final = chunk is None
        cut = n if final else int(starts[-1])
        if not final:
            self.carry = {k: v[cut:] for k, v in rows.items()}
            starts = starts[:-1]
        if cut == 0:
            return _empty_records(self.n_expert)
        r_layer, r_seq, r_ph = lay[starts], seq[starts], ph[starts]
        p_layer = np.empty_like(r_layer)
        p_seq, p_ph = np.empty_like(r_seq), np.empty_like(r_ph)
        p_layer[1:], p_seq[1:], p_ph[1:] = r_layer[:-1], r_seq[:-1], r_ph[:-1]
        if self.prev is None:
            p_layer[0], p_seq[0], p_ph[0] = np.iinfo(np.int32).max, r_seq[0], r_ph[0]
        else:
            p_layer[0], p_seq[0], p_ph[0] = self.prev
        new = (r_layer <= p_layer) | (r_seq != p_seq) | (r_ph != p_ph)
        ub = self.ub + np.cumsum(new)
        self.ub = int(ub[-1])
        self.prev = (int(r_layer[-1]), int(r_seq[-1]), int(r_ph[-1]))
        bounds = np.append(starts, cut).astype(np.int64)
        counts = np.diff(bounds)
        ex = rows["experts"][:cut]
        rec = np.repeat(np.arange(len(starts)), counts)
        sel = np.zeros((len(starts), self.n_expert), np.uint8)
        ok = (ex >= 0) & (ex < self.n_expert)
        sel[np.broadcast_to(rec[:, None], ex.shape)[ok], ex[ok]] = 1
        return Records(ub=ub.astype(np.int64), layer=np.clip(r_layer, 0, self.n_block - 1).astype(np.int32),
                       sel=sel, tok_off=bounds, tok=rows["token"][:cut].copy(), ub_new=new, phase=r_ph,
                       seq=r_seq, n_rows=counts)


def _empty_records(n_expert: int) -> Records:
    z = np.zeros(0, np.int64)
    return Records(ub=z, layer=np.zeros(0, np.int32), sel=np.zeros((0, n_expert), np.uint8),
                   tok_off=np.zeros(1, np.int64), tok=np.zeros(0, np.int32), ub_new=np.zeros(0, bool),
                   phase=np.zeros(0, np.uint8), seq=np.zeros(0, np.int32), n_rows=z)


def _ptr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


class PageSim:
    """One simulated page cache (budget, read-ahead, disk) with the layout's replay state."""

    def __init__(self, layout: PageLayout, budget_pages: int, mode: str, ra_pages: int, io_pages: int,
                 disk: DiskModel, whole_frac: float = WHOLE_FRAC, prefetch_step: int = PREFETCH_STEP,
                 reclaim_batch: int = 0) -> None:
        self.lib = native.lib()
        self.layout = layout
        self.mode = mode
        self.handle = self.lib.sim_new(layout.n_pages, budget_pages, ra_pages, io_pages, disk.latency,
                                       disk.sec_per_page)
        if not self.handle:
            raise MemoryError("pagesim: out of memory")
        self.lib.sim_set_reclaim_batch(self.handle, reclaim_batch)
        lo = layout
        self._keep = [lo.ne_idx, lo.ne_a, lo.ne_b, lo.ex_idx, lo.ex_base, lo.ex_slice]
        self.replay = native.Replay(lo.n_block, lo.n_expert, *(_ptr(a) for a in self._keep), lo.embd_off,
                                    lo.embd_row, MODES[mode], whole_frac, -1, -1, prefetch_step // PAGE)
        if mode != "stock":  # MADV_RANDOM on the *_exps tensors only
            for a, b in lo.expert_ranges:
                self.lib.sim_set_rand(self.handle, a, b, 1)
        self._log: np.ndarray | None = None

    def close(self) -> None:
        if self.handle:
            self.lib.sim_free(self.handle)
            self.handle = None

    def __enter__(self) -> "PageSim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_ops(self, cap: int) -> None:
        """Record up to ``cap`` operations (kind 0 touch, 1 WILLNEED as asked (the kernel caps it), 2 sequential read;
        page ranges [a, b)): what a plain-mmap replay must do to match (tests/test_forecast_pagecache.py)."""
        self._log = np.zeros((cap, 3), np.int64)
        self.lib.sim_set_log(self.handle, ctypes.c_void_p(_ptr(self._log)), ctypes.c_int64(cap))

    def ops(self) -> np.ndarray:
        if self._log is None:
            return np.zeros((0, 3), np.int64)
        n = self.lib.sim_log_n(self.handle)
        return self._log[:n].copy()

    def counters(self, reset: bool = True) -> dict[str, float]:
        out = np.zeros(native.NCOUNT, np.float64)
        self.lib.sim_counters(self.handle, _ptr(out), int(reset))
        return dict(zip(native.COUNTERS, out.tolist()))

    def load(self, populate: bool, startup: Sequence[tuple[np.ndarray, Sequence[int]]] = ()) -> dict[str, float]:
        """llama.cpp's load: MAP_POPULATE (every page, in order) and posix_madvise(WILLNEED) over the file when
        ``populate``; then the start-up decodes: one ubatch per (selection [n_block, n_expert], tokens) of
        ``startup`` (see ``startup_selections``). Returns its counters."""
        lo = self.layout
        if populate:
            self.lib.sim_touch(self.handle, 0, lo.n_pages)
            self.lib.sim_willneed(self.handle, 0, lo.n_pages)
        if lo.moe_blocks:
            n = len(lo.moe_blocks)
            blocks = np.array(lo.moe_blocks, np.int32)
            for i, (sel, toks) in enumerate(startup):
                rec = Records(ub=np.full(n, -2 - i, np.int64), layer=blocks,
                              sel=np.ascontiguousarray(sel[blocks], np.uint8),
                              tok_off=np.array([0] + [len(toks)] * n, np.int64), tok=np.array(toks, np.int32),
                              ub_new=np.zeros(n, bool), phase=np.zeros(n, np.uint8), seq=np.zeros(n, np.int32),
                              n_rows=np.ones(n, np.int64))
                self.run(rec, flush=True)
        return self.counters(reset=True)

    def run(self, rec: Records, flush: bool) -> np.ndarray:
        """Replay records; rows [ubatch id, counters...] of the ubatches finished."""
        out = np.zeros((len(rec) + 2, native.NCOUNT + 1), np.float64)
        sel = np.ascontiguousarray(rec.sel, np.uint8)
        n = self.lib.sim_replay(self.handle, ctypes.byref(self.replay), len(rec), _ptr(rec.ub), _ptr(rec.layer),
                                _ptr(sel), _ptr(rec.tok_off), _ptr(rec.tok), int(flush), _ptr(out))
        return out[:n]


def iter_chunks(trace: Any, model_path: str | None = None) -> tuple[Any, Iterator[TraceData]]:
    """(header or None, chunks) of a trace path, a TraceData or an iterable of chunks."""
    if isinstance(trace, TraceData):
        return trace.header, iter([trace])
    if isinstance(trace, (str, bytes)) or hasattr(trace, "__fspath__"):
        from ..formats.load import open_input
        from ..gguf.expert_ids import original_input

        inp = original_input(open_input(str(trace), model_path))
        inp.require_order()
        assert inp.header is not None and inp.chunks is not None
        return inp.header, iter(inp.chunks)
    return None, iter(trace)


@dataclass
class SimResult:
    """One simulation: the load pass's counters and one row per ubatch of the trace."""

    load: dict[str, float]
    ubatches: pd.DataFrame
    ops: np.ndarray | None = None
    measured: pd.DataFrame | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def startup_selections(head: Sequence[TraceData], n_block: int, n_expert: int, seed: int = 0,
                        max_rows: int = STARTUP_ROWS) -> list[np.ndarray] | None:
    """[n_block, n_expert] uint8 selections of llama-server's two start-up decodes, in order: the warm-up (BOS, EOS
    at positions 0 and 1; common/common.cpp common_init_from_params) and the partial-removal check (tokens 0, 0 at
    positions 0 and 1; common_context_can_seq_rm, from server_context's load_model). Both are routed like any
    other ubatch: the pinned llama.cpp never calls ``llama_set_warmup``, so ``n_expert_used`` stays top-k. The
    last block runs only the row that asks for logits (llama.cpp's ``inp_out_ids``), so it selects the second
    row's experts only. The tracer leaves these decodes out; BOS at position 0 routes exactly as the trace's first
    row of its first sequence when the prompt starts with BOS (llama-server adds it: same token, same position,
    causal attention). The check's two rows route alike: the same token at positions 0 and 1, and RoPE rotates
    only queries and keys, so position 1 attends over two equal values and every layer's hidden state equals
    position 0's. EOS and token 0 are unknown: each is drawn (seeded) from the trace's own routing frequencies
    per block, top-k distinct experts. (Checked against the measured load of the paging harness's random mode, whose
    4 KiB faults count the start-up's expert bytes: 15.5 / 21.5 distinct experts per block measured for its two
    routing shapes, 16.1 / 22.2 expected from these draws.) ``head``: the trace's first chunks; the frequencies
    come from its first ``max_rows`` rows whatever the chunking. None (every expert selected) without rows."""
    head = [c for c in head if len(c) and getattr(c, "pos", None) is not None]
    if not head:
        return None

    def col(name: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(c, name)) for c in head])[:max_rows]

    seq, pos, ex = col("seq"), col("pos"), col("experts")
    lay = np.clip(col("layer"), 0, n_block - 1)
    k = ex.shape[1]
    ok = (ex >= 0) & (ex < n_expert)
    freq = np.zeros((n_block, n_expert))
    np.add.at(freq, (np.broadcast_to(lay[:, None], ex.shape)[ok], ex[ok]), 1.0)
    bos = np.zeros((n_block, n_expert), np.uint8)
    m = (seq == seq[0]) & (pos == 0)
    bos[np.broadcast_to(lay[m][:, None], ex[m].shape)[ok[m]], ex[m][ok[m]]] = 1
    rng = np.random.default_rng(seed)
    blocks = np.flatnonzero(freq.sum(1) > 0)
    last = int(blocks[-1]) if len(blocks) else n_block - 1

    def draw() -> np.ndarray:
        out = np.zeros((n_block, n_expert), np.uint8)
        for b in blocks:  # n_block draws per start-up row: not per token
            p = freq[b] / freq[b].sum()
            out[b, rng.choice(n_expert, min(k, int((p > 0).sum())), replace=False, p=p)] = 1
        return out

    eos, probe = draw(), draw()
    warm = bos | eos
    warm[last] = eos[last]
    return [warm, probe]


def simulate(chunks: Iterable[TraceData], layout: PageLayout, budget_pages: int, mode: str, ra_pages: int,
             io_pages: int, disk: DiskModel, populate: bool = True, warmup: bool | str = True,
             whole_frac: float = WHOLE_FRAC, log_ops: int = 0, prefetch_step: int = PREFETCH_STEP,
             reclaim_batch: int = 0) -> SimResult:
    """Replay ``chunks`` (streamed: bounded memory) through one page cache. ``warmup``: True: llama-server's two
    start-up decodes routed as ``startup_selections`` takes them from the trace's first rows; "check": only the
    partial-removal check (llama-server started with ``--no-warmup``); "all": one warm-up with every expert
    selected (llama.cpp versions that call ``llama_set_warmup``); False: none (the trace alone)."""
    grouper = _Grouper(layout.n_expert, layout.n_block)
    rows, meta, measured = [], [], []
    it = iter(chunks)
    head: list[TraceData] = []
    while sum(len(c) for c in head) < STARTUP_ROWS and (c := next(it, None)) is not None:
        head.append(c)
    sels = startup_selections(head, layout.n_block, layout.n_expert) if warmup not in (False, "all") else None
    startup: list[tuple[np.ndarray, Sequence[int]]] = []
    if warmup == "all" or (warmup and sels is None):
        startup.append((np.ones((layout.n_block, layout.n_expert), np.uint8), WARMUP_TOKENS))
    elif warmup and sels is not None:
        if warmup != "check":
            startup.append((sels[0], WARMUP_TOKENS))
        startup.append((sels[1], SEQ_RM_TOKENS))
    chunks = itertools.chain(head, it)
    with PageSim(layout, budget_pages, mode, ra_pages, io_pages, disk, whole_frac, prefetch_step,
                 reclaim_batch) as sim:
        if log_ops:
            sim.log_ops(log_ops)
        load = sim.load(populate, startup)
        for chunk in _with_end(chunks):
            io = getattr(chunk, "io", None)  # trace version 2: one measurement per ubatch (IoTable)
            if io is not None:
                measured.append(io)
            rec = grouper.feed(chunk)
            rows.append(sim.run(rec, flush=chunk is None))
            if len(rec):
                m = rec.ub_new
                meta.append(pd.DataFrame({"ubatch": rec.ub[m], "phase": rec.phase[m], "seq": rec.seq[m],
                                          "n_tokens": rec.n_rows[m]}))
        ops = sim.ops() if log_ops else None
    out = np.concatenate(rows) if rows else np.zeros((0, native.NCOUNT + 1))
    df = pd.DataFrame(out[:, 1:], columns=list(native.COUNTERS))
    df.insert(0, "ubatch", out[:, 0].astype(np.int64))
    info = pd.concat(meta, ignore_index=True) if meta else pd.DataFrame(
        {"ubatch": [], "phase": [], "seq": [], "n_tokens": []})
    df = info.merge(df, on="ubatch", how="right")
    mdf = None
    if measured:
        mdf = pd.DataFrame({c: np.concatenate([np.asarray(getattr(t, c)) for t in measured])
                            for c in MEASURED_COLUMNS})
    return SimResult(load=load, ubatches=df, ops=ops, measured=mdf)


def _with_end(chunks: Iterable[TraceData]) -> Iterator[TraceData | None]:
    yield from chunks
    yield None


def _phase_sums(df: pd.DataFrame, phase: int) -> dict[str, float]:
    d = df[df["phase"] == phase]
    tokens = float(d["n_tokens"].sum())
    s = {c: float(d[c].sum()) for c in ("read_pages", "majflt", "touched_pages", "missed_pages", "io_s",
                                        "read_requests")}
    s["tokens"] = tokens
    return s


def _timed_phases(measured: pd.DataFrame | None) -> Iterator[tuple[int, pd.DataFrame, pd.Series]]:
    """Per phase with timed ubatches: (phase, its measured rows, their read bytes clipped at 0)."""
    if measured is None or not len(measured):
        return
    m = measured[(measured["wall_ns"] > 0) & (measured["n_tokens"] > 0)]
    for ph in (0, 1):
        d = m[m["phase"] == ph]
        if len(d):
            yield ph, d, d["read_bytes"].clip(lower=0)


def compute_per_token(measured: pd.DataFrame | None, disk: DiskModel) -> dict[int, float | None]:
    """Compute seconds per token by phase, from measured wall times: ubatches that read nothing give it
    directly; otherwise wall minus the disk model's time for what was read (at least a tenth of wall)."""
    out: dict[int, float | None] = {0: None, 1: None}
    for ph, d, rb in _timed_phases(measured):
        quiet = d[rb == 0]
        if len(quiet):
            out[ph] = float(quiet["wall_ns"].sum() / 1e9 / quiet["n_tokens"].sum())
            continue
        io = rb / PAGE * disk.sec_per_page + d["majflt"].clip(lower=0) * disk.latency
        wall = d["wall_ns"] / 1e9
        out[ph] = float(np.maximum(wall - io, 0.1 * wall).sum() / d["n_tokens"].sum())
    return out


def compute_source(measured: pd.DataFrame | None, disk: DiskModel) -> dict[int, str]:
    """Where ``compute_per_token`` took each phase's compute time from, and how much to trust it: quiet ubatches
    (nothing read) give it directly; otherwise it is wall time minus the disk model's time, and when the disk
    model accounts for most of the wall time (a thrashing trace) it is the small difference of two large
    numbers, with the kernel's overlap of I/O and compute on top."""
    out: dict[int, str] = {}
    for ph, d, rb in _timed_phases(measured):
        if (rb == 0).any():
            out[ph] = "ubatches that read nothing"
            continue
        io = float((rb / PAGE * disk.sec_per_page + d["majflt"].clip(lower=0) * disk.latency).sum())
        share = io / max(float(d["wall_ns"].sum()) / 1e9, 1e-12)
        out[ph] = (f"wall minus the disk model's time ({share:.0%} of it)"
                   + ("; unreliable: a trace with cached ubatches gives it directly" if share > 0.5 else ""))
    return out


def measured_summary(measured: pd.DataFrame | None) -> dict[str, float | None]:
    """Measured bytes, faults and tokens/s per token by phase (None where unknown)."""
    out: dict[str, float | None] = {}
    for ph, name in ((0, "prefill"), (1, "decode")):
        d = None if measured is None else measured[(measured["phase"] == ph) & (measured["n_tokens"] > 0)]
        ok = d is not None and len(d) > 0
        tok = float(d["n_tokens"].sum()) if ok else 0.0  # type: ignore[index]
        for col, key in (("read_bytes", "read_per_token"), ("majflt", "majflt_per_token")):
            good = ok and bool((d[col] >= 0).all())  # type: ignore[index]
            out[f"measured_{name}_{key}"] = float(d[col].sum()) / tok if good and tok else None  # type: ignore[index]
        wall = float(d["wall_ns"].sum()) / 1e9 if ok else 0.0  # type: ignore[index]
        out[f"measured_{name}_tok_s"] = tok / wall if wall > 0 else None
    return out


def forecast(trace: Any, model: str | Model, budgets: Sequence[int], advice: Sequence[str] = ADVICE,
             readahead_kb: int | str = "auto", ctx_size: int = 4096, disk: DiskModel | None = None,
             measured: pd.DataFrame | None = None, io_pages: int | None = None, warmup: bool | str = True,
             whole_frac: float = WHOLE_FRAC, keep_ubatches: bool = False,
             prefetch_step: int = PREFETCH_STEP, fadvise_sequential: bool = True,
             reclaim_batch: int | None = None) -> pd.DataFrame:
    """One row per (budget, advice): disk bytes, major faults, hit ratio and tokens/s per token by phase.

    ``budgets``: bytes of RAM available to llama.cpp's process and the page cache; the KV cache, compute
    buffers and process overhead (paging.model.ram_model) are taken off first. ``readahead_kb``: the model
    device's read_ahead_kb, or "auto" (sysfs; InputError when unreadable). ``io_pages``: its max_sectors_kb / 4
    (default: from sysfs, else the read-ahead in pages). ``keep_ubatches``: ``df.attrs["ubatches"][(ram,
    advice)]`` = the per-ubatch counters (seq, phase, n_tokens, majflt, read_pages, io_s, ...), e.g. to compare
    per request with a measured run."""
    from .disk import device_io_pages, device_read_ahead_kb

    m = open_model(model) if not isinstance(model, Model) else model
    bad = [a for a in advice if a not in MODES]
    if bad:
        raise InputError(f"--advice {bad[0]!r}: not a paging mode; give some of {', '.join(ADVICE)}")
    readahead_kb = device_read_ahead_kb(m.path) if readahead_kb == "auto" else readahead_kb
    if not isinstance(readahead_kb, int) or readahead_kb < 0:
        raise InputError(f"--readahead {readahead_kb!r}: must be 0 or more KiB, or auto")
    disk = disk or DiskModel(DEFAULT_SEQ_MBPS, DEFAULT_IOPS, "assumed")
    layout = page_layout(m)
    rm = ram_model(m, ctx_size)
    check_budgets(rm, list(budgets))
    # llama.cpp's mmap (llama-mmap.cpp) first calls posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL), which sets the
    # file's ra_pages to twice the device's (mm/fadvise.c generic_fadvise): read-around, async windows and the
    # WILLNEED cap on that mapping are all twice read_ahead_kb
    ra_pages = readahead_kb // 4 * (2 if fadvise_sequential else 1)
    batch = reclaim_batch_pages() if reclaim_batch is None else reclaim_batch
    iop = io_pages if io_pages is not None else device_io_pages(m.path, ra_pages)
    header, chunks = iter_chunks(trace, str(m.path))
    reopen = isinstance(trace, str) or hasattr(trace, "__fspath__")
    cached = None if reopen else list(chunks)  # a trace file is streamed again for every simulation

    def source() -> Iterator[TraceData]:
        return iter(cached) if cached is not None else iter_chunks(trace, str(m.path))[1]

    if header is not None:
        _check_trace(header.fingerprint, m, str(trace) if reopen else "the trace")
    rows = []
    kept: dict[tuple[int, str], pd.DataFrame] = {}
    meas = measured
    for ram in budgets:
        pc_bytes = rm.page_cache(ram)
        for mode in advice:
            populate = mode == "stock" or layout.file_bytes <= pc_bytes
            res = simulate(source(), layout, pc_bytes // PAGE, mode, ra_pages, iop, disk, populate=populate,
                           warmup=warmup, whole_frac=whole_frac, prefetch_step=prefetch_step,
                           reclaim_batch=batch)
            if meas is None and res.measured is not None:
                meas = res.measured
            rows.append(_row(ram, pc_bytes, mode, res))
            if keep_ubatches:
                kept[(ram, mode)] = res.ubatches
    df = pd.DataFrame(rows)
    comp = compute_per_token(meas, disk)
    _add_rates(df, comp)
    ms = measured_summary(meas)
    if meas is not None:
        for k, v in ms.items():
            df[k] = v
    df.attrs.update({"ram_model": rm.as_dict(), "disk": {"seq_mbps": disk.seq_mbps, "iops": disk.iops,
                                                         "source": disk.source},
                     "readahead_kb": readahead_kb, "ra_pages": ra_pages, "io_pages": iop, "ctx_size": ctx_size,
                     "reclaim_batch_pages": batch,
                     "compute_s_per_token": {"prefill": comp[0], "decode": comp[1]},
                     "compute_source": {("prefill", "decode")[k]: v for k, v in compute_source(meas, disk).items()},
                     "measured": meas is not None, "model_bytes": layout.file_bytes,
                     "nonexpert_bytes": layout.nonexpert_bytes})
    if keep_ubatches:
        df.attrs["ubatches"] = kept
    return df


def _check_trace(fp: Any, m: Model, name: str) -> None:
    """The trace must be of this model (names and shapes when the trace carries them, else the counts)."""
    if fp.tensor_digest:
        from ..gguf.fingerprint import check_model

        check_model(fp, m, name)
    elif (fp.n_layer, fp.n_expert) != (m.block_count, m.expert_count):
        raise InputError(f"{name} has {fp.n_layer} layers x {fp.n_expert} experts, model {m.path} "
                         f"{m.block_count} x {m.expert_count}: give the model the trace was captured from")


def _add_rates(df: pd.DataFrame, comp: dict[int, float | None]) -> None:
    """tokens/s per phase = 1 / (I/O + compute seconds per token); NaN where both are zero (unbounded)."""
    for ph, name in ((0, "prefill"), (1, "decode")):
        io = df[f"{name}_io_s_per_token"]
        c = comp[ph]
        total = io + (c if c is not None else 0.0)
        df[f"{name}_tok_s"] = np.where(total > 0, 1.0 / total.where(total > 0, 1.0), np.nan)


def _row(ram: int, pc_bytes: int, mode: str, res: SimResult) -> dict[str, Any]:
    row: dict[str, Any] = {"ram": ram, "page_cache": pc_bytes, "advice": mode}
    hits = []
    for ph, name in ((0, "prefill"), (1, "decode")):
        s = _phase_sums(res.ubatches, ph)
        t = s["tokens"]
        row[f"{name}_tokens"] = int(t)
        row[f"{name}_read_per_token"] = s["read_pages"] * PAGE / t if t else np.nan
        row[f"{name}_majflt_per_token"] = s["majflt"] / t if t else np.nan
        row[f"{name}_hit_ratio"] = 1.0 - s["missed_pages"] / s["touched_pages"] if s["touched_pages"] else np.nan
        row[f"{name}_io_s_per_token"] = s["io_s"] / t if t else np.nan
        hits.append(s)
    row["load_read_bytes"] = res.load["read_pages"] * PAGE
    row["load_majflt"] = res.load["majflt"]
    return row


def synthetic_trace(model: str | os.PathLike[str] | Model, prompt: int = 128, gen: int = 16, seed: int = 0
                    ) -> TraceData:
    """One request of ``prompt`` tokens (one ubatch) then ``gen`` decode tokens, each row's top-k drawn uniformly
    from all of a layer's experts: what `run --paging auto` forecasts with when it has no trace of the workload."""
    from ..gguf.fingerprint import fingerprint
    from ..gguf.names import layer_of

    m = model if isinstance(model, Model) else open_model(model)
    fp = fingerprint(m)
    moe = np.array(sorted({la for t in m.tensors if "_exps" in t.name and (la := layer_of(t.name)) is not None}),
                   np.int32)
    ubatches = [np.arange(prompt)] + [np.array([prompt + i]) for i in range(gen)]
    pos = np.concatenate([np.tile(t, len(moe)) for t in ubatches]).astype(np.int32)
    layer = np.concatenate([np.repeat(moe, len(t)) for t in ubatches]).astype(np.int32)
    rng = np.random.default_rng(seed)
    experts = np.argsort(rng.random((len(layer), fp.n_expert)), axis=1)[:, :fp.n_expert_used].astype(np.int32)
    return TraceData(seq=np.zeros(len(layer), np.int32), phase=(pos >= prompt).astype(np.uint8), pos=pos,
                     token=(3 + pos % 250).astype(np.int32), layer=layer, experts=experts, weights=None,
                     header=TraceHeader(VERSION, fp, {"synthetic": "uniform routing"}))


def recommend(df: pd.DataFrame) -> pd.DataFrame:
    """Per budget, the advice with the best forecast decode tokens/s (then prefill)."""
    d = df.assign(_d=df["decode_tok_s"].fillna(np.inf), _p=df["prefill_tok_s"].fillna(np.inf))
    best = d.sort_values(["ram", "_d", "_p"], ascending=[True, False, False]).groupby("ram", sort=True).head(1)
    return best.drop(columns=["_d", "_p"]).reset_index(drop=True)


def run_command(mode: str, model_path: str, ctx_size: int) -> str:
    """The command line that runs llama-server in the recommended mode (issue 19's ``run --paging``)."""
    return f"gguf-experts run --paging {mode} -- llama-server -m {model_path} -c {ctx_size}"
