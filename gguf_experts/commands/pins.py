"""gguf-experts pins: a static hot-expert pin list learned on part of a trace, judged on the held-out part."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import numpy as np

from ..analysis.pins import Split, counts_of, pick_budget, pick_per_layer, score_pins, split_fraction
from ..atomic import atomic_write
from ..errors import InputError
from ..reporters.pins import fitz_pin_list, pins_frame
from ..reporters.tabular import Output, add_output_options, emit, frame_records, frame_to_csv, frame_to_table, say_wrote
from ..trace.format import TraceHeader
from ._dask_options import add_dask_options, dask_settings
from ._trace_input import expert_bytes, open_trace, parse_int_list

if TYPE_CHECKING:
    import pandas as pd

NAME = "pins"
HELP = "static pin list of the hottest experts, scored on held-out data against LRU, OPT and a uniform pick"
DESCRIPTION = (
    HELP + ". The pins are learned on the training part (the first --train-fraction of each layer's requests, "
    "or --train A.bin) and scored on the held-out part (the rest, or --test B.bin): rows "
    "layer," + "pinned,pinned_bytes,train_accesses,test_accesses,pins_train_hit_rate,pins_hit_rate,"
    "hindsight_hit_rate,uniform_hit_rate,lru_hit_rate,opt_hit_rate,beats_lru. LRU and OPT have the same "
    "capacity (per layer), or LRU one global cache of the same bytes (--budget), warmed on the training part; "
    "uniform: as many experts picked at random (expected value); hindsight: the best static list chosen on "
    "the held-out part itself. --list-csv and --pin-list write the pins.")
ORDER = 62


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", nargs="*", metavar="TRACE",
                   help="trace.bin to split into training and held-out parts; several traces or quoted globs (one "
                        "per server): one pin list from their training parts (counts add), scored on each trace's "
                        "held-out part with its own LRU/OPT cache, per trace and pooled")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--capacity", type=int, metavar="C", help="experts pinned per layer")
    size.add_argument("--budget", metavar="BYTES", help="one byte budget over all layers (e.g. 8G); needs --model")
    p.add_argument("--train-fraction", type=float, default=0.5, metavar="F",
                   help="the first F of each layer's requests train, the rest is held out (default 0.5)")
    p.add_argument("--train", metavar="A.bin", help="training trace (with --test, instead of TRACE)")
    p.add_argument("--test", metavar="B.bin", help="held-out trace of the same model")
    p.add_argument("--model", "-m", metavar="MODEL.gguf", help="the traces' model: expert bytes (--budget)")
    p.add_argument("--order", choices=["token", "access"], default="token",
                   help="request convention of the LRU/OPT comparison (see cache-sim); default token")
    p.add_argument("--list-csv", metavar="PINS.csv", help="write the pins as layer,expert,count (training count)")
    p.add_argument("--pin-list", metavar="FILE", help="write the pins as fitz-tec's EXPERT_CACHE_PIN_LIST v1")
    add_output_options(p)
    add_dask_options(p)


def _load(path: str) -> tuple[TraceHeader, np.ndarray, np.ndarray]:
    header, chunks = open_trace(path)
    parts = [(c.layer, c.experts) for c in chunks]
    k = header.fingerprint.n_expert_used
    if not parts:
        return header, np.zeros(0, np.int32), np.zeros((0, k), np.int32)
    return header, np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])


def _split(args: argparse.Namespace) -> tuple[TraceHeader, Split, str]:
    if (args.train is None) != (args.test is None):
        raise InputError("--train and --test go together: give both traces, or one TRACE to split")
    if args.train is not None:
        if args.trace is not None:
            raise InputError("give either TRACE (split by --train-fraction) or --train A.bin --test B.bin, not both")
        ha, la, ea = _load(args.train)
        hb, lb, eb = _load(args.test)
        if ha.fingerprint != hb.fingerprint:
            raise InputError(f"{args.test} was captured from another model than {args.train}; "
                             "pins need two traces of one model")
        return ha, Split(la, ea, lb, eb), args.train
    if args.trace is None:
        raise InputError("give a TRACE to split (--train-fraction) or --train A.bin --test B.bin")
    h, lay, ex = _load(args.trace)
    return h, split_fraction(lay, ex, h.fingerprint.n_layer, args.train_fraction), args.trace


def _many(args: argparse.Namespace, paths: list[str]) -> int:
    """Several traces: pins from the summed training counts, scored per trace and pooled."""
    from ..fleet import labels, open_all

    if args.train is not None or args.test is not None:
        raise InputError("give either TRACEs (each split by --train-fraction) or --train A.bin --test B.bin, not both")
    open_all(paths, args.model)  # one model, checked before the work
    names = labels(paths)
    settings = dask_settings(args)
    if settings.wanted:  # Dask: each trace loaded and split on a worker, where it stays for the scoring
        from ..fleet_dask import runner_for

        with runner_for(settings) as runner:
            header = open_trace(paths[0])[0]
            fp = header.fingerprint
            L, M, k = fp.n_layer, fp.n_expert, fp.n_expert_used
            eb = expert_bytes(args.model, header, paths[0])
            budget = _budget(args, eb)
            kept = runner.keep(split_path, paths, L, args.train_fraction)
            train = sum(runner.map(train_counts, kept, L, M), np.zeros((L, M), np.int64))
            pins = pick_per_layer(train, args.capacity) if budget is None or eb is None else pick_budget(train, eb,
                                                                                                          budget)
            scores = runner.map(score_pins, kept, L, M, k, pins, args.capacity, budget, eb, args.order)
        return _many_out(args, paths, names, pins, train, scores, k)
    loaded = [_load(p) for p in paths]
    header = loaded[0][0]
    fp = header.fingerprint
    L, M, k = fp.n_layer, fp.n_expert, fp.n_expert_used
    eb = expert_bytes(args.model, header, paths[0])
    budget = _budget(args, eb)
    splits = [split_fraction(lay, ex, L, args.train_fraction) for _, lay, ex in loaded]
    train = sum((counts_of(s.train_layer, s.train_experts, L, M) for s in splits), np.zeros((L, M), np.int64))
    pins = pick_per_layer(train, args.capacity) if budget is None or eb is None else pick_budget(train, eb, budget)
    scores = [score_pins(s, L, M, k, pins, args.capacity, budget, eb, args.order) for s in splits]
    return _many_out(args, paths, names, pins, train, scores, k)


def split_path(path: str, n_layer: int, fraction: float) -> Split:
    """A trace loaded and split by --train-fraction (a Dask task, whose result stays on its worker)."""
    _, lay, ex = _load(path)
    return split_fraction(lay, ex, n_layer, fraction)


def train_counts(split: Split, n_layer: int, n_expert: int) -> np.ndarray:
    return counts_of(split.train_layer, split.train_experts, n_layer, n_expert)


def _many_out(args: argparse.Namespace, paths: list[str], names: list[str], pins: Any, train: np.ndarray,
              scores: list[pd.DataFrame], k: int) -> int:
    from ..fleet import pool_pin_scores

    score = pool_pin_scores(scores, names)
    source = f"{len(paths)} traces"
    _write_lists(args, pins, train, source, k)
    pooled = score[score.trace == "pooled"].drop(columns="trace")
    emit(Output(score, document=lambda: {"source": source, "traces": paths, "order": args.order,
                                         "verdict": verdict(pooled), "rows": frame_records(score)},
                text=lambda: "pooled over the traces: " + verdict(pooled) + "\n\n" + frame_to_table(
                    (score[score.layer == "all"] if len(score) > 17 else score).round(4))),
         args.format, args.output)
    return 0


def _budget(args: argparse.Namespace, eb: np.ndarray | None) -> int | None:
    budgets = parse_int_list(args.budget, "--budget")
    if budgets and len(budgets) > 1:
        raise InputError(f"--budget {args.budget}: give one byte budget (run pins once per budget)")
    budget = budgets[0] if budgets else None
    if budget is not None and eb is None:
        raise InputError("--budget needs --model (experts are weighed by their bytes in the model)")
    return budget


def _write_lists(args: argparse.Namespace, pins: Any, train: np.ndarray, source: str, k: int) -> None:
    if args.list_csv:
        with atomic_write(args.list_csv) as fh:
            fh.write(frame_to_csv(pins_frame(pins, train)))
        say_wrote(args.list_csv, "csv, the pinned experts")
    if args.pin_list:
        with atomic_write(args.pin_list) as fh:
            fh.write(fitz_pin_list(pins, train, source, k))
        say_wrote(args.pin_list, "EXPERT_CACHE_PIN_LIST v1")


def run(args: argparse.Namespace) -> int:
    from ..fleet import expand

    paths = expand(args.trace) if args.trace else []
    if len(paths) > 1:
        return _many(args, paths)
    dask_settings(args)  # bad --scheduler/--workers refused alike; one trace's split is scored here
    args.trace = paths[0] if paths else None
    header, split, source = _split(args)
    fp = header.fingerprint
    L, M, k = fp.n_layer, fp.n_expert, fp.n_expert_used
    eb = expert_bytes(args.model, header, source)
    budget = _budget(args, eb)
    train = counts_of(split.train_layer, split.train_experts, L, M)
    pins = pick_per_layer(train, args.capacity) if budget is None or eb is None else pick_budget(train, eb, budget)
    score = score_pins(split, L, M, k, pins, args.capacity, budget, eb, args.order)
    _write_lists(args, pins, train, source, k)
    emit(Output(score, document=lambda: {"source": source, "order": args.order, "verdict": verdict(score),
                                         "rows": frame_records(score)},
                text=lambda: _text(score, args)), args.format, args.output)
    return 0


def verdict(score: pd.DataFrame) -> str:
    """One plain sentence: does the static list beat LRU on the held-out part?"""
    a = score[score.layer == "all"].iloc[0]
    if not a.test_accesses:
        return "no held-out requests: nothing to judge"
    per = score[score.layer != "all"].beats_lru.dropna()
    where = f" (in {int(per.sum())} of {len(per)} layers)" if len(per) else ""
    yes = bool(a.beats_lru)
    return (f"pinning {'beats' if yes else 'does not beat'} LRU here: static pins hit {a.pins_hit_rate:.1%} of "
            f"held-out requests, LRU of the same size {a.lru_hit_rate:.1%}{where}; OPT "
            f"{'n/a' if a.opt_hit_rate != a.opt_hit_rate else f'{a.opt_hit_rate:.1%}'}, uniform pick "
            f"{a.uniform_hit_rate:.1%}, best static list in hindsight {a.hindsight_hit_rate:.1%}, the pins on "
            f"their own training part {a.pins_train_hit_rate:.1%}")


def _text(score: pd.DataFrame, args: argparse.Namespace) -> str:
    shown = score[score.layer == "all"] if len(score) > 17 else score
    return verdict(score) + "\n\n" + frame_to_table(shown.round(4))
