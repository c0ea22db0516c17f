"""gguf-experts cache-sim: the hit rate and fetched bytes of an expert cache, per layer or global."""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from ..analysis.cache import GlobalLRU, LayerLRU, simulate, smallest_capacity
from ..analysis.opt import opt_curves
from ..errors import InputError
from ..reporters.tabular import (
    Output,
    add_output_options,
    emit,
    frame_records,
    frame_to_table,
    human_bytes,
)
from ._trace_input import add_trace_arguments, expert_bytes, open_trace, parse_int_list

NAME = "cache-sim"
HELP = "expert cache simulation: LRU and OPT miss-ratio curves for every capacity, LFU, byte budgets, working sets"
DESCRIPTION = (
    HELP + ". Rows: layer,policy,capacity,accesses,hits,hit_rate,bytes_fetched (layer 'all': every layer "
    "together, or the one global cache of --budget). The k experts of one token at one layer are requested "
    "together: an expert resident when the token starts is a hit, the others are fetched. Per-layer caches "
    "hold CAPACITY experts of their layer (LRU: every capacity 1..n_expert in one pass by stack distances; "
    "OPT: at --capacity, or every capacity with --curve, in one pass by Mattson's priority stack; LFU: "
    "simulated at --capacity); --budget is one LRU cache of BYTES over all layers (needs --model).")
ORDER = 60
CONVENTION = ("the k experts of one row (token x layer) are requested together; an expert resident at the "
              "row's start is a hit; then the cache keeps the row's experts and the best others by priority "
              "(LRU: recency, slot 0 most recent; LFU: request count, then recency; OPT: soonest next use, "
              "then lower id)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_trace_arguments(p)
    p.add_argument("--policy", default="lru", metavar="P[,P]",
                   help="lru, lfu, opt (comma-separated; default lru)")
    p.add_argument("--capacity", metavar="N[,N]",
                   help="experts per layer to report (default: LRU every 1..n_expert; LFU/OPT powers of two)")
    p.add_argument("--budget", metavar="BYTES[,BYTES]",
                   help="one global LRU cache of this many bytes over all layers (e.g. 8G,16G); needs --model")
    p.add_argument("--curve", action="store_true",
                   help="LRU and OPT rows for every capacity 1..n_expert (one pass each), even with --capacity")
    p.add_argument("--working-set", action="store_true",
                   help="rows: W(tau) = mean distinct experts (and bytes) per layer in windows of tau tokens")
    p.add_argument("--tau", metavar="T[,T]", help="working-set windows in tokens (default powers of two)")
    add_output_options(p)


def _policies(text: str) -> list[str]:
    pol = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in pol if p not in ("lru", "lfu", "opt")]
    if bad or not pol:
        raise InputError(f"--policy {text!r}: use lru, lfu and/or opt, comma-separated")
    return list(dict.fromkeys(pol))


def run(args: argparse.Namespace) -> int:
    policies = _policies(args.policy)
    caps = parse_int_list(args.capacity, "--capacity")
    budgets = parse_int_list(args.budget, "--budget")
    taus = parse_int_list(args.tau, "--tau")
    header, chunks = open_trace(args.trace)
    fp = header.fingerprint
    L, M, k = fp.n_layer, fp.n_expert, fp.n_expert_used
    if caps and max(caps) > M:
        raise InputError(f"--capacity {max(caps)} exceeds the {M} experts per layer of the trace's model")
    eb = expert_bytes(args.model, header, args.trace)
    if budgets and eb is None:
        raise InputError("--budget needs --model (experts are weighed by their bytes in the model)")
    if budgets and policies != ["lru"]:
        raise InputError("--budget simulates one global LRU cache; drop lfu/opt from --policy")
    lru = LayerLRU(L, M, k, expert_bytes=eb)
    glob = GlobalLRU(L, M, k, eb, np.array(budgets)) if budgets else None
    keep = [p for p in policies if p != "lru"]
    layers, experts = [], []
    for c in chunks:
        lru.update(c.layer, c.experts)
        if glob is not None:
            glob.update(c.layer, c.experts)
        if keep:
            layers.append(c.layer)
            experts.append(c.experts)
    frames = []
    if "lru" in policies:
        frames.append(lru.curves(None if caps is None or args.curve else caps))
    sim_caps = caps or sorted(set([1 << i for i in range(M.bit_length()) if 1 << i <= M] + [M]))
    lay, ex = (np.concatenate(layers), np.concatenate(experts)) if keep else (None, None)
    for p in keep:
        if p == "opt":  # every capacity costs no more than a few: one pass
            frames.append(opt_curves(lay, ex, L, M, None if args.curve else sim_caps, eb))
        else:
            frames.append(simulate(lay, ex, L, M, p, sim_caps, eb))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if eb is None and len(df):
        df["bytes_fetched"] = pd.array([pd.NA] * len(df), dtype="Int64")  # no model: bytes unknown
    gdf = glob.frame() if glob is not None else None
    if gdf is not None:
        df = gdf if not args.capacity and not args.curve else pd.concat([df, gdf], ignore_index=True)
    ws = lru.working_set(taus)
    if eb is None:
        ws = ws.drop(columns=["bytes"])
    lru_curve = lru.curves()
    small = smallest_capacity(lru_curve)
    main = ws if args.working_set else df

    def doc() -> dict:
        return {"trace": args.trace, "n_layer": L, "n_expert": M, "n_expert_used": k, "convention": CONVENTION,
                "rows": frame_records(df), "smallest_lru_capacity": frame_records(small),
                "working_set": frame_records(ws),
                "global": frame_records(gdf) if gdf is not None else None}

    def text() -> str:
        out = [f"{args.trace}: {fp.architecture}, {M} experts per layer, top-{k}; {CONVENTION}\n"]
        if args.working_set:
            return out[0] + "\n" + frame_to_table(ws)
        out.append("\nsmallest LRU cache per layer reaching 90/95/99% hits:\n" + frame_to_table(
            small, na_note="no capacity reaches that hit rate: even a cache of every expert gets only "
                           "max_hit_rate, since each expert's first use is a miss"))
        shown = df if caps or gdf is not None else df[df["capacity"].isin(sim_caps)]
        shown = shown[shown["layer"] == "all"] if len(lru.layers()) > 8 else shown
        t = shown.copy()
        if gdf is not None:
            t["capacity"] = [human_bytes(v) if lay == "all" and gdf is not None and v in set(budgets) else v
                             for lay, v in zip(t["layer"], t["capacity"])]
        out.append("\nhit rates (layer 'all' = every layer together):\n" + frame_to_table(
            t, na_note="bytes_fetched needs --model MODEL.gguf (the bytes of each expert)"))
        return "".join(out)
    emit(Output(main, document=doc, text=text), args.format, args.output)
    return 0
