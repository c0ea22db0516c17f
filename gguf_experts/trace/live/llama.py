"""The llama driver: a llama.cpp model + context (llama-cpp-python's low-level API) whose MoE routing goes
to a sink through the scheduler's eval callback (see probe.py for what the callback observes).

Why the low-level API: the high-level ``Llama`` takes no callback. We set ``cb_eval`` before the context
is created. One ``llama_decode`` is one ubatch (we never submit more than n_ubatch tokens), so each
observed tensor's rows are the ubatch's tokens, or, in the last layer, only its output rows
(``get_rows(inp_out_ids)``).
"""
from __future__ import annotations

import ctypes
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ...errors import InputError
from ...gguf.fingerprint import ModelFingerprint
from ..format import PHASE_DECODE, PHASE_PREFILL
from .ggml_ctypes import CaptureError, LlamaLog, ThreadPool, load_llama_cpp
from ..iostat import IoCounters
from .probe import ASK_PROTO, WEIGHT_STAGES, Collector

class Sink(Protocol):
    """Where TracedLlama sends each (ubatch, MoE layer) record; ``down_norms`` [rows, k] only when the
    llama observes them (observe_down_norms: profile's REAP sink)."""

    def write(self, seq: int, phase: int, layer: int, pos: np.ndarray, tokens: np.ndarray,
              experts: np.ndarray, weights: np.ndarray | None = None,
              down_norms: np.ndarray | None = None) -> None: ...


@dataclass
class MemorySink:
    """Records kept in memory (tests, notebooks): one dict per (ubatch, layer), one per ubatch measurement."""

    records: list[dict[str, Any]] = field(default_factory=list)
    measurements: list[dict[str, int]] = field(default_factory=list)

    def write_measurement(self, seq: int, phase: int, n_tokens: int, read_bytes: int, majflt: int,
                          wall_ns: int) -> None:
        self.measurements.append({"seq": seq, "phase": phase, "n_tokens": n_tokens, "read_bytes": read_bytes,
                                  "majflt": majflt, "wall_ns": wall_ns})

    def write(self, seq: int, phase: int, layer: int, pos: np.ndarray, tokens: np.ndarray,
              experts: np.ndarray, weights: np.ndarray | None = None,
              down_norms: np.ndarray | None = None) -> None:
        rec = {"seq": seq, "phase": phase, "layer": layer, "pos": np.asarray(pos), "tokens": np.asarray(tokens),
               "experts": np.asarray(experts), "weights": None if weights is None else np.asarray(weights)}
        if down_norms is not None:
            rec["down_norms"] = np.asarray(down_norms)
        self.records.append(rec)


class TracedLlama:
    """A llama.cpp model + context whose MoE routing goes to a sink; drive it with tokenize/eval/generate.

    Each ``generate``/``new_sequence`` starts a fresh KV state and a new sequence index in the trace.
    While traced, ``llama_decode`` holds the GIL (see _gil_holding_decode): other Python threads pause
    during a decode. ``trace=False`` gives the same model and context without the callback (benchmarks).
    """

    def __init__(self, model_path: str | os.PathLike[str], sink: Sink, fingerprint: ModelFingerprint,
                 weights: bool = False, n_ctx: int = 2048, n_ubatch: int = 512, n_threads: int | None = None,
                 n_gpu_layers: int = 0, observe_extra: bool = False, trace: bool = True,
                 observe_down_norms: bool = False, seq_counter: Iterator[int] | None = None,
                 measure: bool = True, native: Any = None) -> None:
        self.lc = load_llama_cpp()
        # native: a NativeTrace (native.py): the C tracer records (keep-alive), not the callback and the sink
        self.native = native
        if native is not None:  # the callback only for observe_extra (a self-check: the same run's probabilities)
            trace = observe_extra
            measure = False
        # measured I/O per ubatch (trace version 2), to sinks that take it (write_measurement)
        self.io: IoCounters | None = IoCounters() if measure else None
        lc = self.lc
        self.sink, self.fp = sink, fingerprint
        self.n_ctx, self.n_ubatch = int(n_ctx), int(min(n_ubatch, n_ctx))
        if self.n_ctx < 8:
            raise InputError(f"--ctx-size {n_ctx}: too small, use at least 8")
        self._model = self._ctx = None
        self._batch: Any = None
        self._pool: ThreadPool | None = None
        from ...gguf.reader import open_model

        open_model(model_path)  # the metadata checks first: llama.cpp aborts the process on some bad values
        if int(n_gpu_layers) > 0 and not lc.llama_supports_gpu_offload():
            raise InputError(f"--n-gpu-layers {n_gpu_layers}: this llama-cpp-python build has no GPU offload (it "
                             "would run on the CPU); use -ngl 0, or install a GPU build (docs/capture.md, GPU check)")
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = int(n_gpu_layers)
        with LlamaLog() as log:
            self._model = lc.llama_model_load_from_file(str(model_path).encode(), mp)
        if not self._model:
            raise CaptureError(f"{model_path}: llama.cpp could not load the model: {log.tail()}")
        self.vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        self._max_piece: int | None = None
        self.collector = Collector(fingerprint.n_expert, fingerprint.n_expert_used, weights, observe_extra,
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
            # one-argument prototype: the callback is the node map's C-level __getitem__ (see NodeMap)
            self._thunk = ASK_PROTO(self.collector.make_callback())  # keep references: C holds the pointer
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
        self._llama_decode = (native.decode if native is not None else _gil_holding_decode(lc) if trace
                              else lc.llama_decode)
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

    def max_token_bytes(self) -> int:
        """Bytes of the vocabulary's longest token piece (cached): a text of B bytes needs at least
        B / this many tokens, which bounds a prompt's length before it is tokenised."""
        if self._max_piece is None:
            buf = ctypes.create_string_buffer(256)
            longest = 1
            for t in range(self.n_vocab):
                n = self.lc.llama_token_to_piece(self.vocab, t, buf, 256, 0, False)
                longest = max(longest, abs(int(n)))
            self._max_piece = longest
        return self._max_piece

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
        io = self.io
        before = io.snapshot() if io is not None else None
        if self.native is not None:
            self.native.phase(phase)
        rc = self._llama_decode(self._ctx, self._batch)
        after = io.snapshot() if io is not None else None
        if col.error is not None:
            err, col.error = col.error, None
            raise err
        if rc != 0:
            raise CaptureError(f"llama_decode failed (rc {rc}) at sequence {self.seq}, position {self.n_past}")
        if self._traced:
            col.check_complete()
        self.n_past += n
        self.tokens_done += n
        if self.native is not None and not self.collector.extra:  # the C tracer writes the records
            return
        self._flush(pos, chunk, out.astype(bool), phase)
        put = getattr(self.sink, "write_measurement", None)
        if after is not None and before is not None and put is not None:
            put(self.seq, phase, n, *after.delta(before))

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
        if self.io is not None:
            self.io.close()

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
