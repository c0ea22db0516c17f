"""The page-cache model against this machine's kernel, at small scale (issue 18 item 4).

A 1.5 GB Q8_0 MoE (scripts/make_big_model.py, 6 layers x 48 experts, Qwen3-30B-A3B's matrix shapes) is evicted
with posix_fadvise(DONTNEED); a child process replays, through a plain mmap, exactly the page accesses that the
forecast's replay makes for a routing trace, with the advice of each mode (none; MADV_RANDOM on the *_exps
ranges; plus MADV_WILLNEED over the selected slices, as asked: the kernel caps each call). Its /proc/self/io
read_bytes and ru_majflt are compared with the forecast's cold-cache numbers at this machine's read_ahead_kb.
No budget limit (the whole model fits): this checks read-around, async read-ahead, fault-around, mmap_miss and
the WILLNEED cap, not eviction.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from run_support import evict

from gguf_experts.gguf.fingerprint import fingerprint
from gguf_experts.gguf.reader import open_model
from gguf_experts.paging.disk import DiskModel, device_io_pages, device_read_ahead_kb
from gguf_experts.paging.forecast import simulate
from gguf_experts.paging.model import PAGE, page_layout
from gguf_experts.trace.format import TraceData, TraceHeader

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("gguf")  # make_big_model writes through gguf-py

#: forecast / kernel must lie within these bounds (read bytes; major faults). Measured here: bytes within 0.1%
#: everywhere; faults exact in every mode and pattern but stock on this trace (80 forecast, 60 kernel: the kernel's
#: read-ahead chain survives some jumps that the model turns into a fault; not yet explained)
BYTES_BOUNDS = (0.9, 1.1)
FAULT_BOUNDS = (0.7, 1.4)

CHILD = r"""
import json, mmap, os, resource, sys
import numpy as np
ops = np.load(sys.argv[1]); rand = np.load(sys.argv[2]); path = sys.argv[3]; cap = int(sys.argv[4])
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
for a, b in rand:
    mm.madvise(mmap.MADV_RANDOM, int(a) * 4096, int(min(b * 4096, size) - a * 4096))
view = np.frombuffer(mm, np.uint8)
sink = 0
def io():
    with open("/proc/self/io") as f:
        return int(next(l for l in f if l.startswith("read_bytes:")).split()[1])
r0, f0 = io(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
for kind, a, b in ops:
    if kind == 0:
        sink += int(view[np.arange(a, min(b, (size + 4095) // 4096), dtype=np.int64) * 4096].sum())
    elif kind == 1:
        mm.madvise(mmap.MADV_WILLNEED, int(a) * 4096, int(min(b * 4096, size) - a * 4096))
    else:
        for x in range(int(a), int(b), cap):
            os.posix_fadvise(fd, x * 4096, min(cap, int(b) - x) * 4096, os.POSIX_FADV_WILLNEED)
r1, f1 = io(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
import ctypes
vec = np.zeros((size + 4095) // 4096, np.uint8)
ctypes.CDLL(None).mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), ctypes.c_void_p(vec.ctypes.data))
print(json.dumps({"read_bytes": r1 - r0, "majflt": f1 - f0, "resident": int((vec & 1).sum()), "sink": sink}))
"""


def replay_in_child(model: Path, ops_f: Path, rand_f: Path, cap: int, tries: int = 3) -> dict:
    """The kernel's numbers for the replay, from a cold cache. The check assumes nothing is evicted while the
    child runs (the whole model fits); when other processes' memory pressure evicts pages anyway (fewer pages
    resident at the end than were read), the measurement is void: try again, then skip."""
    for _ in range(tries):
        evict(model)
        assert resident_pages(model) < (model.stat().st_size // PAGE) // 50, "the model did not leave the page cache"
        out = subprocess.run([sys.executable, "-c", CHILD, str(ops_f), str(rand_f), str(model), str(cap)],
                             check=True, capture_output=True, text=True)
        real = json.loads(out.stdout)
        if real["resident"] * PAGE >= real["read_bytes"] * 0.999:
            return real
    pytest.skip(f"memory pressure from other processes evicted the model during {tries} replays (kernel read "
                f"{real['read_bytes']} bytes, {real['resident']} pages resident after): no cold-cache measurement")


def routing_trace(model_path: Path, seed: int = 1, n_prefill: int = 8, n_decode: int = 24) -> TraceData:
    """A prefill ubatch of 8 tokens, then 24 decode tokens; Zipf-skewed routing, a permutation per layer."""
    m = open_model(model_path)
    n_layer, n_exp, k = m.block_count, m.expert_count, m.expert_used_count
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_exp + 1) ** 0.8
    p /= p.sum()
    perm = np.stack([rng.permutation(n_exp) for _ in range(n_layer)])
    ubs = [(0, 0, n_prefill)] + [(1, n_prefill + i, 1) for i in range(n_decode)]
    n_rows = sum(n for _, _, n in ubs) * n_layer
    # each row: k distinct experts drawn with weights p (Gumbel top-k), mapped through the layer's permutation
    keys = np.log(p)[None, :] - np.log(-np.log(rng.random((n_rows, n_exp))))
    ranks = np.argsort(-keys, axis=1)[:, :k]
    phase = np.concatenate([np.full(n * n_layer, ph, np.uint8) for ph, _, n in ubs])
    pos = np.concatenate([np.tile(np.arange(p0, p0 + n), n_layer) for _, p0, n in ubs]).astype(np.int32)
    layer = np.concatenate([np.repeat(np.arange(n_layer), n) for _, _, n in ubs]).astype(np.int32)
    experts = perm[layer[:, None], ranks].astype(np.int32)
    return TraceData(seq=np.zeros(n_rows, np.int32), phase=phase, pos=pos, token=(3 + pos % 250).astype(np.int32),
                     layer=layer, experts=experts, weights=None, header=TraceHeader(2, fingerprint(m), {}))


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pagecache") / "moe-1g5.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_big_model.py"), str(out), "--layers", "6",
                    "--experts", "48", "--quant", "Q8_0"], check=True, capture_output=True)
    yield out
    out.unlink(missing_ok=True)



def resident_pages(path: Path) -> int:
    """Pages of the file in the page cache (mincore over a fresh mapping)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    vec = np.zeros((size + PAGE - 1) // PAGE, np.uint8)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
        view = np.frombuffer(mm, np.uint8)
        rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), ctypes.c_void_p(vec.ctypes.data))
        del view
    assert rc == 0
    return int((vec & 1).sum())


@pytest.mark.parametrize("mode", ["stock", "random", "prefetch", "prefetch-read"])
def test_cold_replay_matches_kernel(big_model: Path, mode: str, tmp_path: Path) -> None:
    """prefetch: WILLNEED in run --paging's 32 MiB steps (the kernel reads 8 MiB of each); prefetch-read: whole
    tensors read exactly (a pread pass, modelled as WILLNEED calls within the cap)."""
    step = 0 if mode == "prefetch-read" else 32 << 20
    mode = mode.removesuffix("-read")
    ra_kb = device_read_ahead_kb(big_model)
    io_pages = device_io_pages(big_model, ra_kb // 4)
    m = open_model(big_model)
    layout = page_layout(m)
    trace = routing_trace(big_model, n_prefill=8, n_decode=8)
    res = simulate([trace], layout, layout.n_pages * 2, mode, ra_kb // 4, io_pages,
                   DiskModel(1900, 19300, "assumed"), populate=False, warmup=False, log_ops=1 << 20,
                   prefetch_step=step)
    assert res.ops is not None and len(res.ops) < 1 << 20
    sim_bytes = float(res.ubatches["read_pages"].sum()) * PAGE
    sim_faults = float(res.ubatches["majflt"].sum())
    ops_f, rand_f = tmp_path / "ops.npy", tmp_path / "rand.npy"
    np.save(ops_f, res.ops)
    rand = np.array(layout.expert_ranges if mode != "stock" else [], np.int64).reshape(-1, 2)
    np.save(rand_f, rand)
    real = replay_in_child(big_model, ops_f, rand_f, max(io_pages, ra_kb // 4))
    rb, rf = sim_bytes / max(real["read_bytes"], 1), sim_faults / max(real["majflt"], 1)
    msg = (f"{mode} (step {step >> 20} MiB) at read_ahead_kb {ra_kb}: forecast {sim_bytes / 2**20:.1f} MiB, "
           f"{sim_faults:.0f} major faults; kernel {real['read_bytes'] / 2**20:.1f} MiB, {real['majflt']} major faults")
    print(msg)
    assert real["read_bytes"] > 0 and real["majflt"] > 0, msg
    assert BYTES_BOUNDS[0] <= rb <= BYTES_BOUNDS[1], msg
    assert FAULT_BOUNDS[0] <= rf <= FAULT_BOUNDS[1], msg


def _ops_sim(layout_pages: int, ops: list[tuple[int, int, int]], rand: list[tuple[int, int]], ra: int,
             io_pages: int) -> tuple[float, float]:
    """Bytes read and major faults of raw operations through the simulator (no budget limit)."""
    from gguf_experts.paging import native

    lib = native.lib()
    disk = DiskModel(1900, 19300, "assumed")
    h = lib.sim_new(layout_pages, layout_pages * 2, ra, io_pages, disk.latency, disk.sec_per_page)
    try:
        for a, b in rand:
            lib.sim_set_rand(h, a, b, 1)
        for kind, a, b in ops:
            (lib.sim_touch, lib.sim_willneed, lib.sim_read_seq)[kind](h, a, b)
        out = np.zeros(native.NCOUNT)
        lib.sim_counters(h, out.ctypes.data, 1)
    finally:
        lib.sim_free(h)
    return float(out[2]) * PAGE, float(out[0])


def _patterns(n: int) -> dict[str, tuple[list[tuple[int, int, int]], bool]]:
    """Access patterns that isolate one rule each: (ops, MADV_RANDOM over the whole file)."""
    return {
        "sequential": ([(0, 0, n)], False),  # read-around once, then the async window chain (large folios)
        "one_page_per_16MiB": ([(0, p, p + 1) for p in range(0, n, 4096)], False),  # read-around per fault
        "slices_stride5": ([(0, p, p + 408) for p in range(20000, n - 500, 2040)], False),  # skips past marks
        "willneed_64MiB_random": ([(1, 1000, 1000 + 16384), (0, 1000, 1000 + 16384)], True),  # WILLNEED cap
    }


@pytest.mark.parametrize("name", list(_patterns(1 << 20)))
def test_access_patterns_match_kernel(big_model: Path, name: str, tmp_path: Path) -> None:
    ra_kb = device_read_ahead_kb(big_model)
    io_pages = device_io_pages(big_model, ra_kb // 4)
    n = -(-big_model.stat().st_size // PAGE)
    ops, rand_all = _patterns(n)[name]
    rand = [(0, n)] if rand_all else []
    sim_bytes, sim_faults = _ops_sim(n, ops, rand, ra_kb // 4, io_pages)
    np.save(tmp_path / "ops.npy", np.array(ops, np.int64).reshape(-1, 3))
    np.save(tmp_path / "rand.npy", np.array(rand, np.int64).reshape(-1, 2))
    real = replay_in_child(big_model, tmp_path / "ops.npy", tmp_path / "rand.npy", max(io_pages, ra_kb // 4))
    msg = (f"{name} at read_ahead_kb {ra_kb}: forecast {sim_bytes / 2**20:.1f} MiB, {sim_faults:.0f} major faults; "
           f"kernel {real['read_bytes'] / 2**20:.1f} MiB, {real['majflt']} major faults")
    print(msg)
    assert real["read_bytes"] > 0, msg
    assert BYTES_BOUNDS[0] <= sim_bytes / real["read_bytes"] <= BYTES_BOUNDS[1], msg
    assert FAULT_BOUNDS[0] <= (sim_faults + 1) / (real["majflt"] + 1) <= FAULT_BOUNDS[1], msg
