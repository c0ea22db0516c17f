"""Helpers for the `gguf-experts run` tests: a trace's rows per sequence, and an in-process capture of the
same tokens (gguf_experts.trace.live.capture.TracedLlama), to compare row by row."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from gguf_experts.trace.format import PHASE_DECODE, PHASE_PREFILL
from gguf_experts.trace.live.llama import MemorySink, TracedLlama
from gguf_experts.gguf.fingerprint import model_fingerprint
from gguf_experts.trace.format import TraceData

Rows = dict[tuple[int, int], tuple[int, tuple[int, ...], tuple[float, ...] | None]]  # (pos, layer) -> row


def rows_of(d: TraceData, seq: int) -> Rows:
    m = d.seq == seq
    w = d.weights[m] if d.weights is not None else None
    out: Rows = {}
    for i, (p, l, ph, e) in enumerate(zip(d.pos[m], d.layer[m], d.phase[m], d.experts[m])):
        key = (int(p), int(l))
        assert key not in out, f"sequence {seq}: position {p} of layer {l} recorded twice (rows mixed)"
        out[key] = (int(ph), tuple(int(x) for x in e), None if w is None else tuple(float(x) for x in w[i]))
    return out


def sequence_tokens(d: TraceData) -> dict[int, tuple[list[int], int, int]]:
    """Per trace sequence: every token of its llama sequence from position 0 (a prefix reused from the
    previous request of the same llama sequence included), the number of prompt tokens (prefill) and the
    first position this request evaluated."""
    cols = d.header.meta["sequence_columns"]
    seqs = [dict(zip(cols, r)) for r in d.header.meta["sequences"]]
    last: dict[tuple[int, int], list[int]] = {}
    out: dict[int, tuple[list[int], int, int]] = {}
    first_layer = int(d.layer.min())
    for s in seqs:
        m = (d.seq == s["seq"]) & (d.layer == first_layer)
        pos, tok, ph = d.pos[m], d.token[m], d.phase[m]
        assert (np.diff(pos) == 1).all(), f"sequence {s['seq']}: positions {pos.tolist()} are not consecutive"
        assert len(pos) == 0 or pos[0] == s["first_pos"]
        key = (s["context"], s["llama_seq_id"])
        prefix = last.get(key, [])[:s["first_pos"]]
        assert len(prefix) == s["first_pos"], f"sequence {s['seq']}: no earlier tokens for its reused prefix"
        toks = prefix + tok.tolist()
        dec = np.flatnonzero(ph == PHASE_DECODE)
        n_prompt = s["first_pos"] + (int(dec[0]) if len(dec) else len(pos))
        cut = n_prompt - s["first_pos"]
        assert (ph[:cut] == PHASE_PREFILL).all() and (ph[cut:] == PHASE_DECODE).all()
        out[s["seq"]] = (toks, n_prompt, s["first_pos"])
        last[key] = toks
    return out


def router_probs(extras_log: list[dict[str, Any]]) -> dict[tuple[int, int], np.ndarray]:
    """(pos, layer) -> the router's ``ffn_moe_probs`` row at that position (the scores the top-k is taken of)."""
    out: dict[tuple[int, int], np.ndarray] = {}
    for ub in extras_log:
        pos, sel = np.asarray(ub["pos"]), np.asarray(ub["out"], dtype=bool)
        for layer, probs in ub.get("ffn_moe_probs", {}).items():
            rows_pos = pos if probs.shape[0] == len(pos) else pos[sel]
            out.update(((int(p), int(layer)), row.copy()) for p, row in zip(rows_pos, probs))
    return out


def flip_margin(probs: np.ndarray, ran: tuple[int, ...], replayed: tuple[int, ...]) -> float:
    """How far from a tie the replay's router was where the program chose differently: the largest gap, over the
    slots that differ, between the probability of the expert the replay put there and of the one the program
    put there. A boundary swap (the k-th for the (k+1)-th expert) gives the gap between the k-th and (k+1)-th
    probabilities, the router margin; a swap of two slots inside the top-k gives their gap. Under a small
    epsilon, the difference is a near-tie that rounding decided, not a mis-routed token."""
    gaps = [abs(float(probs[a]) - float(probs[b])) for a, b in zip(ran, replayed) if a != b]
    return max(gaps, default=0.0)


def capture_requests(model: Path, requests: list[tuple[list[int], int, int]], weights: bool = False,
                     n_ctx: int = 512, probs: list[dict[tuple[int, int], np.ndarray]] | None = None,
                     native: bool = False) -> list[Rows]:
    """The in-process capture of the same tokens, request by request, on one llama sequence: each request
    keeps the first ``first_pos`` tokens of the KV state (as the program did when it reused a prefix),
    prefills the rest of its prompt in one ubatch, then decodes one token at a time. Replaying the history
    matters: a ubatch's shape can flip near-tied routing choices, so the reused prefix must come from the
    same ubatch as in the program. With ``probs`` (a list), the router's probabilities of every row of each
    request are appended to it (router_probs), from the same evaluation."""
    sink = MemorySink()
    out: list[Rows] = []
    fp = model_fingerprint(model)
    with TracedLlama(model, sink, fp, weights=weights, n_ctx=n_ctx, n_threads=2,
                     observe_extra=probs is not None) as llm:
        llm.new_sequence()
        lc = llm.lc
        for tokens, n_prompt, first in requests:
            lc.llama_memory_seq_rm(lc.llama_get_memory(llm._ctx), 0, first, -1)
            llm.n_past = first
            start = len(sink.records)
            start_extra = len(llm.extras_log)
            llm.eval(tokens[first:n_prompt], PHASE_PREFILL)
            for t in tokens[n_prompt:]:
                llm.eval([t], PHASE_DECODE)
            rows: Rows = {}
            for r in sink.records[start:]:
                w = r["weights"]
                for i, p in enumerate(r["pos"]):
                    rows[(int(p), r["layer"])] = (r["phase"], tuple(int(x) for x in r["experts"][i]),
                                                  None if w is None else tuple(float(x) for x in w[i]))
            out.append(rows)
            if probs is not None:
                probs.append(router_probs(llm.extras_log[start_extra:]))
    return out


def _capture_requests_native(model: Path, requests: list[tuple[list[int], int, int]], weights: bool,
                             n_ctx: int) -> list[Rows]:
    import tempfile

    from gguf_experts.trace.live.ggml_ctypes import load_llama_cpp
    from gguf_experts.trace.live.native import NativeTrace
    from gguf_experts.trace.reader import read_trace

    path = Path(tempfile.mkdtemp()) / "replay.bin"
    nt = NativeTrace(path, weights, load_llama_cpp())
    try:
        with TracedLlama(model, MemorySink(), model_fingerprint(model), weights=weights, n_ctx=n_ctx, n_threads=2,
                         native=nt) as llm:
            llm.new_sequence()
            lc = llm.lc
            for tokens, n_prompt, first in requests:
                lc.llama_memory_seq_rm(lc.llama_get_memory(llm._ctx), 0, first, -1)
                llm.n_past = first
                llm.eval(tokens[first:n_prompt], PHASE_PREFILL)
                for t in tokens[n_prompt:]:
                    llm.eval([t], PHASE_DECODE)
    finally:
        nt.finish()
    d = read_trace(path)
    return [rows_of(d, i) for i in range(len(requests))]


def compare(run: Rows, cap: Rows) -> dict[str, Any]:
    """Rows of the run missing from the capture, and rows whose experts (or phase) differ."""
    missing = [k for k in run if k not in cap]
    differ = [k for k in run if k in cap and run[k][:2] != cap[k][:2]]
    return {"rows": len(run), "missing": missing, "differ": differ}


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (for a llama-server under test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(proc: subprocess.Popen[str], port: int, timeout: float = 120) -> bool:
    """Poll a llama-server's /health until it answers 200 (True), or it exits or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def post(port: int, path: str, body: dict[str, Any]) -> Any:
    """POST JSON to a llama-server on the loopback and return its JSON answer."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (clean pages only: fsync first), for a cold start."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
