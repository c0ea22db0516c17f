"""Live capture of llama.cpp's expert routing through the scheduler's eval callback (llama-cpp-python).

Why the low-level API: the high-level ``Llama`` takes no callback. We set ``cb_eval`` before the context
is created and observe only ``ffn_moe_topk-<il>`` (plus, with weights, the last of
``ffn_moe_weights_softmax/_norm/_scaled`` the architecture builds). The ``ask`` call, made for every graph
node, is a C-level dict lookup of the node's address (see _NodeMap); names are read only on a miss. One
``llama_decode`` is one ubatch (we never submit more than n_ubatch tokens), so each observed tensor's rows
are the ubatch's tokens, or, in the last layer, only its output rows (``get_rows(inp_out_ids)``).
"""
from __future__ import annotations

import ctypes
import itertools
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import InputError
from ..fingerprint import ModelFingerprint, model_fingerprint
from .format import PHASE_DECODE, PHASE_PREFILL
from .ggml_ctypes import (
    CaptureError,
    GGMLTensor,
    LlamaLog,
    ThreadPool,
    load_llama_cpp,
    name_key_reader,
    read_rows,
)

#: weight stages in graph order; the last one the architecture builds is what the model applies. The raw
#: ffn_moe_weights (before normalisation) is the answer only where no later stage exists (e.g. qwen2moe).
WEIGHT_STAGES = ("ffn_moe_weights", "ffn_moe_weights_softmax", "ffn_moe_weights_norm", "ffn_moe_weights_scaled")
EXTRA_NAMES = ("ffn_moe_logits", "ffn_moe_probs")
_NAME_RE = re.compile(r"^(ffn_moe_[a-z_]+)-(\d+)$")
#: bool cb(struct ggml_tensor * t, bool ask, void * user_data), declared with its first argument only
_ASK_PROTO = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)


class Sink(Protocol):
    def write(self, seq: int, phase: int, layer: int, pos: np.ndarray, tokens: np.ndarray,
              experts: np.ndarray, weights: np.ndarray | None = None) -> None: ...


@dataclass
class MemorySink:
    """Records kept in memory (tests, notebooks): one dict per (ubatch, layer)."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def write(self, seq: int, phase: int, layer: int, pos: np.ndarray, tokens: np.ndarray,
              experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        self.records.append({"seq": seq, "phase": phase, "layer": layer, "pos": np.asarray(pos), "tokens": np.asarray(tokens),
                                 "experts": np.asarray(experts), "weights": None if weights is None else np.asarray(weights)})


class _Probe:
    """The cached answer for one observed node: true when asked, and on the call after that (data ready)
    it hands the node to the collector. Its truth value *is* the callback's answer (see _NodeMap)."""

    __slots__ = ("armed", "col", "deferred", "key", "layer", "t", "what")

    def __init__(self, col: _Collector, t: int, what: int, layer: int, key: bytes, deferred: bool = False) -> None:
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


class _NodeMap(dict):
    """pointer -> False (not observed) or _Probe. Its C-level ``__getitem__`` *is* the eval callback, so
    the ask call for a known node runs no Python code; only misses (``__missing__``) do."""

    __slots__ = ("col",)

    def __missing__(self, t: int) -> Any:
        try:
            return self.col.miss(t)
        except BaseException as e:  # noqa: BLE001
            self.col.error = e
            return False


class _Collector:
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
        self.live = _NodeMap()  # the map of the ubatch shape being decoded; its __getitem__ is the callback
        self.live.col = self
        self.by_shape: dict[tuple[int, int], dict[int, Any]] = {}  # saved maps of the other shapes
        self.probes: list[_Probe] = []
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
        self.pending: dict[int, _Probe] = {}  # layer -> deferred top-k probe seen this ubatch
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
        """Parse a name once: (what, layer) to observe, or None. what: -1 topk, 0-2 weight stage, 100+ extra,
        200 ffn_moe_down."""
        m = _NAME_RE.match(key.split(b"\0", 1)[0].decode("utf-8", "replace"))
        what = None
        if m:
            base, layer = m.group(1), int(m.group(2))
            if base == "ffn_moe_topk":
                what = -1
            elif self.weights and base in WEIGHT_STAGES:
                stage = WEIGHT_STAGES.index(base)
                if stage >= self.final_stage.get(layer, -1):
                    what = stage
            elif self.extra and base in EXTRA_NAMES:
                what = 100 + EXTRA_NAMES.index(base)
            elif self.down_norms and base == "ffn_moe_down":
                what = 200
        d = None if what is None else (what, int(m.group(2)))  # type: ignore[union-attr]
        self.decisions[key] = d
        return d

    def miss(self, t: int) -> Any:
        """Answer for a pointer not in the live map: by its name; stored in the map."""
        key = self.read_key(t)
        d = self.decisions.get(key, 0)
        if d == 0:
            d = self._decide(key)
        v: Any = False
        if d is not None:
            # with weights, once the layer's last weight stage is known, its top-k is read together with
            # the weights (one split per layer instead of two)
            deferred = d[0] == -1 and self.weights and d[1] in self.final_stage
            v = _Probe(self, t, d[0], d[1], key, deferred)
            self.probes.append(v)
        self.live[t] = v
        return v

    def make_callback(self) -> Callable[[int], Any]:
        """The eval callback's Python side: ``live.__getitem__`` (C), called with the node pointer only
        (the ctypes prototype declares one argument; the C caller's other two are ignored)."""
        return self.live.__getitem__

    def take(self, p: _Probe) -> None:
        t, what, layer = p.t, p.what, p.layer
        if self.read_key(t) != p.key:  # the node at this address is another tensor now: forget the maps
            self.stale_pointers += 1
            self.forget()
            v = self.miss(t)
            if v is False:
                return
            what, layer = v.what, v.layer
        if what == -1:
            self._take_topk(t, layer)
        elif what == 200:  # ffn_moe_down [n_embd, n_used, n_tok]: one L2 norm per token and slot
            ne = GGMLTensor.from_address(t).ne
            rows = read_rows(t, int(ne[0])).astype(np.float64)
            self.down[layer] = np.sqrt(np.einsum("ij,ij->i", rows, rows)).reshape(int(ne[2]), int(ne[1]))
        elif what < 100:
            prev = self.w.get(layer)
            if prev is None or what >= prev[0]:
                self.w[layer] = (what, read_rows(t, self.k))
            q = self.pending.pop(layer, None)
            if q is not None:
                if self.read_key(q.t) != q.key:
                    raise CaptureError(f"layer {layer}: the top-k node moved in the graph; please report this")
                self._take_topk(q.t, layer)
        else:
            self.extras.setdefault(EXTRA_NAMES[what - 100], {})[layer] = read_rows(t, self.n_expert)

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


class TracedLlama:
    """A llama.cpp model + context whose MoE routing goes to a sink; drive it with tokenize/eval/generate.

    Each ``generate``/``new_sequence`` starts a fresh KV state and a new sequence index in the trace.
    While traced, ``llama_decode`` holds the GIL (see _gil_holding_decode): other Python threads pause
    during a decode. ``trace=False`` gives the same model and context without the callback (benchmarks).
    """

    def __init__(self, model_path: str | os.PathLike[str], sink: Sink, fingerprint: ModelFingerprint,
                 weights: bool = False, n_ctx: int = 2048, n_ubatch: int = 512, n_threads: int | None = None,
                 n_gpu_layers: int = 0, observe_extra: bool = False, trace: bool = True,
                 observe_down_norms: bool = False, seq_counter: Iterator[int] | None = None) -> None:
        self.lc = load_llama_cpp()
        lc = self.lc
        self.sink, self.fp = sink, fingerprint
        self.n_ctx, self.n_ubatch = int(n_ctx), int(min(n_ubatch, n_ctx))
        if self.n_ctx < 8:
            raise InputError(f"--ctx-size {n_ctx}: too small, use at least 8")
        self._model = self._ctx = None
        self._batch: Any = None
        self._pool: ThreadPool | None = None
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = int(n_gpu_layers)
        with LlamaLog() as log:
            self._model = lc.llama_model_load_from_file(str(model_path).encode(), mp)
        if not self._model:
            raise CaptureError(f"{model_path}: llama.cpp could not load the model: {log.tail()}")
        self.vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        self.collector = _Collector(fingerprint.n_expert, fingerprint.n_expert_used, weights, observe_extra,
                                    down_norms=observe_down_norms)
        self.extras_log: list[dict[str, Any]] = []
        cp = lc.llama_context_default_params()
        cp.n_ctx = self.n_ctx
        cp.n_batch = cp.n_ubatch = self.n_ubatch
        cp.n_seq_max = 1
        threads = int(n_threads or max(1, min(os.cpu_count() or 1, 8)))
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self._traced = trace
        if trace:
            # one-argument prototype: the callback is the node map's C-level __getitem__ (see _NodeMap)
            self._thunk = _ASK_PROTO(self.collector.make_callback())  # keep references: C holds the pointer
            self._cb = ctypes.cast(self._thunk, lc.ggml_backend_sched_eval_callback)
            cp.cb_eval = self._cb
            cp.cb_eval_user_data = None
        with LlamaLog() as log:
            self._ctx = lc.llama_init_from_model(self._model, cp)
        if not self._ctx:
            self.close()
            raise CaptureError(f"{model_path}: llama.cpp could not create a context (n_ctx {n_ctx}): {log.tail()}")
        if hasattr(lc, "llama_set_warmup"):
            lc.llama_set_warmup(self._ctx, False)
        self._pool = ThreadPool(lc, self._ctx, threads)
        self._llama_decode = _gil_holding_decode(lc) if trace else lc.llama_decode
        self._batch = lc.llama_batch_init(self.n_ubatch, 0, 1)
        b = self._batch
        self._tok = np.ctypeslib.as_array(b.token, shape=(self.n_ubatch,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(self.n_ubatch,))
        self._logits = np.ctypeslib.as_array(b.logits, shape=(self.n_ubatch,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_ubatch,))[:] = 1
        for i in range(self.n_ubatch):  # once per context: every row belongs to sequence 0
            b.seq_id[i][0] = 0
        self.seq = -1
        self._seq_counter = seq_counter if seq_counter is not None else itertools.count()
        self.n_past = 0
        self.tokens_done = 0

    # -- driving -----------------------------------------------------------------------------------
    def tokenize(self, text: str | bytes, add_special: bool = True) -> list[int]:
        """Token ids of ``text`` (str, or UTF-8 bytes as llama-cpp-python's Llama.tokenize takes)."""
        raw = bytes(text) if isinstance(text, (bytes, bytearray)) else text.encode("utf-8")
        cap = len(raw) + 8
        buf = (self.lc.llama_token * cap)()
        n = self.lc.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, False)
        if n < 0:
            cap = -n
            buf = (self.lc.llama_token * cap)()
            n = self.lc.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, False)
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        out = bytearray()
        buf = ctypes.create_string_buffer(64)
        for t in tokens:
            n = self.lc.llama_token_to_piece(self.vocab, int(t), buf, 64, 0, False)
            out += buf.raw[:max(n, 0)]
        return out.decode("utf-8", "replace")

    def new_sequence(self) -> int:
        """Fresh KV state; later tokens belong to the next sequence index of the trace."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self._ctx), True)
        self.seq = next(self._seq_counter)
        self.n_past = 0
        return self.seq

    def eval(self, tokens: Sequence[int], phase: int = PHASE_PREFILL, logits: str = "last") -> None:
        """Feed tokens at the current position, in ubatches; ``logits`` "last" or "all" rows requested."""
        toks = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if self.seq < 0:
            self.new_sequence()
        if self.n_past + len(toks) > self.n_ctx:
            raise InputError(f"sequence {self.seq}: {self.n_past + len(toks)} tokens exceed the context of "
                             f"{self.n_ctx}; raise --ctx-size or shorten the prompt")
        for s in range(0, len(toks), self.n_ubatch):
            chunk = toks[s:s + self.n_ubatch]
            out = np.zeros(len(chunk), dtype=np.int8)
            if logits == "all":
                out[:] = 1
            elif s + len(chunk) == len(toks):
                out[-1] = 1
            self._decode(chunk, out, phase)

    def _decode(self, chunk: np.ndarray, out: np.ndarray, phase: int) -> None:
        n = len(chunk)
        pos = np.arange(self.n_past, self.n_past + n, dtype=np.int32)
        self._tok[:n] = chunk
        self._pos[:n] = pos
        self._logits[:n] = out
        self._batch.n_tokens = n
        col = self.collector
        col.reset((n, int(out.sum())))
        col.error = None
        rc = self._llama_decode(self._ctx, self._batch)
        if col.error is not None:
            err, col.error = col.error, None
            raise err
        if rc != 0:
            raise CaptureError(f"llama_decode failed (rc {rc}) at sequence {self.seq}, position {self.n_past}")
        if self._traced:
            col.check_complete()
        self.n_past += n
        self.tokens_done += n
        self._flush(pos, chunk, out.astype(bool), phase)

    def _flush(self, pos: np.ndarray, tokens: np.ndarray, out: np.ndarray, phase: int) -> None:
        col = self.collector
        if col.weights and col.w and len(col.final_stage) < len(col.w):
            col.learn_stages()
        n_out = int(out.sum())
        recs = []
        for layer in sorted(col.topk):
            ids = col.topk[layer]
            rows = ids.shape[0]
            if rows == 0:
                continue
            if rows == len(tokens):
                sel: Any = slice(None)
            elif rows == n_out:  # last layer after get_rows(inp_out_ids): output rows only
                sel = out
            else:
                raise CaptureError(f"layer {layer}: ffn_moe_topk has {rows} rows for a ubatch of {len(tokens)} "
                                   f"tokens with {n_out} outputs; this llama.cpp graph is not understood")
            w = None
            if col.weights:
                got = col.w.get(layer)
                if got is None or got[1].shape[0] != rows:
                    raise CaptureError(f"layer {layer}: no gate weights ({', '.join(WEIGHT_STAGES)}) found in "
                                       "the graph; capture without --weights")
                w = got[1]
            recs.append((layer, pos[sel], tokens[sel], ids, w))
        # one write() per record (~7 us): a crash loses at most the record being written
        for layer, p, tk, ids, w in recs:
            if col.down_norms:  # the sink takes the norms as a keyword (profile's sink; see observe_down_norms)
                self.sink.write(self.seq, phase, layer, p, tk, ids, w, down_norms=col.down.get(layer))
            else:
                self.sink.write(self.seq, phase, layer, p, tk, ids, w)
        if col.extra:
            self.extras_log.append(dict(seq=self.seq, phase=phase, pos=pos, tokens=tokens, out=out,
                                        topk=dict(col.topk), weights={k: v[1] for k, v in col.w.items()},
                                        **{k: dict(v) for k, v in col.extras.items()}))

    def greedy(self) -> int:
        """Argmax of the last requested logits row."""
        p = self.lc.llama_get_logits_ith(self._ctx, -1)
        row = np.ctypeslib.as_array(p, shape=(self.n_vocab,))
        return int(np.argmax(row))

    def generate(self, prompt: str | bytes | Sequence[int], n_predict: int = 32, ignore_eos: bool = False,
                 new_sequence: bool = True, logits: str = "last",
                 progress: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[int]:
        """Prefill the prompt (fresh sequence), then greedy-decode up to n_predict tokens one by one."""
        toks = self.tokenize(prompt) if isinstance(prompt, (str, bytes)) else list(prompt)
        if not toks:
            raise InputError("empty prompt: nothing to evaluate")
        if new_sequence:
            self.new_sequence()
        n_predict = min(int(n_predict), self.n_ctx - self.n_past - len(toks))
        self.eval(toks, PHASE_PREFILL, logits)
        if progress:
            progress(len(toks))
        new: list[int] = []
        for _ in range(max(n_predict, 0)):
            if should_stop is not None and should_stop():
                break
            t = self.greedy()
            if not ignore_eos and self.lc.llama_vocab_is_eog(self.vocab, t):
                break
            new.append(t)
            self._decode(np.array([t], dtype=np.int32), np.ones(1, dtype=np.int8), PHASE_DECODE)
            if progress:
                progress(1)
        return new

    def close(self) -> None:
        lc = self.lc
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._ctx:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> TracedLlama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gil_holding_decode(lc: Any) -> Any:
    """``llama_decode`` called through a PyDLL handle, which keeps the GIL during the call.

    Why: a CDLL call releases the GIL, so each of the eval callback's ~45 calls per layer and token
    would have to take it back and release it again (~0.3 us each, most of the capture's overhead on
    CPU). Holding it makes those calls cheap; no other Python thread needs to run during a decode.
    """
    try:
        lib = ctypes.PyDLL(lc.llama_cpp._lib._name)
        fn = lib.llama_decode
    except (AttributeError, OSError):  # an unusual build: the ordinary binding still works, just slower
        return lc.llama_decode
    fn.argtypes = [ctypes.c_void_p, lc.llama_batch]
    fn.restype = ctypes.c_int32
    return fn


class Recorder:
    """``with Recorder("t.bin", weights=True) as rec: llm = rec.llama(path, n_ctx=...)``; drive ``llm``.

    The trace file is opened when the first model is attached (its header holds the model fingerprint);
    every record is written as soon as its ubatch is decoded, and ``close`` leaves a complete file.
    """

    def __init__(self, path: str | os.PathLike[str], weights: bool = False, meta: dict[str, Any] | None = None,
                 sink: Sink | None = None) -> None:
        self.path = Path(path)
        self.weights = weights
        self.meta = dict(meta or {})
        self.sink: Any = sink
        self._owns_sink = sink is None
        self._llms: list[TracedLlama] = []
        self._seqs = itertools.count()  # sequence indices are unique across the llamas of one recorder
        self.fingerprint: ModelFingerprint | None = None

    def llama(self, model_path: str | os.PathLike[str], n_ctx: int = 2048, n_ubatch: int = 512,
              n_threads: int | None = None, n_gpu_layers: int = 0, observe_extra: bool = False) -> TracedLlama:
        fp = model_fingerprint(model_path)
        if self.fingerprint is not None and fp != self.fingerprint:
            raise InputError(f"{model_path}: a Recorder traces one model; {self.path} already holds another")
        # load the model first: a model llama.cpp refuses leaves no trace file behind
        llm = TracedLlama(model_path, MemorySink(), fp, weights=self.weights, n_ctx=n_ctx, n_ubatch=n_ubatch,
                          n_threads=n_threads, n_gpu_layers=n_gpu_layers, observe_extra=observe_extra,
                          seq_counter=self._seqs)
        try:
            if self.sink is None:
                from ..gguf_file import open_model
                from ..prune_map import META_KEY, mapping_of
                from .writer import TraceWriter

                meta = {"tool": "gguf-experts capture", "model": Path(model_path).name, "n_ctx": n_ctx,
                        "n_ubatch": n_ubatch, "weights": self.weights,
                        "llama_cpp_python": getattr(llm.lc, "__version__", "?"), **self.meta}
                pruned = mapping_of(open_model(model_path).kv)
                if pruned is not None:  # analyses read this trace in the original model's expert ids
                    meta[META_KEY] = pruned.to_dict()
                self.sink = TraceWriter(self.path, fp, meta)
        except BaseException:
            llm.close()
            raise
        llm.sink = self.sink
        self.fingerprint = fp
        self._llms.append(llm)
        return llm

    def close(self) -> None:
        try:
            for llm in self._llms:
                llm.close()
        finally:
            if self._owns_sink and self.sink is not None and hasattr(self.sink, "close"):
                self.sink.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class CaptureResult:
    path: Path
    sequences: int
    tokens: int
    prefill_tokens: int
    decode_tokens: int
    records: int
    seconds: float
    interrupted: bool
    stopped_at_eog: int = 0  # sequences whose decode ended at an end-of-generation token before n_predict

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class _StopOnSigint:
    """Turn the first Ctrl-C into a flag checked between decodes (main thread only), so the trace ends
    on a record boundary; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.stop = False
        self._old: Any = None

    def __enter__(self) -> _StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            def handler(signum: int, frame: Any) -> None:
                if self.stop:
                    raise KeyboardInterrupt
                self.stop = True
            self._old = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def capture(model_path: str | os.PathLike[str], prompts: Iterable[str], out: str | os.PathLike[str],
            n_predict: int = 32, weights: bool = False, n_ctx: int = 2048, n_ubatch: int = 512,
            n_threads: int | None = None, n_gpu_layers: int = 0, ignore_eos: bool = False, logits: str = "last",
            progress: Callable[[int], None] | None = None, meta: dict[str, Any] | None = None) -> CaptureResult:
    """Run every prompt as its own sequence (prefill, then greedy decode) and write the trace to ``out``.

    ``seconds``/``tokens_per_s`` of the result cover prefill and decode, not the model load. The first
    Ctrl-C stops after the current token with the trace complete (``interrupted`` is set).
    """
    texts = list(prompts)
    if not texts:
        raise InputError("no prompts given: pass at least one non-empty prompt")
    seqs = prefill = decode = eog = 0
    interrupted = False
    rec = Recorder(out, weights=weights, meta={"n_predict": n_predict, "prompts": len(texts), **(meta or {})})
    with _StopOnSigint() as stop, rec:
        llm = rec.llama(model_path, n_ctx=n_ctx, n_ubatch=n_ubatch, n_threads=n_threads, n_gpu_layers=n_gpu_layers)
        tokenized = [llm.tokenize(text) for text in texts]
        too_long = [(i, len(t)) for i, t in enumerate(tokenized) if len(t) >= n_ctx]
        if too_long:  # refuse before capturing anything, and leave no header-only trace behind
            rec.close()
            Path(out).unlink(missing_ok=True)
            i, n = too_long[0]
            raise InputError(f"prompt {i}: {n} tokens do not fit --ctx-size {n_ctx} ({len(too_long)} prompts too "
                             "long); raise --ctx-size or shorten them")
        t0 = time.perf_counter()
        try:
            for toks in tokenized:
                if stop.stop:
                    break
                if not toks:
                    continue
                new = llm.generate(toks, n_predict, ignore_eos=ignore_eos, logits=logits, progress=progress,
                                   should_stop=lambda: stop.stop)
                seqs += 1
                prefill += len(toks)
                decode += len(new)
                eog += len(new) < min(n_predict, n_ctx - len(toks)) and not stop.stop
            interrupted = stop.stop
        except KeyboardInterrupt:
            interrupted = True
    records = getattr(rec.sink, "records_written", 0)
    return CaptureResult(Path(out), seqs, prefill + decode, prefill, decode, records, time.perf_counter() - t0,
                         interrupted, eog)

