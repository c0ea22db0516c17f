"""``gguf-experts pin``: keep the hot experts' bytes resident in the page cache for every process mapping the model.

A pinning process maps the model's files read-only (MAP_SHARED: the page cache's own pages) and mlock()s the
byte ranges of the chosen experts' slices; any other process that maps the same file (llama-server, under any
paging mode) then finds them resident and never waits on a fault for them. The locks live as long as the mapping:
munlock/munmap on release, and the kernel drops them if the process dies, so nothing stays locked after it.

The experts come from the ``pins`` analysis (gguf_experts.analysis.pins.pick_budget on a trace's counts), or
from a ``pins --list-csv`` file. Library code: no printing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np

from ..errors import GGUFExpertsError, InputError

PAGE = mmap.PAGESIZE


class PinLimitError(GGUFExpertsError):
    """A pin budget the system will not lock (RLIMIT_MEMLOCK, free memory), or an mlock that failed."""


@dataclass(frozen=True)
class PinPlan:
    """What to lock: page-aligned (file, offset, length) ranges, merged where slices touch."""

    ranges: list[tuple[Path, int, int]]
    experts: np.ndarray  # bool [n_layer, n_expert]
    bytes: int  # the experts' own bytes (the locked ranges round up to pages)

    @property
    def locked_bytes(self) -> int:
        return sum(n for _, _, n in self.ranges)


def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    for name in ("mlock", "munlock", "munmap"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        getattr(lib, name).restype = ctypes.c_int
    return lib


def plan(model_path: str | os.PathLike[str], experts: np.ndarray) -> PinPlan:
    """The byte ranges of every slice (gate, up, down, biases...) of the experts marked in ``experts``
    (bool [n_layer, n_expert]) in the model's files."""
    from ..gguf.reader import open_model
    from ..gguf.layout import expert_slices

    model = open_model(model_path)
    s = expert_slices(model)
    layer = s["layer"].to_numpy(np.int64)
    eid = s["expert_id"].to_numpy(np.int64)
    L, M = experts.shape
    ok = (layer < L) & (eid < M)
    keep = np.zeros(len(s), bool)
    keep[ok] = experts[layer[ok], eid[ok]]
    paths = {sh.path.name: sh.path for sh in model.shards}
    sel = s[keep]
    ranges: list[tuple[Path, int, int]] = []
    for fname, g in sel.groupby("file", sort=True):
        off = g["offset"].to_numpy(np.int64)
        end = off + g["size"].to_numpy(np.int64)
        order = np.argsort(off, kind="stable")
        beg = (off[order] // PAGE) * PAGE
        fin = -(-end[order] // PAGE) * PAGE
        fin = np.maximum.accumulate(fin)
        start_new = np.ones(len(beg), bool)
        start_new[1:] = beg[1:] > fin[:-1]  # a gap: a new range (touching or overlapping pages merge)
        idx = np.flatnonzero(start_new)
        stops = np.append(idx[1:], len(beg)) - 1
        ranges += [(paths[str(fname)], int(b), int(e - b)) for b, e in zip(beg[idx], fin[stops])]
    return PinPlan(ranges, experts.astype(bool), int(sel["size"].sum()))


def experts_from_counts(counts: np.ndarray, expert_bytes: np.ndarray, budget: int) -> np.ndarray:
    """The experts `pins --budget` picks from requests per (layer, expert): most requests per byte first, up
    to ``budget`` bytes (gguf_experts.analysis.pins.pick_budget)."""
    from ..analysis.pins import pick_budget

    if counts.sum() == 0:
        raise InputError("the trace holds no records; nothing to learn the hot experts from")
    return pick_budget(counts, expert_bytes, budget)


def experts_from_csv(model_path: str | os.PathLike[str], pins_csv: str, budget: int) -> np.ndarray:
    """The experts of a ``pins --list-csv`` file (layer,expert[,count]), in its order, up to ``budget`` bytes."""
    import pandas as pd

    from ..gguf.reader import open_model
    from ..gguf.layout import expert_bytes as eb_frame

    try:
        df = pd.read_csv(pins_csv)
    except (OSError, ValueError) as e:
        raise InputError(f"{pins_csv}: cannot read the pin list ({e}); write one with pins --list-csv") from None
    if not {"layer", "expert"} <= set(df.columns):
        raise InputError(f"{pins_csv}: no layer,expert columns; write the list with pins --list-csv")
    eb = eb_frame(open_model(model_path))
    L, M = int(eb["layer"].max()) + 1, int(eb["expert"].max()) + 1
    b = np.zeros((L, M), np.int64)
    b[eb["layer"].to_numpy(np.int64), eb["expert"].to_numpy(np.int64)] = eb["bytes"].to_numpy(np.int64)
    lay, ex = df["layer"].to_numpy(np.int64), df["expert"].to_numpy(np.int64)
    bad = (lay < 0) | (lay >= L) | (ex < 0) | (ex >= M)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{pins_csv}: line {i + 2}: layer {lay[i]} expert {ex[i]} is not in {model_path} "
                         f"({L} layers x {M} experts); the list was made for another model")
    n = int(np.searchsorted(np.cumsum(b[lay, ex]), budget, side="right"))
    out = np.zeros((L, M), bool)
    out[lay[:n], ex[:n]] = True
    return out


def memlock_limit() -> int | None:
    """RLIMIT_MEMLOCK's soft limit in bytes (None: unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def has_ipc_lock(status: str = "/proc/self/status") -> bool:
    """Whether this process has CAP_IPC_LOCK (then the kernel does not apply RLIMIT_MEMLOCK to mlock)."""
    try:
        with open(status, encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 14 & 1)
    except (OSError, ValueError):
        pass
    return False


def check_budget(budget: int, available: int | None) -> None:
    """Refuse a budget above RLIMIT_MEMLOCK (unless CAP_IPC_LOCK lifts it) or above MemAvailable, naming the
    limit and how to raise it."""
    gib = 1 << 30
    lim = memlock_limit()
    if lim is not None and budget > lim and not has_ipc_lock():
        raise PinLimitError(
            f"--budget {budget / gib:.2f} GiB is above RLIMIT_MEMLOCK ({lim / 1024:.0f} KiB, `ulimit -l`): "
            f"raise it with `ulimit -l {-(-budget // 1024)}` (or unlimited; the hard limit is set in "
            "/etc/security/limits.conf, memlock; CAP_IPC_LOCK lifts it) or give a smaller --budget")
    if available is not None and budget > available:
        raise PinLimitError(f"--budget {budget / gib:.2f} GiB is above the free memory (MemAvailable "
                            f"{available / gib:.2f} GiB): give a smaller --budget")


@dataclass
class Pinned:
    """The locked mappings of a plan; a context manager (release on exit). Partial failure unlocks all."""

    plan: PinPlan
    maps: list[tuple[int, int]] = field(default_factory=list)  # (address, length) of each file's mapping
    locked: list[tuple[int, int]] = field(default_factory=list)

    def __enter__(self) -> Pinned:
        lib = _libc()
        try:
            base: dict[Path, int] = {}
            for path, off, n in self.plan.ranges:
                if path not in base:
                    size = path.stat().st_size
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                    finally:
                        os.close(fd)
                    if addr in (None, ctypes.c_void_p(-1).value):
                        err = ctypes.get_errno()
                        raise PinLimitError(f"{path}: mmap failed ({os.strerror(err)})")
                    self.maps.append((addr, size))
                    base[path] = addr
                a = base[path] + off
                if lib.mlock(a, n) != 0:
                    err = ctypes.get_errno()
                    raise PinLimitError(
                        f"{path}: mlock of {n} bytes at offset {off} failed ({os.strerror(err)}) after "
                        f"{sum(x for _, x in self.locked)} bytes: RLIMIT_MEMLOCK (`ulimit -l`) or memory is too "
                        "small for --budget; nothing is left locked")
                self.locked.append((a, n))
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        lib = _libc()
        for a, n in self.locked:
            lib.munlock(a, n)
        for a, n in self.maps:
            lib.munmap(a, n)
        self.locked.clear()
        self.maps.clear()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
