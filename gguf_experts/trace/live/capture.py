"""Live capture of llama.cpp's expert routing into a trace file: ``Recorder`` and ``capture``.

The graph probe (which nodes the eval callback observes) is in probe.py, the llama driver (model,
context, tokenize/eval/generate) in llama.py; both are re-exported here, where users import them from.
"""
from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import InputError
from ...gguf.fingerprint import ModelFingerprint, model_fingerprint
from .prompts import cannot_fit
from .llama import MemorySink, Sink, TracedLlama

__all__ = ["CaptureResult", "Recorder", "capture"]


class Recorder:
    """``with Recorder("t.bin", weights=True) as rec: llm = rec.llama(path, n_ctx=...)``; drive ``llm``.

    ``mode`` "keepalive" (the default for a trace file): the C tracer of `gguf-experts run`, loaded in-process
    (native.py), records; "callback": the eval callback observes each layer's nodes and hands them to a sink
    (the default with ``sink``, under `gguf-experts run`, and needed for ``observe_extra``). The trace file is
    complete after ``close``.
    """

    def __init__(self, path: str | os.PathLike[str], weights: bool = False, meta: dict[str, Any] | None = None,
                 sink: Sink | None = None, mode: str | None = None) -> None:
        from .native import MODES, traced_by_run

        if mode is None:
            mode = "keepalive" if sink is None and not traced_by_run() and _tracer_builds() else "callback"
        if mode not in MODES:
            raise InputError(f"--mode {mode}: use one of {', '.join(MODES)}")
        if mode == "keepalive" and sink is not None:
            raise InputError("a Recorder with a sink records through the callback: pass mode='callback'")
        self.mode = mode
        self._native: Any = None
        self._native_meta: dict[str, Any] = {}
        self._records = 0
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
        from ..iostat import IoCounters, io_load, io_start

        if self.mode == "keepalive":
            return self._native_llama(model_path, n_ctx, n_ubatch, n_threads, n_gpu_layers, observe_extra)
        counters = IoCounters()
        start = counters.snapshot()
        # before anything reads the model (even its header: read-ahead brings in megabytes): cold or warm
        started = io_start(model_path, counters) if self.sink is None else None
        fp = model_fingerprint(model_path)
        if self.fingerprint is not None and fp != self.fingerprint:
            counters.close()
            raise InputError(f"{model_path}: a Recorder traces one model; {self.path} already holds another")
        # load the model first: a model llama.cpp refuses leaves no trace file behind
        llm = TracedLlama(model_path, MemorySink(), fp, weights=self.weights, n_ctx=n_ctx, n_ubatch=n_ubatch,
                          n_threads=n_threads, n_gpu_layers=n_gpu_layers, observe_extra=observe_extra,
                          seq_counter=self._seqs)
        try:
            if self.sink is None:
                from ...gguf.reader import open_model
                from ...gguf.expert_ids import META_KEY, mapping_of
                from ..writer import TraceWriter

                meta = {"tool": "gguf-experts capture", "model": Path(model_path).name, "n_ctx": n_ctx,
                        "n_ubatch": n_ubatch, "weights": self.weights,
                        "llama_cpp_python": getattr(llm.lc, "__version__", "?"),
                        "io_start": started, "io_load": io_load(start, counters.snapshot()), **self.meta}
                pruned = mapping_of(open_model(model_path).kv)
                if pruned is not None:  # analyses read this trace in the original model's expert ids
                    meta[META_KEY] = pruned.to_dict()
                self.sink = TraceWriter(self.path, fp, meta)
        except BaseException:
            llm.close()
            raise
        finally:
            counters.close()
        llm.sink = self.sink
        self.fingerprint = fp
        self._llms.append(llm)
        return llm

    def _native_llama(self, model_path: str | os.PathLike[str], n_ctx: int, n_ubatch: int, n_threads: int | None,
                      n_gpu_layers: int, observe_extra: bool) -> TracedLlama:
        """rec.llama in keep-alive mode: the C tracer writes the trace (one implementation with `run`)."""
        from ..iostat import IoCounters, io_load, io_start
        from .ggml_ctypes import load_llama_cpp
        from .native import NativeTrace

        if observe_extra:
            raise InputError("observe_extra reads intermediate tensors per layer: use mode='callback'")
        counters = IoCounters()
        try:
            start = counters.snapshot()
            # io_start and io_load as the callback path measures them: from before anything reads the model (our
            # own header reads included, whose read-ahead can bring in a small model whole) to the loaded context
            started = io_start(model_path, counters)
            fp = model_fingerprint(model_path)
            if self.fingerprint is not None and fp != self.fingerprint:
                raise InputError(f"{model_path}: a Recorder traces one model; {self.path} already holds another")
            lc = load_llama_cpp()
            fresh = self._native is None
            if fresh:
                self._native = NativeTrace(self.path, self.weights, lc)
            try:
                llm = TracedLlama(model_path, MemorySink(), fp, weights=self.weights, n_ctx=n_ctx,
                                  n_ubatch=n_ubatch, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                                  seq_counter=self._seqs, native=self._native)
            except BaseException:
                if fresh:  # a model llama.cpp refuses leaves no trace file behind
                    self._native.abandon()
                    self._native = None
                    self.path.unlink(missing_ok=True)
                raise
            loaded = io_load(start, counters.snapshot())
        finally:
            counters.close()
        if fresh:
            from ...gguf.reader import open_model
            from ...gguf.expert_ids import META_KEY, mapping_of

            self._native_meta = {"tool": "gguf-experts capture", "model": Path(model_path).name, "n_ctx": n_ctx,
                                 "n_ubatch": n_ubatch, "weights": self.weights,
                                 "llama_cpp_python": getattr(lc, "__version__", "?"), "io_start": started,
                                 "io_load": loaded, **self.meta}
            pruned = mapping_of(open_model(model_path).kv)
            if pruned is not None:  # analyses read this trace in the original model's expert ids
                self._native_meta[META_KEY] = pruned.to_dict()
        self.fingerprint = fp
        self._llms.append(llm)
        return llm

    @property
    def records(self) -> int:
        """Records written so far (keep-alive: counted by the C tracer)."""
        if self._native is not None:
            return self._native.records()
        return self._records if self.mode == "keepalive" else int(getattr(self.sink, "records_written", 0))

    def close(self) -> None:
        try:
            for llm in self._llms:
                llm.close()
        finally:
            if self._native is not None:
                native, self._native = self._native, None
                self._records = native.records()
                if not native.finish(self._native_meta) and self.fingerprint is not None:
                    from ..writer import TraceWriter  # nothing traced: a valid trace with no records

                    TraceWriter(self.path, self.fingerprint, self._native_meta).close()
            if self._owns_sink and self.sink is not None and hasattr(self.sink, "close"):
                self.sink.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tracer_builds() -> bool:
    """Whether the C tracer is there or can be built (no C compiler: capture falls back to the callback)."""
    from ..preload.run import PreloadBuildError, build_preload

    try:
        build_preload()
    except PreloadBuildError:
        return False
    return True


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
            progress: Callable[[int], None] | None = None, meta: dict[str, Any] | None = None,
            mode: str | None = None) -> CaptureResult:
    """Run every prompt as its own sequence (prefill, then greedy decode) and write the trace to ``out``.

    ``seconds``/``tokens_per_s`` of the result cover prefill and decode, not the model load. The first
    Ctrl-C stops after the current token with the trace complete (``interrupted`` is set). ``mode``: see Recorder.
    """
    texts = list(prompts)
    if not texts:
        raise InputError("no prompts given: pass at least one non-empty prompt")
    seqs = prefill = decode = eog = 0
    interrupted = False
    rec = Recorder(out, weights=weights, meta={"n_predict": n_predict, "prompts": len(texts), **(meta or {})},
                   mode=mode)
    with _StopOnSigint() as stop, rec:
        llm = rec.llama(model_path, n_ctx=n_ctx, n_ubatch=n_ubatch, n_threads=n_threads, n_gpu_layers=n_gpu_layers)
        longest = llm.max_token_bytes()
        surely = [i for i, text in enumerate(texts) if cannot_fit(text, n_ctx - 1, longest)]
        if surely:  # refused before tokenising: llama_tokenize's cost grows faster than the text
            rec.close()
            Path(out).unlink(missing_ok=True)
            i = surely[0]
            raise InputError(f"prompt {i}: {len(texts[i].encode('utf-8'))} bytes need at least "
                             f"{len(texts[i].encode('utf-8')) // longest} tokens (the longest token is {longest} "
                             f"bytes), more than --ctx-size {n_ctx} ({len(surely)} prompts too long); raise "
                             "--ctx-size or shorten them")
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
    records = rec.records
    return CaptureResult(Path(out), seqs, prefill + decode, prefill, decode, records, time.perf_counter() - t0,
                         interrupted, eog)
