#!/usr/bin/env python3
"""Throughput of the analysis passes on a synthetic trace, against a plain per-access peer in the same run.

    python scripts/bench_analysis.py [--accesses 10000000] [--layers 48] [--experts 128] [--k 8]

Ours: stats (activation counts by phase/sequence), the one-pass LRU curves (every capacity 1..n_expert,
per layer, plus reuse gaps and working-set histograms), fed chunk by chunk as a trace reader yields them,
and the one-pass OPT curves (every capacity, Mattson's priority stack) over the same whole trace in memory;
on a prefix the OPT curves are checked against (and timed beside) the per-token OPT simulation at 3 sizes.
Peer: the textbook LRU cache, an OrderedDict at ONE capacity with a Python step per access (the same
row convention), timed on a prefix of the trace. Prints accesses per CPU-second (single thread; process time,
so other load on a shared machine does not count) and the ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from collections import OrderedDict

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gguf_experts.analysis.cache.cache import GlobalLRU, LayerLRU, simulate
from gguf_experts.analysis.cache.cachesim import CacheSimRequest, as_accesses, cache_sim
from gguf_experts.analysis.cache.opt import opt_curves
from gguf_experts.analysis.cache.policies import simulate_lfuda, simulate_s3fifo
from gguf_experts.analysis.stats import StatsAccumulator
from gguf_experts.commands._trace_input import DEFAULT_CHUNK_ROWS


def make_trace(accesses: int, L: int, M: int, k: int, skew: float, seed: int) -> dict[str, np.ndarray]:
    """Decode-like rows (token-major, one row per layer) of k distinct experts, Zipf-like popularity
    with a per-layer permutation; 4 sequences."""
    rng = np.random.default_rng(seed)
    rows = accesses // k
    rows -= rows % L
    perm = np.stack([rng.permutation(M) for _ in range(L)])
    logp = -skew * np.log(np.arange(1, M + 1))
    experts = np.empty((rows, k), np.int16)
    step = 1 << 15
    for a in range(0, rows, step):  # Gumbel top-k: k distinct experts drawn with the Zipf weights
        n = min(step, rows - a)
        g = logp[None, :] - np.log(-np.log(rng.random((n, M))))
        top = np.argpartition(-g, k - 1, axis=1)[:, :k]
        lay = (np.arange(a, a + n) % L)
        experts[a:a + n] = perm[lay[:, None], top]
    layer = (np.arange(rows) % L).astype(np.int32)
    seq = (np.arange(rows) * 4 // rows).astype(np.int32)
    phase = np.ones(rows, np.uint8)
    return {"layer": layer, "experts": experts, "seq": seq, "phase": phase}


def chunks(t: dict[str, np.ndarray], rows: int):
    n = len(t["layer"])
    for a in range(0, n, rows):
        yield {c: v[a:a + rows] for c, v in t.items()}


def peer_lru(t: dict[str, np.ndarray], L: int, capacity: int, limit: int) -> tuple[int, int]:
    """Per-layer OrderedDict LRU at one capacity: a Python step per access (hits, accesses)."""
    caches = [OrderedDict() for _ in range(L)]
    hits = n = 0
    for lay, row in zip(t["layer"][:limit].tolist(), t["experts"][:limit].tolist()):
        c = caches[lay]
        for e in row:
            if e in c:
                hits += 1
        for e in reversed(row):  # slot 0 ends most recent
            if e in c:
                c.move_to_end(e)
            else:
                c[e] = None
        while len(c) > capacity:
            c.popitem(last=False)
        n += len(row)
    return hits, n


def peer_access_lru(t: dict[str, np.ndarray], L: int, capacity: int, limit: int) -> tuple[int, int]:
    """The textbook per-access LRU of simple analysers: each expert of a row is one OrderedDict access."""
    caches = [OrderedDict() for _ in range(L)]
    hits = n = 0
    for lay, row in zip(t["layer"][:limit].tolist(), t["experts"][:limit].tolist(), strict=True):
        c = caches[lay]
        for e in row:
            if e in c:
                hits += 1
                c.move_to_end(e)
            else:
                c[e] = None
                if len(c) > capacity:
                    c.popitem(last=False)
        n += len(row)
    return hits, n


def peer_lfuda(layer: np.ndarray, experts: np.ndarray, L: int, capacity: int) -> int:
    """LFUDA with the row rule, plain Python per row (dicts and a sort): the vectorised one's peer."""
    hits = 0
    for li in range(L):
        cache: set[int] = set()
        count: dict[int, int] = {}
        key: dict[int, int] = {}
        last: dict[int, tuple[int, int]] = {}
        age = 0
        for t, row in enumerate(experts[layer == li].tolist()):
            hits += sum(e in cache for e in row)
            for s, e in enumerate(row):
                count[e] = count[e] + 1 if e in cache else 1
                last[e] = (t, -s)
            others = sorted(cache - set(row), key=lambda e: (key[e], last[e]), reverse=True)
            n = max(capacity - len(row), 0)
            age = max([age] + [key[e] for e in others[n:]])
            for e in row:
                key[e] = age + count[e]
            cache = set(others[:n]) | set(row[:capacity] if capacity >= len(row) else
                                          sorted(row, key=lambda e: (key[e], last[e]), reverse=True)[:capacity])
    return hits


def bench_policies(t: dict[str, np.ndarray], L: int, M: int, k: int, a: argparse.Namespace) -> None:
    """--order access (one-pass curves against the per-access OrderedDict peer), LFUDA and S3-FIFO (against
    a plain per-row peer), and the share of the LRU-to-OPT gap each policy captures."""
    limit = max(1, min(len(t["layer"]), a.peer_accesses // k))
    lay, ex = as_accesses(t["layer"], t["experts"])
    t0 = time.process_time()
    acc = LayerLRU(L, M, 1)
    for c in chunks({"layer": lay, "experts": ex}, a.chunk_rows * k):
        acc.update(c["layer"], c["experts"])
    tl = time.process_time() - t0
    cap = max(1, M // 4)
    t0 = time.process_time()
    ph, pn = peer_access_lru(t, L, cap, limit)
    tp = time.process_time() - t0
    pre = LayerLRU(L, M, 1)
    pre.update(*as_accesses(t["layer"][:limit], t["experts"][:limit]))
    cur = pre.curves([cap])
    assert int(cur[cur.layer == "all"].hits.iloc[0]) == ph
    n = ex.size
    print(f"--order access LRU curves (all {M} capacities, per layer): {n / tl / 1e6:8.2f} M accesses/s; peer "
          f"per-access OrderedDict LRU at capacity {cap} only: {pn / tp / 1e6:.2f} M/s (hits identical: {ph:,}); "
          f"ratio {n / tl / (pn / tp):.1f}x")
    lim = max(L, min(len(t["layer"]), a.sim_accesses // k) // L * L)
    sl, se = t["layer"][:lim], t["experts"][:lim]
    caps = [M // 8, M // 4, M // 2]
    t0 = time.process_time()
    simulate_lfuda(sl, se, L, M, caps)
    tf = time.process_time() - t0
    plim = max(L, min(lim, a.peer_accesses // (4 * k)) // L * L)  # the plain peer is slow: a shorter prefix
    t0 = time.process_time()
    peer = peer_lfuda(sl[:plim], se[:plim], L, cap)
    tq = time.process_time() - t0
    mine = simulate_lfuda(sl[:plim], se[:plim], L, M, [cap])
    assert int(mine[mine.layer == "all"].hits.iloc[0]) == peer
    print(f"LFUDA simulated at {caps}: {se.size / tf / 1e6:8.2f} M accesses/s (vectorised over layers); plain "
          f"per-row peer at capacity {cap} only: {se[:plim].size / tq / 1e6:.2f} M/s (hits identical: {peer:,}); "
          f"ratio {(se.size * len(caps) / tf) / (se[:plim].size / tq):.1f}x per capacity")
    t0 = time.process_time()
    simulate_s3fifo(sl, se, L, M, caps)
    ts = time.process_time() - t0
    print(f"S3-FIFO simulated at {caps}: {se.size / ts / 1e6:8.2f} M accesses/s (plain queues: "
          f"{se.size * len(caps) / ts / (pn / tp):.2f}x the per-access OrderedDict LRU peer per capacity)")
    for order in ("token", "access"):
        req = CacheSimRequest(L, M, k, policies=["lru", "lfu", "lfuda", "s3fifo", "opt"], order=order,
                              capacities=caps)
        rows = cache_sim([(sl, se)], req).rows
        al = rows[rows.layer == "all"]
        print(f"order {order}, all layers, {se.size:,} accesses: " + "; ".join(
            f"{p} " + ", ".join(f"C={c}: {h:.3f}" + ("" if p in ("lru", "opt") else f" (gap {g:+.0%})")
                               for c, h, g in zip(grp.capacity, grp.hit_rate, grp.gap_share, strict=True))
            for p, grp in al.groupby("policy", sort=False)))


def optional_parts(t: dict[str, np.ndarray], L: int, M: int, k: int, a: argparse.Namespace) -> None:
    if not a.no_policies:
        bench_policies(t, L, M, k, a)
    if a.file:
        end_to_end(t, L, M, k)


def end_to_end(t: dict[str, np.ndarray], L: int, M: int, k: int) -> None:
    """The commands as people run them: trace.bin on disk (decode records of one token per layer)."""
    import contextlib
    import io
    import tempfile

    from gguf_experts.cli import main as cli
    from gguf_experts.gguf.fingerprint import ModelFingerprint
    from gguf_experts.trace.writer import TraceWriter

    fp = ModelFingerprint("bench", L, M, k, "0" * 32, "0" * 32)
    n = len(t["layer"])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.bin")
        with TraceWriter(path, fp) as w:
            step = 1 << 16
            for a in range(0, n, step):
                sl = slice(a, a + step)
                m = len(t["layer"][sl])
                w.write_many(t["seq"][sl], t["phase"][sl], t["layer"][sl], np.arange(a, a + m)[:, None] // L,
                             np.zeros((m, 1), np.int32), t["experts"][sl].reshape(m, 1, k))
        size = os.path.getsize(path)
        for argv in (["stats", path], ["cache-sim", path]):
            out = io.StringIO()
            w0, c0 = time.perf_counter(), time.process_time()
            with contextlib.redirect_stdout(out):
                rc = cli(argv + ["-o", os.path.join(d, "out.csv")])
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            print(f"end to end `gguf-experts {argv[0]}` on a {size / 2**20:.0f} MiB trace.bin: rc {rc}, "
                  f"{n * k / cpu / 1e6:.2f} M accesses per CPU-second ({cpu:.2f} s CPU, {wall:.2f} s wall)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accesses", type=int, default=10_000_000)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of expert popularity")
    ap.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS)
    ap.add_argument("--peer-accesses", type=int, default=1_000_000, help="prefix the per-access peer replays")
    ap.add_argument("--repeat", type=int, default=3, help="best of N for our passes")
    ap.add_argument("--file", action="store_true",
                    help="also write the trace to a temporary trace.bin and time `stats` and `cache-sim` "
                         "end to end (reading included) through the CLI")
    ap.add_argument("--sim-accesses", type=int, default=1_000_000,
                    help="prefix for the per-token LFU/OPT simulators and the global byte-budget LRU")
    ap.add_argument("--no-policies", action="store_true",
                    help="skip --order access, LFUDA, S3-FIFO and the LRU-to-OPT gap shares")
    ap.add_argument("--no-opt-curve", action="store_true", help="skip the one-pass OPT curves over the whole trace")
    a = ap.parse_args()
    L, M, k = a.layers, a.experts, a.k
    t = make_trace(a.accesses, L, M, k, a.skew, 0)
    n = t["experts"].size
    print(f"trace: {n:,} accesses = {len(t['layer']):,} rows x top-{k}; {L} layers x {M} experts; "
          f"Zipf {a.skew}; chunks of {a.chunk_rows} rows; single thread")

    def timed(fn) -> float:
        """Best of N in CPU seconds of this process (a shared machine's other load does not count)."""
        best = float("inf")
        for _ in range(a.repeat):
            t0 = time.process_time()
            fn()
            best = min(best, time.process_time() - t0)
        return best

    def run_stats() -> None:
        acc = StatsAccumulator(L, M)
        for c in chunks(t, a.chunk_rows):
            acc.update(c["layer"], c["experts"], c["phase"], c["seq"])

    curves: dict[str, LayerLRU] = {}

    def run_lru() -> None:
        acc = LayerLRU(L, M, k)
        for c in chunks(t, a.chunk_rows):
            acc.update(c["layer"], c["experts"])
        curves["acc"] = acc

    ts = timed(run_stats)
    tl = timed(run_lru)
    tracemalloc.start()  # numpy reports its buffers to tracemalloc: the peak of one more LRU pass
    run_lru()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    cap = max(1, M // 4)
    limit = max(1, min(len(t["layer"]), a.peer_accesses // k))
    t0 = time.process_time()
    ph, pn = peer_lru(t, L, cap, limit)
    tp = time.process_time() - t0
    # the same prefix through ours: the curve at `cap` must equal the peer's hits
    pre = LayerLRU(L, M, k)
    for c in chunks({kk: v[:limit] for kk, v in t.items()}, a.chunk_rows):
        pre.update(c["layer"], c["experts"])
    cur = pre.curves([cap])
    ours_hits = int(cur[cur.layer == "all"].hits.iloc[0])
    assert ours_hits == ph, (ours_hits, ph)
    peer_rate = pn / tp
    print(f"stats:            {n / ts / 1e6:8.2f} M accesses/s  ({ts:.2f} s)")
    print(f"LRU curves (all {M} capacities, per layer): {n / tl / 1e6:8.2f} M accesses/s  ({tl:.2f} s)")
    print(f"peer OrderedDict LRU at capacity {cap} only: {peer_rate / 1e6:8.2f} M accesses/s "
          f"({pn:,} accesses, hits identical to ours: {ph:,})")
    print(f"ratio LRU curves / peer: {n / tl / peer_rate:.1f}x (ours gives {M} capacities, the peer 1)")
    all_rows = curves["acc"].curves()
    hr = all_rows[all_rows.layer == "all"].set_index("capacity")["hit_rate"]
    caps = (M // 16, M // 8, M // 4, M // 2)
    print("hit rate, all layers: " + ", ".join(f"C={c}: {hr[c]:.3f}" for c in caps if c >= 1))
    if not a.no_opt_curve:  # the same whole trace as the LRU curves (OPT needs it in memory: the future)
        t0 = time.process_time()
        oc = opt_curves(t["layer"], t["experts"], L, M)
        to = time.process_time() - t0
        ohr = oc[oc.layer == "all"].set_index("capacity")["hit_rate"]
        print(f"OPT curves (all {M} capacities, per layer, one pass, Mattson priority stack): {n / to / 1e6:8.2f} M "
              f"accesses/s ({to:.2f} s, one run); LRU curves are {to / tl:.1f}x faster")
        print("OPT hit rate, all layers: "
              + ", ".join(f"C={c}: {ohr[c]:.3f}" for c in (M // 16, M // 8, M // 4, M // 2) if c >= 1))
    lim = max(L, min(len(t["layer"]), a.sim_accesses // k) // L * L)
    lay, ex = t["layer"][:lim], t["experts"][:lim]
    sim_caps = [M // 8, M // 4, M // 2]
    sims = {}
    for pol in ("lfu", "opt"):
        t0 = time.process_time()
        sims[pol] = simulate(lay, ex, L, M, pol, sim_caps)
        dt = time.process_time() - t0
        print(f"{pol.upper()} simulated at {len(sim_caps)} capacities {sim_caps}: "
              f"{ex.size / dt / 1e6:8.2f} M accesses/s "
              f"({ex.size:,} accesses; one step per token, vectorised over layers and capacities)")
    t0 = time.process_time()
    oc = opt_curves(lay, ex, L, M)
    dt_one = time.process_time() - t0
    pick = oc[oc.capacity.isin(sim_caps)].set_index(["layer", "capacity"]).sort_index()
    ref = sims["opt"].set_index(["layer", "capacity"]).sort_index()
    assert (pick.hits == ref.hits).all() and (pick.bytes_fetched == ref.bytes_fetched).all()
    caps12 = np.unique(np.geomspace(1, M, 12).round().astype(np.int64))  # what `report` simulated before
    t0 = time.process_time()
    simulate(lay, ex, L, M, "opt", caps12)
    dt12 = time.process_time() - t0
    print(f"OPT one pass, all {M} capacities, same prefix: {ex.size / dt_one / 1e6:8.2f} M accesses/s "
          f"(hits identical to the simulation at {sim_caps}); the simulation at {len(caps12)} capacities: "
          f"{ex.size / dt12 / 1e6:.2f} M/s; ratio one pass / simulation at {len(caps12)}: {dt12 / dt_one:.2f}x")
    eb = np.full((L, M), 3 * 2048 * 768 * 0.5625)  # Q4_K-sized experts of a 2048 x 768 FFN
    g = GlobalLRU(L, M, k, eb, np.array([int(eb.sum() * f) for f in (0.1, 0.25, 0.5)]))
    t0 = time.process_time()
    for c in chunks({"layer": lay, "experts": ex}, a.chunk_rows):
        g.update(c["layer"], c["experts"])
    dt = time.process_time() - t0
    print(f"global byte-budget LRU (one cache over all {L * M} experts, 3 budgets): {ex.size / dt / 1e6:8.2f} M "
          f"accesses/s; hit rates {', '.join(f'{h:.3f}' for h in g.hits / g.accesses)} at 10/25/50% of expert bytes")
    optional_parts(t, L, M, k, a)
    print(f"peak memory allocated by one LRU-curve pass: {peak / 2**20:.1f} MiB (bounded by the chunk size; "
          f"the trace arrays it reads: {sum(v.nbytes for v in t.values()) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
