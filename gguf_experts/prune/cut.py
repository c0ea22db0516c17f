"""Cut experts out of a GGUF: plan reading and checks, routing semantics per architecture, the streamed cut.

Why here: pruning the least useful experts is what people measure experts for. llama.cpp has one expert
count for all layers, so every MoE layer keeps the same number; the kept experts keep their order, every
per-expert tensor (``*_exps`` weights and biases, NVFP4 scales, router rows, ``exp_probs_b``) loses the
dropped slices, and everything else is copied byte for byte. The original expert ids of each layer are
stored in the output (``gguf_experts.prune.original_ids.<layer>``) so traces of the pruned model can be
read in the original model's ids (see ``prune_map``). Data is copied file to file in large runs.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import GGUFFormatError, InputError, ModelMismatchError
from ..gguf.reader import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS, Model, TensorInfo, ValueType
from ..gguf.encode import TensorEntry, encode_header, encode_kv
from ..gguf.stream import RangeCopier, source_kv_entries
from ..gguf.layout import kind_of
from ..gguf.names import legacy_expert, split_name
from ..gguf.expert_ids import PREFIX, mapping_of

BY = ("reap", "frequency", "never-used")


# -- routing semantics, read from llama.cpp's build_moe_ffn calls (src/models/*.cpp) -------------------
@dataclass(frozen=True)
class Routing:
    """What dropping experts does to routing in this architecture; ``changes`` means even tokens whose
    selected experts are all kept may get other weights or other experts."""

    changes: bool
    text: str


def routing_semantics(model: Model) -> Routing:
    """From llama.cpp 0.3.36: qwen3moe/llama (Mixtral) softmax + norm_w=true; qwen2moe softmax, norm_w=false;
    gpt-oss softmax over the selected logits (SOFTMAX_WEIGHT); deepseek2 expert_gating_func (softmax when
    unset) + expert_weights_norm (false when unset) + optional group-limited routing."""
    arch, kv = model.architecture, model.kv
    groups = int(kv.get(f"{arch}.expert_group_count", 0) or 0)
    same = ("a token whose selected experts are all kept selects the same experts with the same gate weights "
            "(top-k of a per-expert score")
    if arch in ("qwen3moe", "llama"):
        return Routing(False, f"{arch}: softmax over all experts, top-k, gate weights renormalised over the "
                              f"selected experts (norm_w = true): {same}, renormalised)")
    if arch == "gpt-oss":
        return Routing(False, f"{arch}: top-k of the router logits, softmax over the selected logits: {same}, "
                              "softmax over the selected)")
    if arch == "qwen2moe":
        return Routing(True, f"{arch}: softmax over all experts without renormalisation (norm_w = false): "
                             "dropping any expert shrinks the softmax denominator, so every token's gate weights "
                             "change (grow) even where its selected experts are kept")
    if arch == "deepseek2":
        gating = int(kv.get(f"{arch}.expert_gating_func", 0) or 1)  # NONE -> softmax (llama.cpp's default)
        norm = bool(kv.get(f"{arch}.expert_weights_norm", False))
        gname = {1: "softmax", 2: "sigmoid", 3: "softmax over the selected", 4: "sqrt(softplus)"}.get(gating, "?")
        weights_same = norm or gating in (2, 4)  # per-expert scores, or renormalised over the selected
        parts = [f"{arch}: {gname} gating, expert_weights_norm = {str(norm).lower()}"]
        parts.append("gate weights of kept selections are unchanged" if weights_same else
                     "softmax over all experts without renormalisation: every token's gate weights change")
        if groups > 1:
            parts.append(f"group-limited routing ({groups} groups, the best "
                         f"{kv.get(f'{arch}.expert_group_used_count')} by the sum of each group's top-2 biased "
                         "scores): the same number of experts is dropped in every group and group membership "
                         "is kept, but a dropped expert that was among its group's top 2 lowers that group's "
                         "score, so group selection, and with it expert selection, can change")
        return Routing(not weights_same or groups > 1, "; ".join(parts))
    return Routing(True, f"{arch}: routing semantics not read from llama.cpp for this architecture; selections "
                         "and gate weights may change: capture the pruned model and compare (gguf-experts diff)")


# -- plans -------------------------------------------------------------------------------------------
@dataclass
class Scores:
    """Per-expert numbers to choose by, [n_layer, n_expert]; rows of layers without data are absent."""

    source: str
    counts: dict[int, np.ndarray]
    reap: dict[int, np.ndarray] | None = None
    fingerprint: dict[str, Any] | None = None


@dataclass
class DropList:
    """Explicit experts to drop, per layer (a layer,expert CSV)."""

    source: str
    drop: dict[int, list[int]]


@dataclass
class PrunePlan:
    """The kept source expert ids (ascending) of every MoE layer."""

    n_expert: int
    keep: dict[int, np.ndarray]
    method: str
    source: str

    @property
    def n_keep(self) -> int:
        return len(next(iter(self.keep.values())))

    def dropped(self, layer: int) -> np.ndarray:
        return np.setdiff1d(np.arange(self.n_expert), self.keep[layer])


def moe_layers(model: Model) -> list[int]:
    """Layers with a router: the ones build_moe_ffn runs in."""
    out = set()
    for t in model.tensors:
        layer, comp = split_name(t.name)
        if layer is not None and comp == "ffn_gate_inp":
            out.add(layer)
    return sorted(out)


def read_plan_file(path: str | os.PathLike[str], model: Model) -> Scores | DropList:
    """Our `profile` JSON, llama-expert-profile's REAP JSON (keyed by layer), or a layer,expert CSV of drops."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--plan {p}: cannot read it ({e}); pass a profile JSON or a layer,expert CSV") from None
    if text.lstrip()[:1] == "{":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"--plan {p}: not valid JSON ({e}); pass `gguf-experts profile` output, "
                             "llama-expert-profile output or a layer,expert CSV") from None
        return _scores_from_json(doc, p, model.expert_count)
    return _drops_from_csv(text, p)


def _floats(v: Any, n: int, where: str) -> np.ndarray:
    try:
        a = np.asarray(v, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{where}: not a list of numbers") from None
    if a.size != n:
        raise InputError(f"{where}: {a.size} values, the model has {n} experts per layer; "
                         "this plan was made for another model")
    return a


def _scores_from_json(doc: Any, p: Path, n_expert: int) -> Scores:
    from ..analysis.reap import FORMAT

    if not isinstance(doc, dict):
        raise InputError(f"--plan {p}: expected a JSON object")
    if doc.get("format") == FORMAT:  # gguf-experts profile
        s = Scores(str(p), {}, {}, (doc.get("meta") or {}).get("fingerprint"))
        if int(doc.get("n_expert", n_expert)) != n_expert:
            raise ModelMismatchError(f"--plan {p}: profiled on a model with {doc.get('n_expert')} experts per "
                                     f"layer, this one has {n_expert}; profile this model")
        for e in doc.get("layers") or []:
            where = f"--plan {p}: layer {e.get('layer')}"
            s.counts[int(e["layer"])] = _floats(e.get("activation_counts"), n_expert, where)
            s.reap[int(e["layer"])] = _floats(e.get("reap"), n_expert, where)  # type: ignore[index]
        return s
    if doc and all(str(k).isdigit() for k in doc):  # llama-expert-profile (llama.cpp PR #20454)
        s = Scores(str(p), {}, {})
        for k, e in doc.items():
            where = f"--plan {p}: layer {k}"
            if not isinstance(e, dict) or "activation_counts" not in e:
                raise InputError(f"{where}: no activation_counts; expected llama-expert-profile's per-layer "
                                 "{total_tokens, activation_counts, reap, ...}")
            s.counts[int(k)] = _floats(e["activation_counts"], n_expert, where)
            if "reap" in e:
                s.reap[int(k)] = _floats(e["reap"], n_expert, where)  # type: ignore[index]
        if s.reap is not None and len(s.reap) != len(s.counts):
            s.reap = None
        return s
    raise InputError(f"--plan {p}: neither `gguf-experts profile` output (format {FORMAT!r}) nor "
                     "llama-expert-profile output (an object keyed by layer number)")


def _drops_from_csv(text: str, p: Path) -> DropList:
    rows = [r for r in csv.reader(text.splitlines()) if r and not r[0].lstrip().startswith("#")]
    if rows and not rows[0][0].strip().lstrip("-").isdigit():
        head = [c.strip().lower() for c in rows[0]]
        if "layer" not in head or not ({"expert", "expert_id"} & set(head)):
            raise InputError(f"--plan {p}: the CSV header {rows[0]} has no layer and expert columns; "
                             "write one `layer,expert` row per expert to drop")
        li, ei = head.index("layer"), head.index("expert" if "expert" in head else "expert_id")
        rows = rows[1:]
    else:
        li, ei = 0, 1
    drop: dict[int, list[int]] = {}
    for n, r in enumerate(rows, 2):
        try:
            layer, expert = int(r[li]), int(r[ei])
        except (ValueError, IndexError):
            raise InputError(f"--plan {p}: row {n} {r!r} is not `layer,expert` (two whole numbers)") from None
        drop.setdefault(layer, []).append(expert)
    if not drop:
        raise InputError(f"--plan {p}: no experts to drop; write one `layer,expert` row per expert to drop")
    return DropList(str(p), drop)


def trace_scores(trace: str | os.PathLike[str], model: Model) -> Scores:
    """Selections per (layer, expert) of a trace captured from this model (checked by fingerprint)."""
    from ..gguf.fingerprint import check_model
    from ..heat import count_chunks
    from ..trace.reader import iter_trace_chunks, read_trace_header

    header = read_trace_header(trace)
    check_model(header.fingerprint, model, str(trace))
    c = count_chunks(iter_trace_chunks(trace, weights=False), header.fingerprint)
    rows = c.phase_rows.sum(axis=1)
    counts = {layer: c.activations[layer].astype(np.float64) for layer in np.flatnonzero(rows > 0).tolist()}
    return Scores(str(trace), counts, None, header.fingerprint.to_dict())


def _order(counts: np.ndarray, reap: np.ndarray | None) -> np.ndarray:
    """Experts best first: by REAP (when given), then selections, then lower id."""
    ids = np.arange(len(counts))
    keys = (ids, -counts) if reap is None else (ids, -counts, -reap)
    return np.lexsort(keys)


def build_plan(model: Model, source: Scores | DropList, by: str | None = None, keep: int | None = None,
               keep_fraction: float | None = None) -> PrunePlan:
    """Validate a plan against the model and turn it into kept ids per MoE layer (equal counts)."""
    from ..gguf.fingerprint import fingerprint

    n, k = model.expert_count, model.expert_used_count
    layers = moe_layers(model)
    if not n or not layers:
        raise InputError(f"{model.path}: not a Mixture-of-Experts model (no expert_count or no ffn_gate_inp "
                         "tensors); nothing to prune")
    if isinstance(source, DropList):
        if keep is not None or keep_fraction is not None or by is not None:
            raise InputError("--by/--keep/--keep-fraction do not apply to a CSV of experts to drop (it says "
                             "exactly which go); drop them, or pass a profile JSON or a trace instead")
        plan = _plan_from_drops(source, layers, n)
        method = "drop list"
    else:
        if source.fingerprint and source.fingerprint.get("tensor_digest") not in (None,
                                                                                   fingerprint(model).tensor_digest):
            raise ModelMismatchError(f"{source.source} was made from another model (fingerprint "
                                     f"{source.fingerprint.get('tensor_digest')}, {model.path.name} has "
                                     f"{fingerprint(model).tensor_digest}); profile or capture this model")
        plan, method = _plan_from_scores(source, layers, n, k, by, keep, keep_fraction, model)
    kept = {len(v) for v in plan.values()}
    if len(kept) > 1:
        counts = {layer: n - len(v) for layer, v in plan.items()}
        raise InputError(f"{source.source}: the plan drops different numbers of experts per layer "
                         f"({_describe_counts(counts)}); llama.cpp has one expert count for all layers: drop the "
                         "same number in every MoE layer, e.g. `--by frequency --keep N` or `--plan stats.json "
                         "--keep N`")
    n_keep = kept.pop()
    if n_keep < k:
        raise InputError(f"{source.source}: keeps {n_keep} experts per layer, fewer than expert_used_count {k} "
                         f"(llama.cpp selects {k} per token); keep at least {k}")
    if n_keep == n:
        raise InputError(f"{source.source}: the plan drops no experts (every expert is selected in some layer, "
                         "or the drop list is empty); nothing to prune: use --by frequency --keep N to drop the "
                         "least selected ones")
    _check_groups(model, plan, n)
    return PrunePlan(n, {layer: np.asarray(sorted(v), np.int64) for layer, v in plan.items()}, method, source.source)


def _describe_counts(counts: dict[int, int]) -> str:
    items = sorted(counts.items())
    shown = ", ".join(f"layer {layer}: {c}" for layer, c in items[:6])
    return shown + (f", ... ({len(items)} layers)" if len(items) > 6 else "")


def _plan_from_drops(source: DropList, layers: list[int], n: int) -> dict[int, list[int]]:
    for layer, ids in source.drop.items():
        if layer not in layers:
            raise InputError(f"{source.source}: layer {layer} is not a MoE layer of this model (MoE layers: "
                             f"{layers[0]}..{layers[-1]}); fix the plan")
        bad = [e for e in ids if not 0 <= e < n]
        if bad:
            raise InputError(f"{source.source}: layer {layer}: expert {bad[0]} does not exist (experts 0..{n - 1}); "
                             "fix the plan")
    return {layer: sorted(set(range(n)) - set(source.drop.get(layer, []))) for layer in layers}


def _resolve_keep(source: Scores, layers: list[int], n: int, k: int, by: str, keep: int | None,
                  keep_fraction: float | None) -> int:
    """Experts to keep per layer from --keep / --keep-fraction (never-used: the fewest that keeps all used)."""
    if keep is not None and keep_fraction is not None:
        raise InputError("give --keep or --keep-fraction, not both")
    if keep_fraction is not None:
        if not 0 < keep_fraction <= 1:
            raise InputError(f"--keep-fraction {keep_fraction}: must be in (0, 1]")
        keep = max(1, round(keep_fraction * n))
    used = max(int((source.counts[layer] > 0).sum()) for layer in layers)
    if by == "never-used":
        if keep is None:
            keep = max(used, k)
        elif keep < used:
            raise InputError(f"--by never-used --keep {keep}: some layer uses {used} experts in {source.source}; "
                             f"keeping {keep} would drop used ones: keep at least {used}, or use --by frequency")
    if keep is None:
        raise InputError(f"--by {by}: say how many experts to keep per layer with --keep N or --keep-fraction F")
    if not 0 < keep <= n:
        raise InputError(f"--keep {keep}: must be in 1..{n}")
    return keep


def _plan_from_scores(source: Scores, layers: list[int], n: int, k: int, by: str | None, keep: int | None,
                      keep_fraction: float | None, model: Model) -> tuple[dict[int, list[int]], str]:
    by = by or ("reap" if source.reap else "frequency")
    if by not in BY:
        raise InputError(f"--by {by}: choose one of {', '.join(BY)}")
    if by == "reap" and not source.reap:
        raise InputError(f"--by reap: {source.source} has no REAP scores (a trace has no expert output norms); "
                         "run `gguf-experts profile` and pass its output with --plan, or use --by frequency")
    extra = sorted(set(source.counts) - set(layers))
    if extra:
        raise InputError(f"{source.source}: has layer {extra[0]}, which is not a MoE layer of {model.path.name}; "
                         "this plan was made for another model")
    missing = [layer for layer in layers if layer not in source.counts]
    if missing:
        raise InputError(f"{source.source}: no data for MoE layer {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + "; profile or capture with every layer's outputs (e.g. longer prompts)")
    keep = _resolve_keep(source, layers, n, k, by, keep, keep_fraction)
    groups = int(model.kv.get(f"{model.architecture}.expert_group_count", 0) or 0)
    plan: dict[int, list[int]] = {}
    for layer in layers:
        reap = source.reap[layer] if by == "reap" and source.reap else None
        order = _order(source.counts[layer], reap)
        if groups > 1 and keep % groups == 0 and n % groups == 0:  # the best keep/groups of every group
            per = n // groups
            plan[layer] = sorted(int(e) for g in range(groups)
                                 for e in [x for x in order if x // per == g][:keep // groups])
        else:
            plan[layer] = sorted(int(e) for e in order[:keep])
    return plan, by


def _check_groups(model: Model, plan: dict[int, list[int]], n: int) -> None:
    arch = model.architecture
    groups = int(model.kv.get(f"{arch}.expert_group_count", 0) or 0)
    if groups <= 1:
        return
    per = n // groups
    for layer, kept in plan.items():
        c = np.bincount(np.asarray(kept) // per, minlength=groups)
        if (c != c[0]).any() or c[0] < 2:
            raise InputError(f"layer {layer}: group-limited routing ({groups} groups of {per}) needs the same "
                             f"number of experts kept in every group, at least 2 (kept per group: "
                             f"{' '.join(map(str, c.tolist()))}); keep a multiple of {groups} (e.g. --keep "
                             f"{groups * max(2, len(kept) // groups)}) so each group keeps its best")


# -- the cut -----------------------------------------------------------------------------------------
def is_per_expert(t: TensorInfo, plan: PrunePlan) -> bool:
    """A tensor whose last axis is the expert: routed experts (weights, biases, scales), router, exp_probs_b."""
    layer, comp = split_name(t.name)
    if layer is None or layer not in plan.keep:
        return False
    if not (kind_of(comp) == "routed_expert" or comp.startswith(("ffn_gate_inp", "exp_probs_b"))) \
            or kind_of(comp) == "shared_expert":
        return False
    if t.ne[-1] != plan.n_expert or t.nbytes % plan.n_expert:
        raise GGUFFormatError(f"{t.file}: tensor {t.name!r} shape {list(t.ne)}: its last dimension is not the "
                              f"expert count {plan.n_expert}; this layout is not understood: please report it")
    return True




@dataclass
class OutTensor:
    entry: TensorEntry
    source: TensorInfo
    runs: list[tuple[int, int, int]]  # (offset in the source file, offset in this tensor's data, length)


def out_tensors(model: Model, plan: PrunePlan) -> list[OutTensor]:
    """Every tensor of the output, in source order, with the source byte runs its data is made of."""
    out = []
    for t in model.tensors:
        legacy = legacy_expert(t.name)  # old Mixtral files: one 2-D tensor per expert
        if legacy and legacy[0] in plan.keep:
            layer, ffn, e = legacy
            kept_ids = plan.keep[layer]
            if e >= plan.n_expert:
                raise GGUFFormatError(f"{t.file}: tensor {t.name!r} names expert {e} of {plan.n_expert}; the file "
                                      "is inconsistent")
            pos = int(np.searchsorted(kept_ids, e))
            if pos < len(kept_ids) and kept_ids[pos] == e:  # kept: renumbered to its place among the kept
                name = f"blk.{layer}.{ffn}.{pos}.weight"
                out.append(OutTensor(TensorEntry(name, tuple(t.ne), t.type.id, t.nbytes), t,
                                     [(t.offset, 0, t.nbytes)]))
            continue
        if not is_per_expert(t, plan):
            entry = TensorEntry(t.name, tuple(t.ne), t.type.id, t.nbytes)
            out.append(OutTensor(entry, t, [(t.offset, 0, t.nbytes)]))
            continue
        slab = t.nbytes // plan.n_expert
        kept = plan.keep[split_name(t.name)[0]]  # type: ignore[index]
        runs, dst = [], 0
        for group in np.split(kept, np.flatnonzero(np.diff(kept) != 1) + 1):  # consecutive ids: one run
            length = len(group) * slab
            runs.append((t.offset + int(group[0]) * slab, dst, length))
            dst += length
        entry = TensorEntry(t.name, (*t.ne[:-1], len(kept)), t.type.id, len(kept) * slab)
        out.append(OutTensor(entry, t, runs))
    return out


def output_kv(model: Model, plan: PrunePlan, routing: Routing) -> list[bytes]:
    """The source's metadata (raw) with expert_count changed, split keys removed and the mapping added."""
    from ..gguf.fingerprint import fingerprint

    first = model.shards[0]
    bo = first.byteorder
    arch = model.architecture
    count_key = f"{arch}.expert_count"
    prev = mapping_of(model.kv)
    entries = []
    for key, raw in source_kv_entries(first).items():
        if key in (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS) or key.startswith(PREFIX):
            continue
        if key == count_key:
            raw = encode_kv(key, ValueType(first.kv_types[key]), plan.n_keep, bo)
        entries.append(raw)
    if prev is not None:  # pruning a pruned model: ids stay those of the first source
        original = {layer: prev.original_ids[layer][ids] for layer, ids in plan.keep.items()}
        src_name, src_fp, src_n = prev.source, prev.source_fingerprint, prev.source_n_expert
    else:
        original = plan.keep
        src_name, src_fp, src_n = model.path.name, fingerprint(model).to_dict(), plan.n_expert
    entries.append(encode_kv(PREFIX + "source", ValueType.STRING, src_name, bo))
    entries.append(encode_kv(PREFIX + "source_fingerprint", ValueType.STRING, json.dumps(src_fp, sort_keys=True), bo))
    entries.append(encode_kv(PREFIX + "source_expert_count", ValueType.UINT32, src_n, bo))
    entries.append(encode_kv(PREFIX + "method", ValueType.STRING, f"{plan.method} from {Path(plan.source).name}", bo))
    entries.append(encode_kv(PREFIX + "routing", ValueType.STRING, routing.text, bo))
    for layer, ids in sorted(original.items()):
        entries.append(encode_kv(f"{PREFIX}original_ids.{layer}", ValueType.ARRAY, ids.tolist(), bo,
                                 element_type=ValueType.INT32))
    return entries


def shard_names(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    stem = out.name.removesuffix(".gguf")
    return [out.with_name(f"{stem}-{i + 1:05d}-of-{n:05d}.gguf") for i in range(n)]


def _split(tensors: list[OutTensor], max_size: int | None) -> list[list[OutTensor]]:
    """Consecutive tensors per shard, each shard's data at most max_size (a bigger tensor gets its own)."""
    if not max_size:
        return [tensors]
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.entry.nbytes > max_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.entry.nbytes
    return shards


def check_output(model: Model, plan: PrunePlan, out: str | os.PathLike[str], split_max_size: int | None = None
                 ) -> list[Path]:
    """The output path(s), refused where one is a file of the source model (never written)."""
    out = Path(out)
    paths = shard_names(out, len(_split(out_tensors(model, plan), split_max_size)))
    sources = {s.path.resolve() for s in model.shards}
    for p in paths:
        if p.resolve() in sources:
            raise InputError(f"-o {p}: that is the source model; the model file is never written: pick another -o")
        if p.is_dir():
            raise InputError(f"-o {p}: is a directory; give a file name such as {p / 'pruned.gguf'}")
        if not p.parent.is_dir():
            raise InputError(f"-o {p}: the folder {p.parent} does not exist; create it or pick another -o")
    return paths


@dataclass
class PruneResult:
    paths: list[Path]
    bytes_written: int
    bytes_copied: int
    routing: Routing
    method: str = field(default="")


def write_pruned(model: Model, plan: PrunePlan, out: str | os.PathLike[str], split_max_size: int | None = None,
                 progress: Callable[[int], None] | None = None) -> PruneResult:
    """Write the pruned model (temp files renamed into place when all are complete); the source is only read."""
    routing = routing_semantics(model)
    tensors = out_tensors(model, plan)
    shards = _split(tensors, split_max_size)
    paths = check_output(model, plan, out, split_max_size)
    for t in tensors:
        sh = model.shards[t.source.shard]
        if t.source.offset + t.source.nbytes > sh.file_size:
            raise GGUFFormatError(f"{sh.path}: tensor {t.source.name!r} runs past the end of the file "
                                  f"({sh.file_size} bytes); the file is truncated: download it again")
    kv = output_kv(model, plan, routing)
    first = model.shards[0]
    bo, version, alignment = first.byteorder, first.version, model.alignment
    copier = RangeCopier(progress)
    written = copied = 0
    try:
        with contextlib.ExitStack() as stack:
            src_fds = [_open_ro(stack, s.path) for s in model.shards]
            for i, (chunk, path) in enumerate(zip(shards, paths)):
                entries = list(kv) if i == 0 else []
                if i > 0 and alignment != 32:
                    entries.append(encode_kv("general.alignment", ValueType.UINT32, alignment, bo))
                if len(shards) > 1:
                    entries += [encode_kv(SPLIT_NO, ValueType.UINT16, i, bo),
                                encode_kv(SPLIT_COUNT, ValueType.UINT16, len(shards), bo),
                                encode_kv(SPLIT_TENSORS, ValueType.INT32, len(tensors), bo)]
                head, rel, data_start = encode_header(entries, [t.entry for t in chunk], alignment, version, bo)
                tmp = stack.enter_context(atomic_path(path))
                end, n = _write_shard(tmp, head, data_start, chunk, rel, src_fds, copier, model)
                written += end
                copied += n
    except OSError as e:  # e.g. a full disk: the temp files are gone, the source untouched
        raise InputError(f"-o {paths[0]}: writing failed ({e.strerror or e}); free space or pick another -o"
                         ) from None
    return PruneResult(paths, written, copied, routing, plan.method)


def _write_shard(tmp: Path, head: bytes, data_start: int, chunk: list[OutTensor], rel: list[int],
                 src_fds: list[int], copier: RangeCopier, model: Model) -> tuple[int, int]:
    """Header, then each tensor's runs copied at its aligned offset; returns (file size, bytes copied)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    copied = 0
    try:
        os.pwrite(fd, head.ljust(data_start, b"\0"), 0)
        end = data_start
        for t, r in zip(chunk, rel):
            base = data_start + r
            for src_off, dst_off, length in t.runs:
                copier.copy(src_fds[t.source.shard], src_off, fd, base + dst_off, length,
                            where=str(model.shards[t.source.shard].path))
                copied += length
            end = base + t.entry.nbytes
        os.ftruncate(fd, end)
        os.fsync(fd)
    finally:
        os.close(fd)
    return end, copied


def _open_ro(stack: contextlib.ExitStack, path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    stack.callback(os.close, fd)
    return fd
