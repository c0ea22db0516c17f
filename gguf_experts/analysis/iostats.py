"""Measured I/O of a trace (version 2): disk bytes read, major faults and wall time per token, by phase and by
sequence (request), from the per-ubatch ``IoTable`` and the header's ``io_start`` / ``io_load``.

Why per token: a ubatch of 512 prompt tokens and a one-token decode step differ 500x in work; bytes per token is
what `forecast` predicts and what a user compares across RAM budgets. All numpy, one group-by per table.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..trace.format import IoTable

PHASE_LABELS = {0: "prefill", 1: "decode", 2: "mixed"}
ABSENT = ("no measured I/O in this trace (recorded from trace version 2 on, by `capture` and `run`; "
          "a version-1 trace or a converted log has none)")
_COLS = ["ubatches", "tokens", "read_bytes", "majflt", "wall_s", "read_bytes_per_token", "majflt_per_token",
         "tokens_per_s"]


def _known_sum(v: np.ndarray, groups: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group: the sum of known values (>= 0), and whether every value of the group was known."""
    known = v >= 0
    s = np.bincount(groups, weights=np.where(known, v, 0), minlength=n)
    unknown = np.bincount(groups, weights=~known, minlength=n)
    return s, unknown == 0


def _frame(keys: dict[str, np.ndarray], io: IoTable, groups: np.ndarray, n: int) -> pd.DataFrame:
    tokens = np.bincount(groups, weights=io.n_tokens, minlength=n)
    ub = np.bincount(groups, minlength=n)
    rb, rb_ok = _known_sum(io.read_bytes, groups, n)
    mf, mf_ok = _known_sum(io.majflt, groups, n)
    wall = np.bincount(groups, weights=io.wall_ns, minlength=n) / 1e9
    with np.errstate(divide="ignore", invalid="ignore"):
        df = pd.DataFrame({**keys, "ubatches": ub, "tokens": tokens.astype(np.int64),
                           "read_bytes": np.where(rb_ok, rb, np.nan), "majflt": np.where(mf_ok, mf, np.nan),
                           "wall_s": wall,
                           "read_bytes_per_token": np.where(rb_ok & (tokens > 0), rb / tokens, np.nan),
                           "majflt_per_token": np.where(mf_ok & (tokens > 0), mf / tokens, np.nan),
                           "tokens_per_s": np.where(wall > 0, tokens / wall, np.nan)})
    return df[df["ubatches"] > 0].reset_index(drop=True)


def phase_frame(io: IoTable) -> pd.DataFrame:
    """One row per phase present (prefill, decode, mixed: a server ubatch holding both)."""
    ph = io.phase.astype(np.int64)
    df = _frame({"phase": np.array([PHASE_LABELS[i] for i in range(3)])}, io, ph, 3)
    return df


def sequence_io_frame(io: IoTable) -> pd.DataFrame:
    """One row per (sequence, phase); sequence -1 gathers ubatches that held several sequences."""
    seqs, inv = np.unique(io.seq, return_inverse=True)
    ph = io.phase.astype(np.int64)
    groups = inv.astype(np.int64) * 3 + ph
    n = len(seqs) * 3
    keys = {"seq": np.repeat(seqs, 3), "phase": np.tile(np.array(["prefill", "decode", "mixed"]), len(seqs))}
    return _frame(keys, io, groups, n)


def series(io: IoTable) -> dict[str, np.ndarray]:
    """Cumulative time (s, from the first ubatch's start), and per ubatch bytes read and faults: the report's
    "over time" chart. Unknown counters are NaN."""
    t = np.cumsum(io.wall_ns) / 1e9
    return {"t_s": t, "read_bytes": np.where(io.read_bytes >= 0, io.read_bytes, np.nan).astype(np.float64),
            "majflt": np.where(io.majflt >= 0, io.majflt, np.nan).astype(np.float64),
            "n_tokens": io.n_tokens.astype(np.int64), "phase": io.phase.astype(np.int64)}


def io_document(io: IoTable | None, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON form: measured or not, the start state, the load, per phase and per sequence."""
    doc: dict[str, Any] = {"measured": io is not None and len(io) > 0}
    if meta.get("io_start") is not None:
        doc["io_start"] = meta["io_start"]
    if meta.get("io_load") is not None:
        doc["io_load"] = meta["io_load"]
    if not doc["measured"]:
        doc["note"] = ABSENT
        return doc
    assert io is not None
    doc["phases"] = phase_frame(io).to_dict(orient="records")
    doc["sequences"] = sequence_io_frame(io).to_dict(orient="records")
    return doc


def _gib(v: Any) -> str:
    from ..reporters.tabular import human_bytes

    return "unknown" if v is None else human_bytes(float(v))


def start_line(meta: dict[str, Any]) -> str:
    """One line on the state at start and what the load read, from the header meta (empty when absent)."""
    st = meta.get("io_start")
    if not isinstance(st, dict):
        return ""
    res, size = st.get("model_resident"), st.get("model_size")
    share = f" ({res / size:.0%})" if isinstance(res, int) and isinstance(size, int) and size else ""
    ra = st.get("read_ahead_kb")
    out = (f"at start: MemAvailable {_gib(st.get('mem_available'))}, model {_gib(size)} of which "
           f"{_gib(res)} in the page cache{share}, read_ahead_kb {'unknown' if ra is None else ra}")
    ld = meta.get("io_load")
    if isinstance(ld, dict):
        rb = ld.get("read_bytes")
        out += (f"; the load read {_gib(rb)} from disk, {ld.get('majflt', 'unknown')} major faults, "
                f"{float(ld.get('wall_ns') or 0) / 1e9:.2f} s")
    return out + "\n"


def io_text(io: IoTable | None, meta: dict[str, Any]) -> str:
    """The stats table section: measured disk bytes and major faults per token by phase and per sequence."""
    from ..reporters.tabular import frame_to_table

    head = "\nmeasured I/O (disk bytes read and major page faults of the process, per ubatch):\n"
    if io is None or len(io) == 0:
        return head + "  " + ABSENT + "\n"
    pf = phase_frame(io)
    sf = sequence_io_frame(io)
    seq_part = ""
    if len(sf) <= 60:
        seq_part = "per sequence (request):\n" + frame_to_table(sf[["seq", "phase", *_COLS]])
    else:
        seq_part = f"per sequence: {sf['seq'].nunique()} sequences (see --format json or --by io)\n"
    return head + start_line(meta) + frame_to_table(pf[["phase", *_COLS]]) + seq_part
