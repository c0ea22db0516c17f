"""The kernel rules the page-cache model took from the sources near the cache cliff (docs/forecast.md): references
through a MADV_RANDOM mapping do not protect a page, kswapd frees a batch below the budget, llama.cpp's
FADV_SEQUENTIAL doubles read-around, and llama-server's start-up decodes are routed top-k."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gguf_experts.gguf.fingerprint import ModelFingerprint, fingerprint
from gguf_experts.gguf.reader import open_model
from gguf_experts.paging import native
from gguf_experts.paging.disk import DiskModel
from gguf_experts.paging.forecast import forecast, startup_selections
from gguf_experts.paging.model import reclaim_batch_pages
from gguf_experts.trace.format import TraceData, TraceHeader

ROOT = Path(__file__).resolve().parents[1]
DISK = DiskModel(1900, 19300, "assumed")


def _hot_rereads(random_hot: bool) -> float:
    """A hot range of 256 pages touched before every 400-page step of a cold stream through a 2,000-page cache
    (no read-around): the pages read beyond the cold stream's own."""
    lib = native.lib()
    h = lib.sim_new(20000, 2000, 0, 32, DISK.latency, DISK.sec_per_page)
    try:
        if random_hot:
            lib.sim_set_rand(h, 0, 256, 1)
        cold = 0
        for i in range(40):
            lib.sim_touch(h, 0, 256)
            lib.sim_touch(h, 1000 + 400 * i, 1400 + 400 * i)
            cold += 400
        out = np.zeros(native.NCOUNT)
        lib.sim_counters(h, out.ctypes.data, 1)
        return float(out[native.COUNTERS.index("read_pages")]) - cold
    finally:
        lib.sim_free(h)


def test_madv_random_pages_are_evicted_however_often_used() -> None:
    """mm/rmap.c skips a VMA without recency (VM_RAND_READ) in folio_referenced: the hot range is re-read every
    time it reaches the inactive tail under MADV_RANDOM (40 steps through a cache that holds 5: ~8 times), and in
    a plain mapping at most once more (the first overflow finds every page young, rotates them all and evicts the
    first ones again, as shrink_folio_list does), after which it is activated and stays."""
    plain = _hot_rereads(False)
    rand = _hot_rereads(True)
    assert 256 <= plain <= 2 * 256
    assert rand >= 7 * 256, rand


def _resident_after_overflow(batch: int) -> int:
    lib = native.lib()
    h = lib.sim_new(5000, 2000, 0, 32, DISK.latency, DISK.sec_per_page)
    try:
        lib.sim_set_reclaim_batch(h, batch)
        lib.sim_touch(h, 0, 2001)  # one page over the budget
        return int(lib.sim_resident(h))
    finally:
        lib.sim_free(h)


def test_kswapd_frees_a_batch_below_the_budget() -> None:
    """Woken below the low watermark, kswapd reclaims until free memory is above the high one: one overflow
    frees the batch (in 16-page blocks here), not just the page over the budget."""
    assert 2000 - 16 <= _resident_after_overflow(0) <= 2000
    assert 2000 - 300 - 16 <= _resident_after_overflow(300) <= 2000 - 300


def test_reclaim_batch_is_high_minus_low_watermark(tmp_path: Path) -> None:
    z = tmp_path / "zoneinfo"
    z.write_text("Node 0, zone    DMA32\n  pages free     100\n        min      2111\n        low      2883\n"
                 "        high     3655\n        protection: (0, 0)\n      pagesets\n              high:     0\n"
                 "Node 0, zone   Normal\n        min      14773\n        low      20179\n        high     25585\n")
    assert reclaim_batch_pages(str(z)) == (3655 + 25585) - (2883 + 20179)
    assert reclaim_batch_pages(str(tmp_path / "absent")) == 0


def _trace(n_block: int = 3, n_expert: int = 16, k: int = 2) -> TraceData:
    """Position 0 selects experts 1, 2 at every block; later rows mostly 5, 6, sometimes 7, 8."""
    rows = []
    for p in range(40):
        for b in range(n_block):
            if b == n_block - 1 and p < 39:
                continue  # the last block runs only the row that asks for logits
            rows.append((p, b, (1, 2) if p == 0 else ((5, 6) if p % 4 else (7, 8))))
    pos = np.array([r[0] for r in rows], np.int32)
    return TraceData(seq=np.zeros(len(rows), np.int32), phase=np.zeros(len(rows), np.uint8), pos=pos,
                     token=(3 + pos).astype(np.int32), layer=np.array([r[1] for r in rows], np.int32),
                     experts=np.array([r[2] for r in rows], np.int32), weights=None,
                     header=TraceHeader(2, ModelFingerprint("qwen3moe", n_block, n_expert, k, "", ""), {}))


def test_startup_decodes_route_top_k() -> None:
    tr = _trace()
    sels = startup_selections([tr], 3, 16)
    assert sels is not None
    warm, probe = sels
    for b in (0, 1):  # BOS's own experts, plus EOS's draw from the routed experts only
        assert warm[b, 1] and warm[b, 2] and 3 <= warm[b].sum() <= 4
        assert not warm[b, [0, 3, 4, 9, 10, 11, 12, 13, 14, 15]].any()
    assert warm[2].sum() == 2 and not warm[2, [1, 2]].any()  # last block: EOS's row only
    assert (probe.sum(axis=1) == 2).all()  # tokens 0, 0 route alike: one row's top-k
    halves = [tr.select(np.arange(0, 7)), tr.select(np.arange(7, len(tr)))]
    again = startup_selections(halves, 3, 16)
    assert again is not None and all((a == b).all() for a, b in zip(again, (warm, probe)))
    assert startup_selections([], 3, 16) is None


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    out = tmp_path_factory.mktemp("rules") / "m.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_big_model.py"), str(out), "--layers", "2",
                    "--experts", "8", "--top-k", "2", "--embd", "256", "--ff", "128", "--heads", "4",
                    "--heads-kv", "2", "--head-dim", "64"], check=True, capture_output=True)
    return out


def test_llama_cpp_fadvise_sequential_doubles_read_around(model: Path) -> None:
    m = open_model(model)
    n = 2 * m.block_count
    tr = TraceData(seq=np.zeros(n, np.int32), phase=np.zeros(n, np.uint8),
                   pos=np.repeat(np.arange(2), m.block_count).astype(np.int32),
                   token=np.full(n, 5, np.int32), layer=np.tile(np.arange(m.block_count), 2).astype(np.int32),
                   experts=np.tile(np.array([[0, 1]], np.int32), (n, 1)), weights=None,
                   header=TraceHeader(2, fingerprint(m), {}))
    ram = [1 << 30]
    on = forecast(tr, m, ram, ("stock",), readahead_kb=128, ctx_size=256, disk=DISK, reclaim_batch=0)
    off = forecast(tr, m, ram, ("stock",), readahead_kb=128, ctx_size=256, disk=DISK, fadvise_sequential=False)
    assert on.attrs["ra_pages"] == 64 and off.attrs["ra_pages"] == 32
    assert on.attrs["reclaim_batch_pages"] == 0


def test_startup_variants_read_what_their_decodes_touch(model: Path) -> None:
    """None, the partial-removal check alone (--no-warmup), both start-up decodes, one warm-up of every expert:
    each reads at least what the previous one did, from a cold cache and no MAP_POPULATE."""
    from gguf_experts.paging.forecast import simulate
    from gguf_experts.paging.model import PAGE, page_layout

    m = open_model(model)
    lay = page_layout(m)
    n = 4 * m.block_count
    tr = TraceData(seq=np.zeros(n, np.int32), phase=np.zeros(n, np.uint8),
                   pos=np.repeat(np.arange(4), m.block_count).astype(np.int32), token=np.full(n, 5, np.int32),
                   layer=np.tile(np.arange(m.block_count), 4).astype(np.int32),
                   experts=np.tile(np.array([[0, 1], [2, 3], [4, 5], [0, 1]], np.int32), (m.block_count, 1)),
                   weights=None, header=TraceHeader(2, fingerprint(m), {}))
    loads = [simulate([tr], lay, lay.n_pages * 2, "random", 32, 32, DISK, populate=False, warmup=w).load["read_pages"]
             for w in (False, "check", True, "all")]
    assert loads[0] == 0 and 0 < loads[1] <= loads[2] < loads[3], loads
    assert loads[3] * PAGE >= lay.expert_bytes
