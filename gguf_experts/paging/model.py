"""The model as the page cache sees it: page ranges in the order llama.cpp touches them (PAGING_SPEC.md), and
the anonymous memory llama.cpp takes next to the page cache (KV cache, compute buffers).

Shards of a split model are laid end to end in one page space (each shard page-aligned): the simulator has one
file, so the shards share one read-ahead state and one mmap_miss counter (the kernel keeps one per open file).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from ..gguf.reader import Model
from ..gguf.layout import is_expert_tensor, kind_of
from ..gguf.names import split_name

PAGE = 4096
#: the *_exps tensors in the order of the MoE graph's MUL_MAT_IDs (then any others: biases, scales)
EXPS_ORDER = ("ffn_gate_exps", "ffn_up_exps", "ffn_gate_up_exps", "ffn_down_exps")
#: llama-server's defaults the RAM model assumes
DEFAULT_UBATCH = 512
PROCESS_OVERHEAD = 128 << 20  # code, libraries, tokenizer, sampler, HTTP server: measured RSS order


@dataclass
class PageLayout:
    """What the replay touches. Pages are 4 KiB indices in the (concatenated) file; expert tensors in bytes."""

    n_pages: int
    n_block: int
    n_expert: int
    ne_idx: np.ndarray  # int64 [n_block + 2]: non-expert ranges of block l; entry n_block: output tensors
    ne_a: np.ndarray  # int64 pages
    ne_b: np.ndarray
    ex_idx: np.ndarray  # int64 [n_block + 1]
    ex_base: np.ndarray  # int64 bytes
    ex_slice: np.ndarray  # int64 bytes per expert
    embd_off: int
    embd_row: int
    expert_ranges: list[tuple[int, int]] = field(default_factory=list)  # pages of every *_exps tensor
    moe_blocks: list[int] = field(default_factory=list)
    file_bytes: int = 0
    nonexpert_bytes: int = 0
    expert_bytes: int = 0


def page_layout(model: Model) -> PageLayout:
    """The replay's ranges from the byte map (one pass over the tensor list)."""
    bases, pos = [], 0
    for sh in model.shards:
        bases.append(pos)
        pos += -(-sh.file_size // PAGE) * PAGE
    n_block, n_expert = model.block_count, model.expert_count
    ne: list[list[tuple[int, int]]] = [[] for _ in range(n_block + 1)]
    ex: list[list[tuple[int, int, int, str]]] = [[] for _ in range(n_block)]
    embd_off = embd_row = 0
    nonexpert = expert = 0
    for t in model.tensors:
        start = bases[t.shard] + t.offset
        layer, comp = split_name(t.name)
        if is_expert_tensor(t):
            expert += t.nbytes
            if layer is None or layer >= n_block:
                continue
            ex[layer].append((start, t.nbytes // max(n_expert, 1), start + t.nbytes, comp))
            continue
        nonexpert += t.nbytes
        if kind_of(comp) == "token_embd":
            embd_off, embd_row = start, t.row_size
            continue
        rng = (start // PAGE, -(-(start + t.nbytes) // PAGE))
        ne[layer if layer is not None and layer < n_block else n_block].append(rng)
    order = {c: i for i, c in enumerate(EXPS_ORDER)}
    for lst in ex:
        lst.sort(key=lambda x: (order.get(x[3], len(order)), x[0]))
    ne_flat = [r for lst in ne for r in lst]
    ex_flat = [x for lst in ex for x in lst]
    return PageLayout(
        n_pages=pos // PAGE, n_block=n_block, n_expert=n_expert,
        ne_idx=np.concatenate([[0], np.cumsum([len(x) for x in ne])]).astype(np.int64),
        ne_a=np.array([r[0] for r in ne_flat], np.int64), ne_b=np.array([r[1] for r in ne_flat], np.int64),
        ex_idx=np.concatenate([[0], np.cumsum([len(x) for x in ex])]).astype(np.int64),
        ex_base=np.array([x[0] for x in ex_flat], np.int64), ex_slice=np.array([x[1] for x in ex_flat], np.int64),
        embd_off=embd_off, embd_row=embd_row,
        expert_ranges=[(x[0] // PAGE, -(-x[2] // PAGE)) for x in ex_flat],
        moe_blocks=[i for i, lst in enumerate(ex) if lst], file_bytes=pos, nonexpert_bytes=nonexpert,
        expert_bytes=expert)


def _per_layer(v: Any, n: int) -> np.ndarray:
    if v is None:
        return np.zeros(n, np.int64)
    if hasattr(v, "load"):
        v = v.load()
    a = np.asarray(v, np.int64).reshape(-1)
    return np.resize(a, n) if a.size else np.zeros(n, np.int64)


@dataclass
class RamModel:
    """Anonymous memory llama.cpp takes beside the page cache (bytes), and what the weights need."""

    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    nonexpert_bytes: int

    @property
    def anon_bytes(self) -> int:
        return self.kv_bytes + self.compute_bytes + self.overhead_bytes

    @property
    def minimum(self) -> int:
        """Below this the non-expert weights (which every token reads) do not fit beside the KV cache, compute
        buffers and process: refused."""
        return self.nonexpert_bytes + self.anon_bytes

    def page_cache(self, ram: int) -> int:
        return ram - self.anon_bytes

    def as_dict(self) -> dict[str, int]:
        return {"kv_bytes": self.kv_bytes, "compute_bytes": self.compute_bytes,
                "overhead_bytes": self.overhead_bytes, "nonexpert_bytes": self.nonexpert_bytes}


def ram_model(model: Model, ctx_size: int, n_ubatch: int = DEFAULT_UBATCH) -> RamModel:
    """KV cache: n_ctx x sum over layers of n_head_kv x (key_length + value_length) x 2 bytes (F16 K and V).
    Compute buffers (an estimate, llama.cpp sizes them from the worst-case graph): F32 activations of one
    ubatch, n_ubatch x 4 bytes x (n_vocab logits + 8 n_embd + n_head x n_ctx attention scores + 3 k n_ff_exp)."""
    kv = model.kv
    arch = model.architecture
    n = model.block_count
    n_embd = int(kv.get(f"{arch}.embedding_length", 0) or 0)
    heads = _per_layer(kv.get(f"{arch}.attention.head_count"), n)
    heads_kv = _per_layer(kv.get(f"{arch}.attention.head_count_kv", kv.get(f"{arch}.attention.head_count")), n)
    hmax = int(heads.max()) if heads.size else 1
    k_len = int(kv.get(f"{arch}.attention.key_length", n_embd // max(hmax, 1)) or 0)
    v_len = int(kv.get(f"{arch}.attention.value_length", k_len) or 0)
    kv_bytes = int(ctx_size) * int(heads_kv.sum()) * (k_len + v_len) * 2
    n_vocab = next((int(t.ne[1]) for t in model.tensors if t.name == "token_embd.weight" and len(t.ne) > 1), 0)
    ff = int(model.expert_ff_length or 0)
    k = int(model.expert_used_count or 0)
    ub = min(n_ubatch, ctx_size)
    compute = 4 * ub * (n_vocab + 8 * n_embd + hmax * ctx_size + 3 * k * ff)
    nonexpert = sum(t.nbytes for t in model.tensors if not is_expert_tensor(t))
    return RamModel(kv_bytes, compute, PROCESS_OVERHEAD, nonexpert)


def reclaim_batch_pages(zoneinfo: str = "/proc/zoneinfo") -> int:
    """Pages kswapd frees per run: woken below the low watermark, it reclaims until free memory is above the high
    one (mm/vmscan.c balance_pgdat), summed over zones from /proc/zoneinfo (read only); 0 when unreadable. Its
    refault snapshot (snapshot_refaults) is taken once per run, which is what decides whether the active list is
    aged (prepare_scan_control's may_deactivate): the simulator counts refaults over the same batch."""
    low = high = 0
    try:
        with open(zoneinfo) as f:
            for line in f:
                w = line.split()
                if len(w) == 2 and w[1].isdigit():
                    if w[0] == "low":
                        low += int(w[1])
                    elif w[0] == "high":
                        high += int(w[1])
    except OSError:
        return 0
    return max(high - low, 0)


def check_budgets(rm: RamModel, budgets: list[int]) -> None:
    """A budget below the non-expert weights plus the KV cache (and the rest of llama.cpp's own memory) is
    refused; the message names that amount and its parts."""
    low = [b for b in budgets if b < rm.minimum]
    if low:
        raise InputError(
            f"--ram {low[0] / 2**30:.2f} GiB is below what llama.cpp needs before any expert: "
            f"{rm.minimum / 2**30:.2f} GiB (non-expert weights {rm.nonexpert_bytes / 2**30:.2f} GiB + KV cache "
            f"{rm.kv_bytes / 2**30:.2f} GiB + compute buffers ~{rm.compute_bytes / 2**30:.2f} GiB + process "
            f"~{rm.overhead_bytes / 2**30:.2f} GiB); give a larger --ram or a smaller --ctx-size")
