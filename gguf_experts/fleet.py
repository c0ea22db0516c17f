"""Many traces at once (a fleet: one trace per server), the rules by which their results combine:

- patterns are expanded (globs sorted by name; a glob that matches nothing is an error, a file named twice is
  read once);
- every input must come from one model (the first two that differ are named);
- counts add (stats, join-trace, diff: activations, tokens and bytes read are sums over the traces);
- a cache is simulated per trace (one server's cache never sees another's tokens), reported per trace and
  pooled (hits, accesses and bytes fetched summed, rates recomputed from the sums);
- sequences keep their origin: per-sequence rows carry the trace they came from and their own number.
"""
from __future__ import annotations

import glob
import os
from dataclasses import replace
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .analysis.diff import ShareDiff, diff_frames, share_diff
from .compare import compare
from .errors import InputError, ModelMismatchError
from .formats.counts import ExpertCounts
from .formats.load import Input, open_input
from .gguf.expert_ids import original_input
from .gguf.fingerprint import ModelFingerprint, check_fingerprint, check_same_model
from .heat import join
from .trace.format import TraceData

GLOB_CHARS = frozenset("*?[")
POOLED = "pooled"


def expand(patterns: Sequence[str]) -> list[str]:
    """Paths of the patterns: a glob gives its matches sorted by name (none: InputError), a plain path itself;
    a file matched twice (overlapping globs) is kept once, where it first appeared."""
    out: list[str] = []
    seen: set[str] = set()
    for p in patterns:
        if GLOB_CHARS & set(p):
            hits = sorted(h for h in glob.glob(p, recursive=True) if os.path.isfile(h))
            if not hits:
                raise InputError(f"{p}: the pattern matches no file; check the path (quote a glob so the shell "
                                 "passes it through)")
        else:
            hits = [p]
        for h in hits:
            key = os.path.realpath(h)
            if key not in seen:
                seen.add(key)
                out.append(h)
    return out


def labels(paths: Sequence[str]) -> list[str]:
    """Short names for the traces: file names, or the paths where two file names clash."""
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def open_all(paths: Sequence[str], model: str | None = None, max_rows: int = 1 << 16) -> list[Input]:
    """Every input opened (a pruned model's trace in the original ids), checked to be of one model."""
    inputs = [original_input(open_input(p, model, max_rows=max_rows)) for p in paths]
    check_one_model(inputs, model)
    return inputs


def shape_of(inp: Input) -> ModelFingerprint:
    return inp.counts.fingerprint() if inp.counts is not None else inp.header.fingerprint  # type: ignore[union-attr]


def check_one_model(inputs: Sequence[Input], model: str | None = None) -> None:
    """Refuse inputs of different models, naming the first two that differ (with --model: each is checked
    against it; quantisations of one model may be mixed)."""
    if model:
        from .gguf.fingerprint import fingerprint
        from .gguf.reader import open_model

        mfp = fingerprint(open_model(model))
        for inp in inputs:
            fp = shape_of(inp)
            if fp.tensor_digest:
                check_fingerprint(fp, mfp, trace_name=inp.path, model_name=str(model))
    fps = [shape_of(i) for i in inputs]
    for inp, fp in zip(inputs[1:], fps[1:]):
        a, fa = inputs[0], fps[0]
        if fa.tensor_digest and fp.tensor_digest:
            check_same_model(fa, fp, a.path, inp.path)
        elif fa.n_expert != fp.n_expert or (fa.n_expert_used and fp.n_expert_used
                                             and fa.n_expert_used != fp.n_expert_used):
            raise ModelMismatchError(f"{a.path} and {inp.path} were captured from different models (experts x "
                                     f"top-k: {fa.n_expert} x {fa.n_expert_used} vs {fp.n_expert} x "
                                     f"{fp.n_expert_used}); give traces of one model")


def add_counts(counts: Sequence[ExpertCounts]) -> ExpertCounts:
    """Counts add: the sum of several inputs' counts (sized to the largest layer count)."""
    n = max(c.n_layer for c in counts)
    sized = [c.resized(n) for c in counts]
    first = sized[0]
    return ExpertCounts(sum((c.counts for c in sized), np.zeros_like(first.counts)),
                        sum((c.tokens for c in sized), np.zeros_like(first.tokens)), k=first.k, source="several",
                        phase_known=all(c.phase_known for c in sized), meta={"traces": [c.source for c in sized]})


def chained(inputs: Sequence[Input]) -> Iterator[TraceData]:
    """The chunks of several ordered inputs one after another (for what only counts: join-trace); sequence
    numbers are shifted past the previous traces' so that sequences of different traces stay apart."""
    offset = 0
    for inp in inputs:
        inp.require_order()
        assert inp.chunks is not None
        top = -1
        for c in inp.chunks:
            if len(c):
                top = max(top, int(c.seq.max()))
            yield replace(c, seq=(c.seq.astype(np.int64) + offset).astype(np.int32)) if offset else c
        offset += top + 1


def join_source(inputs: Sequence[Input]) -> Any:
    """What heat.join takes for several inputs: their chunks one after another, or the sum of their counts
    when any of them holds counts only (counts add either way)."""
    if all(i.ordered for i in inputs):
        return chained(inputs)
    return add_counts([i.to_counts() for i in inputs])


def compare_sides(a: Sequence[str], b: Sequence[str], model: str | None = None) -> ShareDiff:
    """``diff`` of two sides of one or more inputs each (e.g. the servers of two pools): each side's counts
    add; every input of both sides must be of one model."""
    if len(a) == 1 and len(b) == 1:
        return compare(a[0], b[0], model)
    inputs = open_all([*a, *b], model)
    ia, ib = inputs[:len(a)], inputs[len(a):]
    if model:
        ha, hb = join(join_source(ia), model), join(join_source(ib), model)
        return diff_frames(ha.experts, hb.experts, ha.layers, hb.layers)
    ca, cb = add_counts([i.to_counts() for i in ia]), add_counts([i.to_counts() for i in ib])
    n = max(ca.n_layer, cb.n_layer)
    ca, cb = ca.resized(n), cb.resized(n)
    return share_diff(ca.activations, cb.activations, tokens_a=ca.tokens.sum(axis=0), tokens_b=cb.tokens.sum(axis=0))


def pool_rows(frames: Sequence[pd.DataFrame], names: Sequence[str], keys: Sequence[str],
              sums: Sequence[str], rates: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """Per-trace rows with a ``trace`` column, then the pooled rows (``trace`` = 'pooled'): ``sums`` summed
    over the traces per ``keys``, each rate recomputed as numerator / denominator of the sums."""
    per = pd.concat([f.assign(trace=n) for f, n in zip(frames, names)], ignore_index=True)
    per = per[["trace", *[c for c in per.columns if c != "trace"]]]
    if not len(per):
        return per
    present = [c for c in sums if c in per.columns]
    pooled = per.groupby(list(keys), sort=False, dropna=False)[present].sum(min_count=1).reset_index()
    for col, (num, den) in rates.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled[col] = pooled[num].to_numpy(np.float64) / pooled[den].to_numpy(np.float64)
    pooled = pooled.assign(trace=POOLED)
    cols = [c for c in per.columns if c in pooled.columns]
    return pd.concat([per, pooled[cols]], ignore_index=True)


def fleet_summary(inputs: Sequence[Input], names: Sequence[str]) -> list[dict[str, Any]]:
    """Which traces a result is made of (for JSON documents)."""
    return [{"trace": n, "path": i.path, "format": i.format} for i, n in zip(inputs, names)]


#: pins' rates and the accesses each is a share of (pooled: the traces' hits summed over their accesses)
PIN_RATES = {"pins_train_hit_rate": "train_accesses", "pins_hit_rate": "test_accesses",
             "hindsight_hit_rate": "test_accesses", "uniform_hit_rate": "test_accesses",
             "lru_hit_rate": "test_accesses", "opt_hit_rate": "test_accesses"}


def pool_pin_scores(scores: Sequence[pd.DataFrame], names: Sequence[str]) -> pd.DataFrame:
    """One pin list scored on each trace's held-out part: rows per trace, then pooled (hits and accesses
    summed over the traces; hindsight pooled = each trace's own best static list)."""
    hits = [s.assign(**{f"_h_{r}": s[r].to_numpy(np.float64) * s[d].to_numpy(np.float64)
                        for r, d in PIN_RATES.items() if r in s.columns}) for s in scores]
    present = [r for r in PIN_RATES if r in scores[0].columns]
    out = pool_rows(hits, names, ["layer", "pinned", "pinned_bytes"],
                    ["train_accesses", "test_accesses", *[f"_h_{r}" for r in present]],
                    {r: (f"_h_{r}", PIN_RATES[r]) for r in present})
    pooled = out["trace"] == POOLED
    if "beats_lru" in out.columns:
        out["beats_lru"] = out["beats_lru"].astype(object)
        out.loc[pooled, "beats_lru"] = (out.loc[pooled, "pins_hit_rate"] > out.loc[pooled, "lru_hit_rate"]).to_numpy()
    return out.drop(columns=[c for c in out.columns if c.startswith("_h_")])
