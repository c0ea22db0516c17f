"""Fleets on Dask (the ``[dask]`` extra): the work of many traces spread over a Dask cluster, with results equal
to the single-process ones.

What is spread, and why the results cannot differ:
- over trace files: each worker does, for one whole trace, exactly what the single process does for it (its
  counts and per-sequence rows, its own cache, its pins' training counts and scores); the driver combines the
  per-trace results by the rules of gguf_experts.fleet, in the same order;
- over parts of big trace.bin files (join-trace, diff, report's heat, stats): counts add, so each worker
  counts the records of a byte range cut at record boundaries (trace.reader.record_start) and the driver adds
  them; the sequence ids of every part are kept, so the number of sequences is that of the whole chained
  fleet; stats' per-sequence rows: a sequence cut by a boundary is joined from its pieces, then summarised.
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

    def _gather(self, futures: list[Any]) -> list[Any]:
        """client.gather; a worker that died (out of memory, killed) is one line, not Dask's traceback."""
        from distributed import KilledWorker

        try:
            return list(self.client.gather(futures))
        except KilledWorker as e:
            raise DaskError(f"a Dask worker died while running {e.args[0] if e.args else 'a task'} (out of memory, or "
                            "killed); give the workers more memory, or fewer threads each") from None

    def map(self, fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> list[Any]:
        out = []
        for value, caught in self._gather(self._submit(fn, items, args)):
            _reraise(caught)
            out.append(value)
        return out

    def keep(self, fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> list[Any]:
        futs = self._submit(fn, items, args)
        for caught in self._gather([self.client.submit(operator.itemgetter(1), f) for f in futs]):
            _reraise(caught)
        return [self.client.submit(operator.itemgetter(0), f) for f in futs]

    def gather(self, handles: Sequence[Any]) -> list[Any]:
        return self._gather(list(handles))


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
            try:
                client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
            except TimeoutError:
                raise DaskError(f"--scheduler {settings.scheduler}: the scheduler has no workers; start some with "
                                f"`dask worker {settings.scheduler}`") from None
        yield DaskRunner(client, settings.part_bytes)
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
            if len(c):  # the ids where the sequence changes, as count_chunks takes them (no sort of every row)
                change = np.flatnonzero(c.seq[1:] != c.seq[:-1]) + 1
                seqs.append(np.unique(c.seq[np.r_[0, change]].astype(np.int64)))
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
    from .trace.format import TraceData

    inputs = open_all(paths, model)
    m = open_model(model)
    if not runner.distributed or mapping_of(m.kv) is not None:
        return join(join_source(inputs), m)
    if not all(i.ordered for i in inputs):
        return join(add_counts(runner.map(_to_counts, list(paths), model)), m)
    one = len(paths) == 1 and inputs[0].format == "trace"  # join-trace of one trace.bin names it by its path
    if inputs[0].format == "trace":  # its header only: the workers read the records (and report any damage)
        assert inputs[0].header is not None
        first = TraceData.empty(inputs[0].header)
    else:
        got = next(inputs[0].chunks, None)  # type: ignore[arg-type]
        if got is None:
            return join(iter(()), m)
        first = got
    fp = first.header.fingerprint if first.header.fingerprint.tensor_digest else fingerprint(m)
    counts = count_fleet(runner, paths, [i.format for i in inputs], fp, model)
    return join(iter([first]), m, counts=counts, name=paths[0] if one else None)


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


# --- stats over parts: counts add, each sequence summarised once from its whole counts -----------------------

@dataclass
class StatsPart:
    """What a worker returns for one part of a trace.bin for ``stats``: ``head`` holds the rows of the part's
    first sequence up to the first other sequence (it may continue the previous part's last), ``main`` the
    rest as the single process's StatsAccumulator holds them (complete sequences summarised, the last open);
    ``ordered``: sequence ids never went down in the part (else the trace is counted whole, as one process)."""

    head: Any  # StatsAccumulator
    head_seq: int | None
    main: Any  # StatsAccumulator
    first_main: int | None
    last_seq: int | None
    ordered: bool


def stats_part(path: str, start: int, stop: int, n_layer: int, n_expert: int) -> StatsPart:
    from .analysis.stats import StatsAccumulator
    from .gguf.expert_ids import to_original
    from .trace.reader import iter_trace_chunks

    head, main = StatsAccumulator(n_layer, n_expert), StatsAccumulator(n_layer, n_expert)
    head_seq = first_main = last = None
    ordered = True
    for c in to_original(iter_trace_chunks(path, start=start, stop=stop)):
        if not len(c):
            continue
        seq = c.seq.astype(np.int64)
        ordered &= bool(np.all(np.diff(seq) >= 0)) and (last is None or int(seq[0]) >= last)
        last = int(seq[-1])
        n = 0
        if first_main is None:
            head_seq = int(seq[0]) if head_seq is None else head_seq
            n = int(np.argmax(seq != head_seq)) if bool(np.any(seq != head_seq)) else len(seq)
            head.update(c.layer[:n], c.experts[:n], c.phase[:n], c.seq[:n])
            if n == len(seq):
                continue
            first_main = int(seq[n])
        main.update(c.layer[n:], c.experts[n:], c.phase[n:], c.seq[n:])
    return StatsPart(head, head_seq, main, first_main, last, ordered)


def _summaries(open_counts: dict[int, np.ndarray], open_rows: dict[int, np.ndarray], n_layer: int,
               n_expert: int) -> Any:
    """The summary rows of sequences given by their whole counts (analysis.stats.sequence_frame of them)."""
    from .analysis.stats import StatsAccumulator, sequence_frame

    tmp = StatsAccumulator(n_layer, n_expert)
    tmp.seq_counts, tmp.seq_rows = open_counts, open_rows
    return sequence_frame(tmp)


def merge_stats_parts(parts: Sequence[StatsPart], n_layer: int, n_expert: int) -> Any:
    """One StatsAccumulator equal to the single process's over the whole trace, or None where the sequences are
    not in order (then the trace is counted whole): counts and rows add; a sequence cut by a part boundary is
    joined from its pieces and summarised once; complete sequences keep the rows their part made."""
    from .analysis.stats import StatsAccumulator

    out = StatsAccumulator(n_layer, n_expert)
    done: list[Any] = []
    open_c: dict[int, np.ndarray] = {}
    open_r: dict[int, np.ndarray] = {}
    last: int | None = None

    def close() -> None:
        if open_c:
            done.append(_summaries(dict(open_c), dict(open_r), n_layer, n_expert))
            open_c.clear()
            open_r.clear()
    for p in parts:
        if not p.ordered:
            return None
        for acc in (p.head, p.main):
            out.counts += acc.counts
            out.tokens += acc.tokens
        if p.head_seq is not None:
            if last is not None and p.head_seq < last:
                return None
            if p.head_seq not in open_c:
                close()
                open_c[p.head_seq] = np.zeros((n_layer, n_expert), np.int64)
                open_r[p.head_seq] = np.zeros((2, n_layer), np.int64)
            open_c[p.head_seq] += p.head.seq_counts[p.head_seq]
            open_r[p.head_seq] += p.head.seq_rows[p.head_seq]
        if p.first_main is not None:
            if p.head_seq is not None and p.first_main < p.head_seq:
                return None
            close()
            done += [f for f in p.main.seq_done if len(f)]
            open_c.update(p.main.seq_counts)
            open_r.update(p.main.seq_rows)
        if p.last_seq is not None:
            last = p.last_seq
    out.seq_done = done
    out.seq_counts, out.seq_rows = open_c, open_r
    return out


def stats_fleet(runner: Runner, paths: Sequence[str], headers: Sequence[Any], model: str | None,
                whole: Callable[[str, str | None], Any]) -> list[Any]:
    """Per trace what ``whole(path, model)`` returns, (StatsAccumulator, fingerprint, phase_known): trace.bin
    files (``headers[i]`` their TraceHeader, else None) counted in parts and merged (merge_stats_parts), the
    others, and traces whose parts warn or are out of order, by ``whole`` on a worker."""
    jobs: list[tuple[int, str, int, int]] = []
    for i, (p, h) in enumerate(zip(paths, headers)):
        if h is not None and runner.part_bytes:
            jobs += [(i, p, a, b) for a, b in trace_parts(p, runner.part_bytes)]
    results = runner.map(_stats_job, jobs, headers) if jobs else []
    per: dict[int, list[tuple[StatsPart, list[warnings.WarningMessage]]]] = {}
    for (i, *_), r in zip(jobs, results):
        per.setdefault(i, []).append(r)
    out: list[Any] = [None] * len(paths)
    for i, rs in per.items():
        h = headers[i]
        if any(w for _, w in rs):
            continue
        acc = merge_stats_parts([p for p, _ in rs], h.fingerprint.n_layer, h.fingerprint.n_expert)
        if acc is not None:
            out[i] = (acc, h.fingerprint, bool(h.meta.get("phase_known", True)))
    redo = [i for i, v in enumerate(out) if v is None]
    for i, v in zip(redo, runner.map(whole, [paths[i] for i in redo], model)):
        out[i] = v
    return out


def _stats_job(job: tuple[int, str, int, int], headers: Sequence[Any]
               ) -> tuple[StatsPart, list[warnings.WarningMessage]]:
    i, path, a, b = job
    fp = headers[i].fingerprint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = stats_part(path, a, b, fp.n_layer, fp.n_expert)
    return value, [w for w in caught if w.category.__module__.startswith("gguf_experts")]
