"""Fleets on Dask (the ``[dask]`` extra): the work of many traces spread over a Dask cluster, with results equal
to the single-process ones.

What is spread, and why the results cannot differ:
- over trace files: each worker does, for one whole trace, exactly what the single process does for it (its
  counts and per-sequence rows, its own cache, its pins' training counts and scores); the driver combines the
  per-trace results by the rules of gguf_experts.fleet, in the same order;
- over parts of big trace.bin files (join-trace, diff, report's heat): counts add, so each worker counts the
  records of a byte range cut at record boundaries (trace.reader.record_start) and the driver adds them; the
  sequence ids of every part are kept, so the number of sequences is that of the whole chained fleet.
A worker's gguf-experts warnings (a recovered trace, empty records) are returned and raised again by the
driver; a part that warns is counted again whole, so that warnings and counts are those of one process.

dask and distributed are imported only here, and only when a cluster is asked for (--scheduler, --workers):
the single-process path, the default, imports neither.
"""
from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import GGUFExpertsError

if TYPE_CHECKING:  # imported where used: a command imports this module for its options, at start-up
    from .analysis.diff import ShareDiff
    from .gguf.fingerprint import ModelFingerprint
    from .heat import Counts, HeatResult

DEFAULT_PART_BYTES = 64 << 20  # a part of a big trace.bin: seconds of counting, small next to a task's overhead
CONNECT_TIMEOUT_S = 3  # --scheduler: how long to wait for a scheduler to answer
INSTALL_HINT = "pip install 'gguf-experts[dask]'"


class DaskError(GGUFExpertsError):
    """A cluster could not be had: bad --workers/--scheduler, no scheduler answering, dask not installed."""


@dataclass
class DaskSettings:
    """Where the work runs: ``scheduler`` (an existing cluster's address), ``workers`` (a local cluster of that
    many processes), or neither (this process). ``part_bytes``: the size of the parts big trace.bin files are
    cut into."""

    scheduler: str | None = None
    workers: int | None = None
    part_bytes: int = DEFAULT_PART_BYTES

    @property
    def wanted(self) -> bool:
        return self.scheduler is not None or self.workers is not None

    def check(self) -> None:
        if self.scheduler is not None and self.workers is not None:
            raise DaskError("--scheduler and --workers exclude each other: give --scheduler ADDRESS to use a running "
                            "cluster, or --workers N to start a local one")
        if self.workers is not None and self.workers < 1:
            raise DaskError(f"--workers {self.workers}: give a number of worker processes of 1 or more")
        if self.scheduler is not None and not self.scheduler.strip():
            raise DaskError("--scheduler: give the scheduler's address, e.g. tcp://10.0.0.5:8786")
        if self.part_bytes < 1:
            raise DaskError(f"--part-size {self.part_bytes}: give a positive number of bytes, e.g. 64M")


class Runner:
    """This process: map is a plain loop (what every command does without --scheduler/--workers)."""

    workers = 1
    part_bytes: int | None = None  # no parts: a trace is read whole

    @property
    def distributed(self) -> bool:
        return False

    def map(self, fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> list[Any]:
        """[fn(item, *args) for item in items], in order."""
        return [fn(x, *args) for x in items]

    def keep(self, fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> list[Any]:
        """Like map, but the results stay where they were made (on the workers), as handles that map and keep
        accept in place of values; ``gather`` brings them here."""
        return self.map(fn, items, *args)

    def gather(self, handles: Sequence[Any]) -> list[Any]:
        return list(handles)


def _task(fn: Callable[..., Any], *args: Any) -> tuple[Any, list[warnings.WarningMessage]]:
    """Run on a worker: fn's value and the gguf-experts warnings it raised (for the driver to raise again)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn(*args)
    return value, [w for w in caught if w.category.__module__.startswith("gguf_experts")]


def _reraise(caught: Sequence[warnings.WarningMessage]) -> None:
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=3)


class DaskRunner(Runner):
    """A Dask client: one task per item, results gathered in order, worker warnings raised here."""

    def __init__(self, client: Any, part_bytes: int) -> None:
        self.client = client
        self.part_bytes = part_bytes
        self.workers = max(1, len(client.scheduler_info().get("workers", {})))

    @property
    def distributed(self) -> bool:
        return True

    def _submit(self, fn: Callable[..., Any], items: Sequence[Any], args: tuple[Any, ...]) -> list[Any]:
        return [self.client.submit(_task, fn, x, *args, pure=False) for x in items]

    def map(self, fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> list[Any]:
        out = []
        for value, caught in self.client.gather(self._submit(fn, items, args)):
            _reraise(caught)
            out.append(value)
        return out

    def keep(self, fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> list[Any]:
        futs = self._submit(fn, items, args)
        for caught in self.client.gather([self.client.submit(operator.itemgetter(1), f) for f in futs]):
            _reraise(caught)
        return [self.client.submit(operator.itemgetter(0), f) for f in futs]

    def gather(self, handles: Sequence[Any]) -> list[Any]:
        return list(self.client.gather(list(handles)))


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise DaskError(f"--scheduler/--workers need dask's distributed scheduler, which is not installed: "
                        f"{INSTALL_HINT}") from None
    return distributed


@contextmanager
def runner_for(settings: DaskSettings | None) -> Iterator[Runner]:
    """A Runner for the settings: this process (none asked), a local cluster of ``workers`` processes (one
    thread each: the work is numpy on one core per trace part), or the cluster at ``scheduler``; closed on exit."""
    if settings is None or not settings.wanted:
        yield Runner()
        return
    settings.check()
    distributed = _import_distributed()
    import logging

    quiet = logging.getLogger("distributed")  # a failed task is our one line on stderr, not Dask's log of it
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with _cluster(settings, distributed) as runner:
            yield runner
    finally:
        quiet.setLevel(level)


@contextmanager
def _cluster(settings: DaskSettings, distributed: Any) -> Iterator[Runner]:
    import logging

    if settings.workers is not None:
        try:
            cluster = distributed.LocalCluster(n_workers=settings.workers, threads_per_worker=1, processes=True,
                                               dashboard_address=":0", silence_logs=logging.CRITICAL)
        except (OSError, TimeoutError, RuntimeError) as e:
            raise DaskError(f"--workers {settings.workers}: the local Dask cluster did not start ({e}); try fewer "
                            "workers, or run without --workers") from None
        try:
            with distributed.Client(cluster) as client:
                yield DaskRunner(client, settings.part_bytes)
        finally:
            cluster.close()
        return
    try:
        client = distributed.Client(settings.scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as e:
        raise DaskError(f"--scheduler {settings.scheduler}: no Dask scheduler answered within {CONNECT_TIMEOUT_S} s "
                        f"({type(e).__name__}); start one (`dask scheduler` and `dask worker ADDRESS`) or check "
                        "the address") from None
    try:
        if not client.scheduler_info().get("workers"):
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        yield DaskRunner(client, settings.part_bytes)
    except TimeoutError:
        raise DaskError(f"--scheduler {settings.scheduler}: the scheduler has no workers; start some with "
                        f"`dask worker {settings.scheduler}`") from None
    finally:
        client.close()


# --- parts of trace.bin files: counts add ---------------------------------------------------------------------

def trace_parts(path: str, part_bytes: int) -> list[tuple[int, int]]:
    """(start, stop) byte ranges of a trace.bin, each about ``part_bytes`` long and cut at record boundaries."""
    from .trace.reader import read_trace_header, record_start

    size = os.path.getsize(path)
    head = read_trace_header(path).size
    cuts = [head]
    while cuts[-1] + part_bytes < size:
        cuts.append(record_start(path, cuts[-1] + part_bytes))
    if cuts[-1] < size:
        cuts.append(size)
    return list(zip(cuts[:-1], cuts[1:])) or [(head, size)]


@dataclass
class PartCount:
    """What a worker returns for one part: the counts, and the distinct sequence ids it saw."""

    counts: Counts
    seqs: np.ndarray  # int64, sorted distinct sequence ids


def count_part(path: str, start: int | None, stop: int | None, fp: ModelFingerprint, model: str | None
               ) -> PartCount:
    """Count one part of a trace.bin (start/stop), or a whole ordered input of any format (start None), as
    heat.count_chunks counts it inside the single process's chained fleet."""
    from .formats.load import open_input
    from .gguf.expert_ids import original_input, to_original
    from .heat import count_chunks
    from .trace.reader import iter_trace_chunks

    if start is None:
        inp = original_input(open_input(path, model))
        inp.require_order()
        chunks: Iterator[Any] = inp.chunks
    else:
        chunks = to_original(iter_trace_chunks(path, weights=False, start=start, stop=stop))
    seqs: list[np.ndarray] = []

    def noted(it: Iterator[Any]) -> Iterator[Any]:
        for c in it:
            if len(c):
                seqs.append(np.unique(c.seq.astype(np.int64)))
            yield c
    counts = count_chunks(noted(chunks), fp)
    return PartCount(counts, np.unique(np.concatenate(seqs)) if seqs else np.zeros(0, np.int64))


def add_part_counts(per_trace: Sequence[Sequence[PartCount]], n_layer: int, n_expert: int) -> Counts:
    """The counts of the chained fleet (fleet.chained): activations, rows and records add; the sequences are
    the distinct ids after each trace's are shifted past the previous traces' (as chained shifts them)."""
    from .heat import Counts

    out = Counts(np.zeros((n_layer, n_expert), np.int64), np.zeros((n_layer, 2), np.int64))
    offset = 0
    ids = []
    for parts in per_trace:
        top = -1
        for p in parts:
            out.activations += p.counts.activations
            out.phase_rows += p.counts.phase_rows
            out.records += p.counts.records
            out.recovered |= p.counts.recovered
            out.dropped_bytes += p.counts.dropped_bytes
            if len(p.seqs):
                top = max(top, int(p.seqs[-1]))
                ids.append(((p.seqs + offset).astype(np.int32)).astype(np.int64) if offset else p.seqs)
        offset += top + 1
    out.sequences = len(np.unique(np.concatenate(ids))) if ids else 0
    return out


def _whole(path: str, fp: ModelFingerprint, model: str | None) -> PartCount:
    return count_part(path, None, None, fp, model)


def count_fleet(runner: Runner, paths: Sequence[str], formats: Sequence[str], fp: ModelFingerprint,
                model: str | None) -> Counts:
    """Counts of ordered inputs (chained as fleet.chained chains them) by the runner's workers: each trace.bin
    in parts of runner.part_bytes, other formats whole. A part that warns (damage, empty records) is dropped
    with its trace's other parts and the trace counted again whole, so that the counts and the warnings are
    the single process's."""
    jobs: list[tuple[int, str, int | None, int | None]] = []
    for i, (p, fmt) in enumerate(zip(paths, formats)):
        if fmt == "trace" and runner.part_bytes:
            jobs += [(i, p, a, b) for a, b in trace_parts(p, runner.part_bytes)]
        else:
            jobs.append((i, p, None, None))
    results = runner.map(_job, jobs, fp, model)
    per: list[list[PartCount]] = [[] for _ in paths]
    redo: set[int] = set()
    for (i, *_), (value, caught) in zip(jobs, results):
        if caught and jobs_of(jobs, i) > 1:
            redo.add(i)
        else:
            _reraise(caught)
        per[i].append(value)
    if redo:
        order = sorted(redo)
        for i, value in zip(order, runner.map(_whole, [paths[i] for i in order], fp, model)):
            per[i] = [value]
    return add_part_counts(per, fp.n_layer, fp.n_expert)


def jobs_of(jobs: Sequence[tuple[int, str, int | None, int | None]], i: int) -> int:
    return sum(1 for j in jobs if j[0] == i)


def _job(job: tuple[int, str, int | None, int | None], fp: ModelFingerprint, model: str | None
         ) -> tuple[PartCount, list[warnings.WarningMessage]]:
    """One part, its warnings returned rather than raised (count_fleet decides whether to count it again)."""
    _, path, a, b = job
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = count_part(path, a, b, fp, model)
    return value, [w for w in caught if w.category.__module__.startswith("gguf_experts")]


def _to_counts(path: str, model: str | None) -> Any:
    from .fleet import open_all

    return open_all([path], model)[0].to_counts()


def join_fleet(runner: Runner, paths: Sequence[str], model: str) -> HeatResult:
    """heat.join of several inputs (counts add: fleet.join_source) with the counting done by the runner's
    workers; this process opens the inputs (their model is checked) and the model, and builds the frames.
    A pruned model's traces are counted here (their ids are translated by the model's own mapping)."""
    from .fleet import add_counts, join_source, open_all
    from .gguf.expert_ids import mapping_of
    from .gguf.fingerprint import fingerprint
    from .gguf.reader import open_model
    from .heat import join

    inputs = open_all(paths, model)
    m = open_model(model)
    if not runner.distributed or mapping_of(m.kv) is not None:
        return join(join_source(inputs), m)
    if not all(i.ordered for i in inputs):
        return join(add_counts(runner.map(_to_counts, list(paths), model)), m)
    first = next(inputs[0].chunks, None)  # type: ignore[arg-type]
    if first is None:
        return join(iter(()), m)
    fp = first.header.fingerprint if first.header.fingerprint.tensor_digest else fingerprint(m)
    counts = count_fleet(runner, paths, [i.format for i in inputs], fp, model)
    return join(iter([first]), m, counts=counts)


def compare_fleet(runner: Runner, a: Sequence[str], b: Sequence[str], model: str | None) -> ShareDiff:
    """fleet.compare_sides (diff of two sides; each side's counts add) with the counting done by the workers."""
    from .analysis.diff import diff_frames, share_diff
    from .fleet import add_counts, check_one_model, compare_sides, open_all

    if not runner.distributed:
        return compare_sides(a, b, model)
    if model:
        ha, hb = join_fleet(runner, a, model), join_fleet(runner, b, model)
        return diff_frames(ha.experts, hb.experts, ha.layers, hb.layers)
    check_one_model(open_all([*a, *b], None))
    counts = runner.map(_to_counts, [*a, *b], None)
    ca, cb = add_counts(counts[:len(a)]), add_counts(counts[len(a):])
    n = max(ca.n_layer, cb.n_layer)
    ca, cb = ca.resized(n), cb.resized(n)
    return share_diff(ca.activations, cb.activations, tokens_a=ca.tokens.sum(axis=0), tokens_b=cb.tokens.sum(axis=0))
