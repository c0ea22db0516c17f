"""Paging modes for `run --paging` and `capture --paging` (PAGING_SPEC.md, docs/paging.md).

The work is done by the C preload (gguf_experts/trace/preload/ggexp_paging.c), driven by environment variables;
this module chooses the mode (``auto``), checks that a mode can apply, and builds that environment. Library
code: no printing; the chosen mode and its reason are returned for the CLI to say.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

MODES = ("stock", "random", "prefetch", "auto")
ENV_PAGING, ENV_LOAD, ENV_WHOLE = "GGUF_EXPERTS_PAGING", "GGUF_EXPERTS_PAGING_LOAD", "GGUF_EXPERTS_PREFETCH_WHOLE"
ENV_RESERVE, ENV_ASYNC = "GGUF_EXPERTS_PAGING_RESERVE", "GGUF_EXPERTS_PREFETCH_ASYNC"
#: RAM kept out of the page cache's share when judging "fits": KV cache + compute buffers of a small context
#: (the C side uses the same default for the env form; override with GGUF_EXPERTS_PAGING_RESERVE, bytes)
DEFAULT_RESERVE = 1 << 30
_IN_MEMORY_FS = {"tmpfs", "ramfs"}
_SHARD = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<n>\d{5})\.gguf$")


@dataclass(frozen=True)
class PagingChoice:
    mode: str  # stock | random | prefetch (auto: left to the preload, which sizes the file the program maps)
    reason: str  # one clause, for the stderr line
    load: str  # the load pass: "keep" (MAP_POPULATE and whole-file WILLNEED stay) or "skip"
    fallback: bool = False  # the asked mode could not apply (a warning, not just a choice)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InputError(f"--paging {mode}: unknown mode; use one of {', '.join(MODES)}")
    return mode


def mem_available(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable in bytes (None where the kernel does not say)."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fs_type(path: str | os.PathLike[str]) -> str | None:
    """The file system type holding ``path`` (the longest mount point that contains it, /proc/self/mounts)."""
    real = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        return None
    return kind


def model_files(model: Path) -> list[Path]:
    """The model's files: every shard of a split GGUF (NAME-0000i-of-0000n.gguf), else the file itself."""
    m = _SHARD.match(model.name)
    if not m:
        return [model]
    n = int(m["n"])
    shards = [model.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    return [s for s in shards if s.exists()]


def model_in_argv(argv: Sequence[str]) -> Path | None:
    """The model a llama.cpp program was given: the value of -m/--model, else the first existing *.gguf
    argument (a Python script's own arguments), else None."""
    for i, a in enumerate(argv):
        if a in ("-m", "--model") and i + 1 < len(argv):
            return Path(argv[i + 1])
        for flag in ("--model=", "-m="):
            if a.startswith(flag):
                return Path(a[len(flag):])
    for a in argv[1:]:
        if a.endswith(".gguf") and os.path.isfile(a):
            return Path(a)
    return None


def forecast_mode(model: Path, budget: int, trace: str | os.PathLike[str] | None = None) -> tuple[str, str] | None:
    """The mode `forecast` recommends for this model at this RAM budget, with its reason: replayed on ``trace``
    (the user's workload, ``run --paging-trace``), else on a synthetic request of the model's shape whose routing
    is uniform over every expert (the hard case: trained models route by token); None when no forecast can be
    made here (e.g. the device's read-ahead is unreadable), and ``auto`` then uses its rule."""
    from ..errors import GGUFExpertsError
    from .forecast import forecast, recommend, synthetic_trace

    try:
        workload = trace if trace is not None else synthetic_trace(model)
        rec = recommend(forecast(workload, str(model), [budget]))
    except GGUFExpertsError:
        return None
    if rec.empty:
        return None
    row = rec.iloc[0]
    what = "this trace's routing" if trace is not None else "uniform routing, 128 prompt + 16 generated tokens"
    return str(row["advice"]), f"{what}: {float(row['decode_tok_s']):.3g} decode tok/s forecast"


def choose_mode(model: Path | None, available: int | None, reserve: int = DEFAULT_RESERVE,
                trace: str | os.PathLike[str] | None = None) -> PagingChoice:
    """``auto``: stock when the model fits in MemAvailable minus ``reserve``, else forecast's recommendation,
    else prefetch (the documented rule: the probe measured it best at ~9 GiB for both routing shapes' decode)."""
    if model is None:
        return PagingChoice("stock", "auto: no model file on the command line to size; pass --paging MODE", "keep")
    size = sum(f.stat().st_size for f in model_files(model))
    if available is None:
        return PagingChoice("stock", "auto: MemAvailable is unknown", "keep")
    budget = available - reserve
    gib = 1 << 30
    if size <= budget:
        return PagingChoice("stock", f"auto: the model ({size / gib:.1f} GiB) fits in MemAvailable "
                            f"({available / gib:.1f} GiB) minus a {reserve / gib:.1f} GiB reserve", "keep")
    rec = forecast_mode(model, available, trace)
    if rec is not None:
        return PagingChoice(rec[0], f"auto: the model ({size / gib:.1f} GiB) does not fit in MemAvailable "
                            f"({available / gib:.1f} GiB) minus a {reserve / gib:.1f} GiB reserve; forecast "
                            f"recommends {rec[0]} ({rec[1]})", "skip")
    return PagingChoice("prefetch", f"auto: the model ({size / gib:.1f} GiB) does not fit in MemAvailable "
                        f"({available / gib:.1f} GiB) minus a {reserve / gib:.1f} GiB reserve; no forecast, "
                        "so prefetch", "skip")


def resolve(mode: str, model: Path | None, available: int | None = None,
            reserve: int | None = None, trace: str | os.PathLike[str] | None = None) -> PagingChoice:
    """The mode to run with: ``auto`` chosen by :func:`choose_mode`; a mode that cannot apply (the model on
    tmpfs/ramfs: already in memory) falls back to stock with ``fallback`` set. The C side checks what only
    the running program knows (it does not map the model; the experts are repacked or offloaded) and says so."""
    check_mode(mode)
    if reserve is None:
        env = os.environ.get(ENV_RESERVE)
        reserve = int(env) if env and env.isdigit() else DEFAULT_RESERVE
    if available is None:
        available = mem_available()
    if model is not None and not model.is_file():
        model = None  # the program will say; we cannot size or check it
    if model is not None and mode != "stock" and fs_type(model) in _IN_MEMORY_FS:
        return PagingChoice("stock", f"--paging {mode} cannot apply: {model} is on {fs_type(model)} (already "
                            "in memory); running as stock", "keep", fallback=True)
    if mode == "auto" and model is None:  # the preload sizes the file the program maps (stock or prefetch)
        return PagingChoice("auto", "no model file on the command line: the preload decides when the program maps "
                            "it (stock if it fits, else prefetch)", "auto")
    if mode == "auto":
        return choose_mode(model, available, reserve, trace)
    if mode == "stock":
        return PagingChoice("stock", "asked", "keep")
    fits = model is not None and available is not None and sum(
        f.stat().st_size for f in model_files(model)) <= available - reserve
    load, why = ("keep", "asked; the model fits in memory") if fits else ("skip", "asked; the model does not fit")
    if model is None:
        load, why = "auto", "asked; the preload sizes the model when it is mapped"
    if os.environ.get(ENV_LOAD) in ("keep", "skip", "auto"):
        load, why = os.environ[ENV_LOAD], f"asked; {ENV_LOAD}={os.environ[ENV_LOAD]}"  # the user's override
    return PagingChoice(mode, why, load)


def paging_env(choice: PagingChoice, base: dict[str, str] | None = None) -> dict[str, str]:
    """The variables the preload reads."""
    env = dict(os.environ if base is None else base)
    env[ENV_PAGING] = choice.mode
    env[ENV_LOAD] = choice.load
    return env
