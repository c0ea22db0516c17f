"""The graph probe: which nodes of llama.cpp's graph the eval callback observes, and what it reads from them.

The ``ask`` call, made for every graph node, is a C-level dict lookup of the node's address (NodeMap);
names are read only on a miss. We observe ``ffn_moe_topk-<il>`` (plus, with weights, the last of
``ffn_moe_weights_softmax/_norm/_scaled`` the architecture builds; for REAP ``ffn_moe_down``).
"""
from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from .ggml_ctypes import CaptureError, GGMLTensor, name_key_reader, read_rows

#: weight stages in graph order; the last one the architecture builds is what the model applies. The raw
#: ffn_moe_weights (before normalisation) is the answer only where no later stage exists (e.g. qwen2moe).
WEIGHT_STAGES = ("ffn_moe_weights", "ffn_moe_weights_softmax", "ffn_moe_weights_norm", "ffn_moe_weights_scaled")
EXTRA_NAMES = ("ffn_moe_logits", "ffn_moe_probs")
_NAME_RE = re.compile(r"^(ffn_moe_[a-z_]+)-(\d+)$")

# What a probe observes (its ``what``): the top-k ids, a gate-weight stage (the index into WEIGHT_STAGES,
# 0..3: a later stage is the one the model applies), an extra router tensor (WHAT_EXTRA + index into
# EXTRA_NAMES), or the experts' outputs before weighting (ffn_moe_down, for REAP's norms).
WHAT_TOPK = -1
WHAT_EXTRA = 100
WHAT_DOWN = 200


def is_weight_stage(what: int) -> bool:
    return 0 <= what < len(WEIGHT_STAGES)
#: bool cb(struct ggml_tensor * t, bool ask, void * user_data), declared with its first argument only
ASK_PROTO = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)




class Probe:
    """The cached answer for one observed node: true when asked, and on the call after that (data ready)
    it hands the node to the collector. Its truth value *is* the callback's answer (see NodeMap)."""

    __slots__ = ("armed", "col", "deferred", "key", "layer", "t", "what")

    def __init__(self, col: Collector, t: int, what: int, layer: int, key: bytes, deferred: bool = False) -> None:
        self.col, self.t, self.what, self.layer, self.key = col, t, what, layer, key
        self.armed = False
        self.deferred = deferred  # a top-k read later, with its layer's gate weights: no split of its own

    def __bool__(self) -> bool:
        if self.deferred:  # computed anyway before the weights node, and alive until the expert matmuls
            self.col.pending[self.layer] = self
            return False
        if not self.armed:  # ask: "yes, compute up to this node"; the scheduler calls again with data
            self.armed = True
            return True
        self.armed = False
        try:
            self.col.take(self)
            return True
        except BaseException as e:  # noqa: BLE001  never raise into C; re-raised after llama_decode
            self.col.error = e
            return False


class NodeMap(dict[int, Any]):
    """pointer -> False (not observed) or Probe. Its C-level ``__getitem__`` *is* the eval callback, so
    the ask call for a known node runs no Python code; only misses (``__missing__``) do."""

    __slots__ = ("col",)
    col: Collector

    def __missing__(self, t: int) -> Any:
        try:
            return self.col.miss(t)
        except BaseException as e:  # noqa: BLE001
            self.col.error = e
            return False


class Collector:
    """What the eval callback gathers during one llama_decode, and the caches that keep ``ask`` cheap.

    ``ask`` is called for every graph node (~45 per layer and token), so its cost is the capture's
    overhead. The answer is cached per node address, one map per ubatch shape (n_tokens, n_outputs):
    llama.cpp allocates a graph's nodes in the same order for the same shape, so a node keeps its address.
    A miss reads the name (each name is parsed once). An observed node's name is re-checked when its data
    is taken, and each ubatch must yield the MoE layers its shape yielded the first time: a stale map is
    detected, never trusted silently.
    """

    def __init__(self, n_expert: int, k: int, weights: bool, extra: bool, down_norms: bool = False) -> None:
        self.n_expert, self.k = n_expert, k
        self.weights, self.extra = weights, extra
        self.down_norms = down_norms  # observe ffn_moe_down: L2 norm of each selected expert's output (REAP)
        self.decisions: dict[bytes, tuple[int, int] | None] = {}  # name key -> (what, layer) or None
        self.live = NodeMap()  # the map of the ubatch shape being decoded; its __getitem__ is the callback
        self.live.col = self
        self.by_shape: dict[tuple[int, int], dict[int, Any]] = {}  # saved maps of the other shapes
        self.probes: list[Probe] = []
        self.layers_by_shape: dict[tuple[int, int], int] = {}
        self.final_stage: dict[int, int] = {}  # layer -> index into WEIGHT_STAGES, learnt from the graph
        self.read_key = name_key_reader()
        self.shape = (0, 0)
        self.reset()
        self.error: BaseException | None = None
        self.skipped_warmup = 0
        self.stale_pointers = 0

    def reset(self, shape: tuple[int, int] = (0, 0)) -> None:
        self.topk: dict[int, np.ndarray] = {}
        self.w: dict[int, tuple[int, np.ndarray]] = {}
        self.extras: dict[str, dict[int, np.ndarray]] = {}
        self.down: dict[int, np.ndarray] = {}  # layer -> [rows, k] output norms (down_norms only)
        self.pending: dict[int, Probe] = {}  # layer -> deferred top-k probe seen this ubatch
        for p in self.probes:
            p.armed = False
        if shape != self.shape:  # swap the live map's contents only when the ubatch shape changes
            self.by_shape[self.shape] = dict(self.live)
            self.live.clear()
            self.live.update(self.by_shape.get(shape, {}))
            self.shape = shape

    def forget(self) -> None:
        """Drop every cached answer (weight stages learnt, or a stale map)."""
        self.live.clear()
        self.by_shape.clear()
        self.probes.clear()

    def _decide(self, key: bytes) -> tuple[int, int] | None:
        """Parse a name once: (what, layer) to observe, or None (``what``: see WHAT_TOPK and its neighbours)."""
        m = _NAME_RE.match(key.split(b"\0", 1)[0].decode("utf-8", "replace"))
        what = None
        if m:
            base, layer = m.group(1), int(m.group(2))
            if base == "ffn_moe_topk":
                what = WHAT_TOPK
            elif self.weights and base in WEIGHT_STAGES:
                stage = WEIGHT_STAGES.index(base)
                if stage >= self.final_stage.get(layer, -1):
                    what = stage
            elif self.extra and base in EXTRA_NAMES:
                what = WHAT_EXTRA + EXTRA_NAMES.index(base)
            elif self.down_norms and base == "ffn_moe_down":
                what = WHAT_DOWN
        d = None if what is None else (what, int(m.group(2)))  # type: ignore[union-attr]
        self.decisions[key] = d
        return d

    def miss(self, t: int) -> Any:
        """Answer for a pointer not in the live map: by its name; stored in the map."""
        key = self.read_key(t)
        d = self.decisions[key] if key in self.decisions else self._decide(key)
        v: Any = False
        if d is not None:
            # with weights, once the layer's last weight stage is known, its top-k is read together with
            # the weights (one split per layer instead of two)
            deferred = d[0] == WHAT_TOPK and self.weights and d[1] in self.final_stage
            v = Probe(self, t, d[0], d[1], key, deferred)
            self.probes.append(v)
        self.live[t] = v
        return v

    def make_callback(self) -> Callable[[int], Any]:
        """The eval callback's Python side: ``live.__getitem__`` (C), called with the node pointer only
        (the ctypes prototype declares one argument; the C caller's other two are ignored)."""
        return self.live.__getitem__

    def take(self, p: Probe) -> None:
        t, what, layer = p.t, p.what, p.layer
        if self.read_key(t) != p.key:  # the node at this address is another tensor now: forget the maps
            self.stale_pointers += 1
            self.forget()
            v = self.miss(t)
            if v is False:
                return
            what, layer = v.what, v.layer
        if what == WHAT_TOPK:
            self._take_topk(t, layer)
        elif what == WHAT_DOWN:  # ffn_moe_down [n_embd, n_used, n_tok]: one L2 norm per token and slot
            ne = GGMLTensor.from_address(t).ne
            rows = read_rows(t, int(ne[0])).astype(np.float64)
            self.down[layer] = np.sqrt(np.einsum("ij,ij->i", rows, rows)).reshape(int(ne[2]), int(ne[1]))
        elif is_weight_stage(what):
            prev = self.w.get(layer)
            if prev is None or what >= prev[0]:
                self.w[layer] = (what, read_rows(t, self.k))
            q = self.pending.pop(layer, None)
            if q is not None:
                if self.read_key(q.t) != q.key:
                    raise CaptureError(f"layer {layer}: the top-k node moved in the graph; please report this")
                self._take_topk(q.t, layer)
        else:
            self.extras.setdefault(EXTRA_NAMES[what - WHAT_EXTRA], {})[layer] = read_rows(t, self.n_expert)

    def _take_topk(self, t: int, layer: int) -> None:
        if GGMLTensor.from_address(t).ne[0] != self.k:  # warm-up graph: n_expert_used = n_expert
            self.skipped_warmup += 1
            return
        self.topk[layer] = read_rows(t, self.k)

    def check_complete(self) -> None:
        """Each ubatch of a shape yields as many MoE layers as the first one of that shape did."""
        n = len(self.topk)
        first = self.layers_by_shape.setdefault(self.shape, n)
        if n != first:
            self.forget()
            raise CaptureError(f"a ubatch of shape {self.shape} yielded {n} MoE layers, earlier ones {first}: "
                               "llama.cpp's graph changed under the capture's node cache; please report this")

    def learn_stages(self) -> None:
        """After the first ubatch: observe from now on only the last weight stage of each layer."""
        changed = False
        for layer, (stage, _) in self.w.items():
            if self.final_stage.get(layer, -1) < stage:
                self.final_stage[layer] = stage
                changed = True
        if changed:
            self.decisions.clear()
            self.forget()
