"""What `cache-sim` computes, as one pure function over a trace's chunks: hit-rate rows of every requested
policy under either request convention, the share of the LRU-to-OPT gap each policy captures, the global
byte-budget LRU cache, the smallest LRU capacities and the working sets.

Conventions (`order`):
  token  -- the k experts of a row (one token at one layer) are requested together (cache.py); llama.cpp's
            MUL_MAT_ID needs all k at once, so this is what an expert cache serving it sees. Default.
  access -- the row's experts are replayed one by one in top-k order, as simple analysers do. This is the
            token rule applied to rows of one expert, so every simulator and one-pass curve serves it: LRU
            by stack distances is plain Mattson (a per-access LRU is a stack algorithm), OPT is Belady.
Under access order an earlier slot of the same token can evict a later one or hit where the token rule
does not, so the two give different hit rates for the same cache.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ...errors import InputError
from .cache import CURVE_COLUMNS, GlobalLRU, LayerLRU, curve_frame, simulate, smallest_capacity
from .opt import opt_histograms
from .policies import simulate_lfuda, simulate_s3fifo

ORDERS = ("token", "access")
POLICIES = ("lru", "lfu", "lfuda", "s3fifo", "opt")
SIMULATED = ("lfu", "lfuda", "s3fifo")  # no one-pass curve: simulated at chosen capacities
COLUMNS = CURVE_COLUMNS + ["gap_share"]


@dataclass
class CacheSimRequest:
    n_layer: int
    n_expert: int
    k: int
    policies: list[str] = field(default_factory=lambda: ["lru"])
    order: str = "token"
    capacities: list[int] | None = None  # None: LRU every capacity, others powers of two
    budgets: list[int] | None = None  # global LRU byte budgets (needs expert_bytes)
    curve: bool = False  # LRU and OPT at every capacity
    taus: list[int] | None = None
    expert_bytes: np.ndarray | None = None


@dataclass
class CacheSimResult:
    rows: pd.DataFrame  # COLUMNS: per layer and 'all'; with budgets (and no capacities) the global rows
    smallest: pd.DataFrame  # smallest LRU capacity reaching 90/95/99% per layer
    working_set: pd.DataFrame
    global_rows: pd.DataFrame | None
    sim_capacities: list[int]  # the capacities the simulated policies ran at


def parse_policies(text: str) -> list[str]:
    pol = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in pol if p not in POLICIES]
    if bad or not pol:
        raise InputError(f"--policy {text!r}: use {', '.join(POLICIES)} (comma-separated)")
    return list(dict.fromkeys(pol))


def as_accesses(layer: np.ndarray, experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of k experts as rows of one expert each, in top-k order: the access-order convention."""
    k = experts.shape[1]
    return np.repeat(np.asarray(layer), k), np.asarray(experts).reshape(-1, 1)


def default_capacities(n_expert: int) -> list[int]:
    return sorted({1 << i for i in range(n_expert.bit_length()) if 1 << i <= n_expert} | {n_expert})


def _check(req: CacheSimRequest) -> None:
    if req.order not in ORDERS:
        raise InputError(f"--order {req.order!r}: use token or access")
    if req.capacities and max(req.capacities) > req.n_expert:
        raise InputError(f"--capacity {max(req.capacities)} exceeds the {req.n_expert} experts per layer "
                         "of the trace's model")
    if req.budgets and req.expert_bytes is None:
        raise InputError("--budget needs --model (experts are weighed by their bytes in the model)")
    if req.budgets and req.policies != ["lru"]:
        raise InputError("--budget simulates one global LRU cache; drop the other policies from --policy")


def gap_share(rows: pd.DataFrame) -> pd.Series:
    """(hits - LRU hits) / (OPT hits - LRU hits) at the same layer and capacity: 0 is LRU, 1 is OPT,
    negative loses to LRU; NA where OPT and LRU tie or either is missing."""
    key = ["layer", "capacity"]
    ref = {p: rows[rows.policy == p].set_index(key)["hits"] for p in ("lru", "opt")}
    idx = pd.MultiIndex.from_frame(rows[key])
    lru = ref["lru"].reindex(idx).to_numpy(np.float64)
    opt = ref["opt"].reindex(idx).to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = (rows["hits"].to_numpy(np.float64) - lru) / (opt - lru)
    share[~np.isfinite(share)] = np.nan
    return pd.Series(share, index=rows.index)


def cache_sim(chunks: Iterable[tuple[np.ndarray, np.ndarray]], req: CacheSimRequest) -> CacheSimResult:
    """Stream (layer, experts) chunks through the one-pass LRU (and the global cache); keep the trace in
    memory only when OPT or a simulated policy needs it."""
    _check(req)
    L, M, k = req.n_layer, req.n_expert, req.k
    access = req.order == "access"
    eb = req.expert_bytes
    tok = LayerLRU(L, M, k, expert_bytes=eb)  # the working set counts tokens whatever the order
    lru = LayerLRU(L, M, 1, expert_bytes=eb) if access else tok
    glob = GlobalLRU(L, M, 1 if access else k, eb, np.array(req.budgets)) if req.budgets and eb is not None else None
    others = [p for p in req.policies if p != "lru"]
    need_opt = req.curve or "opt" in others or any(p in SIMULATED for p in others)
    keep = need_opt
    lays, exps = [], []
    for layer, experts in chunks:
        tok.update(layer, experts)
        la, ex = as_accesses(layer, experts) if access else (layer, experts)
        if access:
            lru.update(la, ex)
        if glob is not None:
            glob.update(la, ex)
        if keep:
            lays.append(la)
            exps.append(ex)
    sim_caps = req.capacities or default_capacities(M)
    frames = [lru.curves(None if req.capacities is None or req.curve else sim_caps)]
    if need_opt:
        lay = np.concatenate(lays) if lays else np.zeros(0, np.int32)
        ex = np.concatenate(exps) if exps else np.zeros((0, 1 if access else k), np.int32)
        frames += _policy_frames(lay, ex, req, others, sim_caps)
    rows = pd.concat(frames, ignore_index=True)
    rows["gap_share"] = gap_share(rows) if len(rows) else pd.Series(dtype=np.float64)
    # shown: the policies asked for, plus LRU and OPT as the gap's references and with --curve
    shown = set(req.policies) | ({"lru", "opt"} if req.curve or need_opt and set(others) - {"opt"} else set())
    rows = rows[rows.policy.isin(shown)].reset_index(drop=True)
    if eb is None and len(rows):
        rows["bytes_fetched"] = pd.array([pd.NA] * len(rows), dtype="Int64")  # no model: bytes unknown
    gdf = glob.frame().assign(gap_share=np.nan) if glob is not None else None
    if gdf is not None:
        rows = gdf if req.capacities is None and not req.curve else pd.concat([rows, gdf], ignore_index=True)
    ws = tok.working_set(req.taus)
    if eb is None:
        ws = ws.drop(columns=["bytes"])
    return CacheSimResult(rows[COLUMNS], smallest_capacity(lru.curves()), ws, gdf, sim_caps)


def _policy_frames(lay: np.ndarray, ex: np.ndarray, req: CacheSimRequest, others: list[str],
                   sim_caps: list[int]) -> list[pd.DataFrame]:
    """OPT rows (one pass: every capacity with --curve, else sim_caps) and the simulated policies' rows."""
    L, M, eb = req.n_layer, req.n_expert, req.expert_bytes
    hist, byte_hist, layers = opt_histograms(lay, ex, L, M, eb)
    out = [curve_frame(hist, byte_hist, "opt", None if req.curve else sim_caps, layers)]
    for p in others:
        if p == "lfu":
            out.append(simulate(lay, ex, L, M, "lfu", sim_caps, eb))
        elif p == "lfuda":
            out.append(simulate_lfuda(lay, ex, L, M, sim_caps, eb))
        elif p == "s3fifo":
            out.append(simulate_s3fifo(lay, ex, L, M, sim_caps, eb))
    return out
