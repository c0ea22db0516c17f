"""gguf-experts cache-sim: the hit rate and fetched bytes of an expert cache, per layer or global."""
from __future__ import annotations

import argparse
from typing import Any

from ..analysis.cache.cachesim import CacheSimRequest, CacheSimResult, cache_sim, parse_policies
from ..reporters.tabular import Output, add_output_options, emit, frame_records, frame_to_table, human_bytes
from ._dask_options import add_dask_options, dask_settings
from ._trace_input import add_trace_arguments, expert_bytes, open_any, open_trace, parse_int_list

NAME = "cache-sim"
HELP = ("expert cache simulation: LRU curves for every capacity, OPT, LFU, LFUDA, S3-FIFO, byte budgets, "
        "working sets, token or access order")
DESCRIPTION = (
    HELP + ". Rows: layer,policy,capacity,accesses,hits,hit_rate,bytes_fetched,gap_share (layer 'all': every "
    "layer together, or the one global cache of --budget; gap_share: the share of the LRU-to-OPT gap the "
    "policy captures at that capacity). --order token (default): the k experts of one token at one layer are "
    "requested together: an expert resident when the token starts is a hit, the others are fetched. "
    "--order access: the token's experts are requested one by one in top-k order, as simple analysers do. "
    "Per-layer caches hold CAPACITY experts of their layer (LRU: every capacity 1..n_expert in one pass by "
    "stack distances; OPT: one pass by Mattson's priority stack, at --capacity or every capacity with "
    "--curve; LFU, LFUDA, S3-FIFO: simulated at --capacity, with LRU and OPT rows beside them); --budget is "
    "one LRU cache of BYTES over all layers (needs --model).")
ORDER = 60
CONVENTIONS = {
    "token": ("the k experts of one row (token x layer) are requested together; an expert resident at the "
              "row's start is a hit; then the cache keeps the row's experts and the best others by priority "
              "(LRU: recency, slot 0 most recent; LFU: request count, then recency; LFUDA: age + in-cache "
              "count, then recency; OPT: soonest next use, then lower id; S3-FIFO: its queues, never evicting "
              "the row's experts)"),
    "access": ("each row's experts are requested one by one in top-k order (slot 0 first), each a separate "
               "access of a plain cache (LRU, LFU, LFUDA, S3-FIFO; OPT = Belady)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_trace_arguments(p, many=True)
    p.add_argument("--policy", default="lru", metavar="P[,P]",
                   help="lru, lfu, lfuda, s3fifo, opt (comma-separated; default lru)")
    p.add_argument("--order", choices=["token", "access"], default="token",
                   help="token: a token's k experts are requested together (default); access: one by one "
                        "in top-k order, as simple analysers replay them (higher or lower hit rates)")
    p.add_argument("--capacity", metavar="N[,N]",
                   help="experts per layer to report (default: LRU every 1..n_expert; others powers of two)")
    p.add_argument("--budget", metavar="BYTES[,BYTES]",
                   help="one global LRU cache of this many bytes over all layers (e.g. 8G,16G); needs --model")
    p.add_argument("--curve", action="store_true",
                   help="LRU and OPT rows for every capacity 1..n_expert (one pass each), even with --capacity")
    p.add_argument("--working-set", action="store_true",
                   help="rows: W(tau) = mean distinct experts (and bytes) per layer in windows of tau tokens")
    p.add_argument("--tau", metavar="T[,T]", help="working-set windows in tokens (default powers of two)")
    add_output_options(p)
    add_dask_options(p)


def _many(args: argparse.Namespace, paths: list[str]) -> int:
    """Several traces: one cache per trace (per server), rows per trace and pooled (sums of hits, accesses and
    bytes fetched; rates from the sums); the smallest capacities and working sets per trace."""
    import pandas as pd

    from ..analysis.cache.cachesim import gap_share
    from ..fleet import fleet_summary, labels, open_all, pool_rows

    inputs = open_all(paths, args.model)
    names = labels(paths)
    settings = dask_settings(args)
    results = []
    reqs = []
    for inp in inputs:
        inp.require_order()
        assert inp.header is not None and inp.chunks is not None
        req = _request(args, inp.header.fingerprint)
        req.expert_bytes = expert_bytes(args.model, inp.header, inp.path)
        if settings.wanted:
            reqs.append(req)
        else:
            results.append(cache_sim(((c.layer, c.experts) for c in inp.chunks), req))
    if settings.wanted:  # one Dask task per trace: one cache per trace, as above
        from ..fleet_dask import runner_for

        with runner_for(settings) as runner:
            results = runner.map(simulate_path, list(zip(paths, reqs)), args.model)
    keys = ["layer", "policy", "capacity"]
    rows = pool_rows([r.rows for r in results], names, keys, ["accesses", "hits", "bytes_fetched"],
                     {"hit_rate": ("hits", "accesses")})
    pooled = rows["trace"] == "pooled"
    if pooled.any():
        rows.loc[pooled, "gap_share"] = gap_share(rows[pooled].reset_index(drop=True)).to_numpy()
    smallest = pd.concat([r.smallest.assign(trace=n) for r, n in zip(results, names)], ignore_index=True)
    ws = pd.concat([r.working_set.assign(trace=n) for r, n in zip(results, names)], ignore_index=True)
    smallest = smallest[["trace", *[c for c in smallest.columns if c != "trace"]]]
    ws = ws[["trace", *[c for c in ws.columns if c != "trace"]]]
    fp = inputs[0].header.fingerprint  # type: ignore[union-attr]
    main = ws if args.working_set else rows
    doc = {"traces": fleet_summary(inputs, names), "n_layer": fp.n_layer, "n_expert": fp.n_expert,
           "n_expert_used": fp.n_expert_used, "order": args.order, "convention": CONVENTIONS[args.order],
           "pooled": "one cache per trace; pooled rows sum hits, accesses and bytes over the traces",
           "rows": frame_records(rows), "smallest_lru_capacity": frame_records(smallest),
           "working_set": frame_records(ws)}

    def text() -> str:
        head = (f"{len(paths)} traces: {fp.architecture}, {fp.n_expert} experts per layer, top-{fp.n_expert_used}; "
                f"order {args.order}; one cache per trace, 'pooled' = sums over the traces\n")
        if args.working_set:
            return head + "\n" + frame_to_table(ws)
        shown = rows[rows["layer"].astype(str) == "all"] if rows["layer"].nunique() > 9 else rows
        return (head + "\nsmallest LRU cache per layer reaching 90/95/99% hits, per trace:\n"
                + frame_to_table(smallest) + "\nhit rates per trace and pooled:\n"
                + frame_to_table(shown, na_note=NA_NOTE, max_rows=200))
    emit(Output(main, document=doc, text=text), args.format, args.output)
    return 0


def simulate_path(job: tuple[str, CacheSimRequest], model: str | None) -> CacheSimResult:
    """cache_sim of the trace at a path (a Dask task: the worker opens the file itself)."""
    inp = open_any(job[0], model)
    inp.require_order()
    assert inp.chunks is not None
    return cache_sim(((c.layer, c.experts) for c in inp.chunks), job[1])


def _request(args: argparse.Namespace, fp: Any) -> CacheSimRequest:
    return CacheSimRequest(
        fp.n_layer, fp.n_expert, fp.n_expert_used, policies=parse_policies(args.policy), order=args.order,
        capacities=parse_int_list(args.capacity, "--capacity"), budgets=parse_int_list(args.budget, "--budget"),
        curve=args.curve, taus=parse_int_list(args.tau, "--tau"))


def run(args: argparse.Namespace) -> int:
    from ..fleet import expand

    paths = expand(args.trace)
    if len(paths) > 1:
        return _many(args, paths)
    args.trace = paths[0]
    dask_settings(args)  # bad --scheduler/--workers refused alike; one trace is one cache, simulated here
    header, chunks = open_trace(args.trace, model=args.model)
    fp = header.fingerprint
    req = CacheSimRequest(
        fp.n_layer, fp.n_expert, fp.n_expert_used, policies=parse_policies(args.policy), order=args.order,
        capacities=parse_int_list(args.capacity, "--capacity"), budgets=parse_int_list(args.budget, "--budget"),
        curve=args.curve, taus=parse_int_list(args.tau, "--tau"))
    req.expert_bytes = expert_bytes(args.model, header, args.trace)
    res = cache_sim(((c.layer, c.experts) for c in chunks), req)
    main = res.working_set if args.working_set else res.rows
    emit(Output(main, document=lambda: _document(args, req, res), text=lambda: _text(args, req, res, fp.architecture)),
         args.format, args.output)
    return 0


def _document(args: argparse.Namespace, req: CacheSimRequest, res: CacheSimResult) -> dict:
    return {"trace": args.trace, "n_layer": req.n_layer, "n_expert": req.n_expert, "n_expert_used": req.k,
            "order": req.order, "convention": CONVENTIONS[req.order], "rows": frame_records(res.rows),
            "smallest_lru_capacity": frame_records(res.smallest), "working_set": frame_records(res.working_set),
            "global": frame_records(res.global_rows) if res.global_rows is not None else None}


NA_NOTE = ("no value: bytes_fetched needs --model MODEL.gguf (the bytes of each expert); gap_share needs both "
           "LRU and OPT at that capacity (--policy lru,opt) and a gap between them")


def _text(args: argparse.Namespace, req: CacheSimRequest, res: CacheSimResult, arch: str) -> str:
    head = (f"{args.trace}: {arch}, {req.n_expert} experts per layer, top-{req.k}; order {req.order}: "
            f"{CONVENTIONS[req.order]}\n")
    if args.working_set:
        return head + "\n" + frame_to_table(res.working_set)
    g = res.global_rows
    per_layer = res.rows if g is None else res.rows.iloc[:len(res.rows) - len(g)]
    shown = per_layer if req.capacities else per_layer[per_layer["capacity"].isin(res.sim_capacities)]
    shown = shown[shown["layer"] == "all"] if shown["layer"].nunique() > 9 else shown
    out = [head, "\nsmallest LRU cache per layer reaching 90/95/99% hits:\n", frame_to_table(
        res.smallest, na_note="no capacity reaches that hit rate: even a cache of every expert gets only "
                              "max_hit_rate, since each expert's first use is a miss")]
    if len(shown):
        out += ["\nhit rates (layer 'all' = every layer together; gap_share: of the LRU-to-OPT gap):\n",
                frame_to_table(shown, na_note=NA_NOTE)]
    if g is not None:
        out += ["\none LRU cache over all layers, by byte budget:\n",
                frame_to_table(g.assign(capacity=[human_bytes(v) for v in g.capacity]).drop(columns="gap_share"),
                               na_note=NA_NOTE)]
    return "".join(out)
