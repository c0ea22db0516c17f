"""Both request conventions and the LFUDA / S3-FIFO policies against plain simulators written here
(OrderedDict, lists, dicts), OPT never beaten, and the share of the LRU-to-OPT gap."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
from analysis_synth import synth
from hypothesis import given, settings
from hypothesis import strategies as st
from test_analysis_cache import plain

from gguf_experts.analysis.cache.cachesim import CacheSimRequest, as_accesses, cache_sim
from gguf_experts.analysis.cache.policies import simulate_lfuda, simulate_s3fifo


def per_access_lru(rows: list[list[int]], capacity: int, sizes: dict[int, int]) -> tuple[int, int]:
    """The textbook LRU: each expert of a row is one access, in top-k order."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = fetched = 0
    for row in rows:
        for e in row:
            if e in cache:
                hits += 1
                cache.move_to_end(e)
            else:
                fetched += sizes[e]
                cache[e] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits, fetched


def plain_lfuda(rows: list[list[int]], capacity: int) -> int:
    """LFUDA with the row rule: keep the row plus the best others by (L + in-cache count, recency)."""
    cache: set[int] = set()
    count: dict[int, int] = {}
    key: dict[int, int] = {}
    last: dict[int, tuple[int, int]] = {}
    age = hits = 0
    for t, row in enumerate(rows):
        hits += sum(e in cache for e in row)
        for s, e in enumerate(row):
            count[e] = count[e] + 1 if e in cache else 1
            last[e] = (t, -s)
        others = sorted(cache - set(row), key=lambda e: (key[e], last[e]), reverse=True)
        kept, gone = others[:max(capacity - len(row), 0)], others[max(capacity - len(row), 0):]
        age = max([age] + [key[e] for e in gone])
        for e in row:
            key[e] = age + count[e]
        mine = sorted(row, key=lambda e: (key[e], last[e]), reverse=True)
        age = max([age] + [key[e] for e in mine[capacity:]])
        cache = set(kept) | set(mine[:capacity])
    return hits


class PlainS3FIFO:
    """S3-FIFO with lists (index 0 = oldest): small 10% (>= 1), ghost as large as main, 2-bit counters;
    a row's experts are not evicted while the row is requested."""

    def __init__(self, capacity: int) -> None:
        self.cap = capacity
        self.small_cap = max(1, -(-capacity // 10))
        self.ghost_cap = max(1, capacity - self.small_cap)
        self.small: list[int] = []
        self.main: list[int] = []
        self.ghost: list[int] = []
        self.freq: dict[int, int] = {}

    def row(self, row: list[int]) -> int:
        hits = sum(e in self.small or e in self.main for e in row)
        for e in row:
            if e in self.small or e in self.main:
                self.freq[e] = min(self.freq[e] + 1, 3)
                continue
            while len(self.small) + len(self.main) >= self.cap:
                self.evict(row)
            if e in self.ghost:
                self.ghost.remove(e)
                self.main.append(e)
            else:
                self.small.append(e)
            self.freq[e] = 0
        return hits

    def evict(self, row: list[int]) -> None:
        free_main = any(x not in row for x in self.main)
        if self.small and (len(self.small) >= self.small_cap or not free_main):
            while self.small:
                x = self.small.pop(0)
                if x in row or self.freq[x] >= 1:
                    self.freq[x] = 0
                    self.main.append(x)
                else:
                    self.ghost = (self.ghost + [x])[-self.ghost_cap:]
                    return
        if any(x not in row for x in self.main):
            while True:
                x = self.main.pop(0)
                if x in row:
                    self.main.append(x)
                elif self.freq[x] >= 1:
                    self.freq[x] -= 1
                    self.main.append(x)
                else:
                    return
        (self.main if self.main else self.small).pop(0)  # only the row's experts are resident


def plain_s3fifo(rows: list[list[int]], capacity: int) -> int:
    cache = PlainS3FIFO(capacity)
    return sum(cache.row(r) for r in rows)


def _rows(d: dict, layer: int) -> list[list[int]]:
    return d["experts"][d["layer"] == layer].tolist()


def _hits(df, layer: str, cap: int, policy: str) -> tuple[int, int]:
    r = df[(df.layer == layer) & (df.capacity == cap) & (df.policy == policy)].iloc[0]
    return int(r.hits), (-1 if pd.isna(r.bytes_fetched) else int(r.bytes_fetched))


def test_access_order_equals_ordereddict_lru_exactly():
    d = synth(n_layer=3, n_expert=16, k=4, n_seq=2, prompt=6, gen=40, skew=2.0, seed=5)
    sizes = np.arange(1, 17)[None, :] * np.array([[1], [10], [100]])
    chunks = [(d["layer"][a:a + 29], d["experts"][a:a + 29]) for a in range(0, len(d["layer"]), 29)]
    res = {o: cache_sim(chunks, CacheSimRequest(3, 16, 4, order=o, expert_bytes=sizes)).rows
           for o in ("token", "access")}
    differ = 0
    for li in range(3):
        for c in range(1, 17):
            want = per_access_lru(_rows(d, li), c, {e: int(sizes[li, e]) for e in range(16)})
            assert _hits(res["access"], str(li), c, "lru") == want, (li, c)
            differ += _hits(res["token"], str(li), c, "lru") != want
    assert differ > 0  # the two conventions are not the same rule


@pytest.mark.parametrize("order", ["token", "access"])
def test_lfuda_and_s3fifo_match_plain(order):
    d = synth(n_layer=2, n_expert=12, k=3, n_seq=2, prompt=5, gen=40, skew=2.0, seed=9)
    lay, ex = as_accesses(d["layer"], d["experts"]) if order == "access" else (d["layer"], d["experts"])
    caps = [1, 2, 3, 4, 6, 9, 12]
    got = {"lfuda": simulate_lfuda(lay, ex, 2, 12, caps), "s3fifo": simulate_s3fifo(lay, ex, 2, 12, caps)}
    ref = {"lfuda": plain_lfuda, "s3fifo": plain_s3fifo}
    for li in range(2):
        rows = ex[lay == li].tolist()
        for c in caps:
            for p in got:
                h, f = _hits(got[p], str(li), c, p)
                want = ref[p](rows, c)
                assert (h, f) == (want, len(rows) * ex.shape[1] - want), (p, order, li, c)


def test_access_order_lfu_and_opt_are_the_per_access_rules():
    """Rows of one expert: the token rule's plain simulator is textbook per-access LFU and Belady."""
    d = synth(n_layer=2, n_expert=10, k=3, n_seq=1, prompt=4, gen=30, skew=1.5, seed=2)
    caps = [1, 3, 5, 8]
    res = cache_sim([(d["layer"], d["experts"])],
                    CacheSimRequest(2, 10, 3, policies=["lfu", "opt"], order="access", capacities=caps)).rows
    for li in range(2):
        rows = [[e] for row in _rows(d, li) for e in row]
        for c in caps:
            for p in ("lfu", "opt"):
                assert _hits(res, str(li), c, p)[0] == plain(rows, c, p)[0], (p, li, c)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(3, 14), k=st.integers(1, 3), skew=st.floats(0, 4),
       order=st.sampled_from(["token", "access"]))
def test_opt_never_beaten(seed, m, k, skew, order):
    d = synth(n_layer=2, n_expert=m, k=min(k, m), n_seq=2, prompt=3, gen=12, skew=skew, seed=seed)
    req = CacheSimRequest(2, m, min(k, m), policies=["lru", "lfu", "lfuda", "s3fifo", "opt"], order=order,
                          capacities=list(range(1, m + 1)))
    rows = cache_sim([(d["layer"], d["experts"])], req).rows
    piv = rows.pivot_table(index=["layer", "capacity"], columns="policy", values="hits")
    for p in ("lru", "lfu", "lfuda", "s3fifo"):
        assert (piv[p] <= piv["opt"]).all(), p
    share = rows.set_index(["layer", "capacity", "policy"])["gap_share"].unstack()
    gap = piv["opt"] > piv["lru"]
    assert (share.loc[gap, "lru"] == 0).all() and (share.loc[gap, "opt"] == 1).all()
    assert (share.loc[gap, ["lfu", "lfuda", "s3fifo"]] <= 1).all().all()
