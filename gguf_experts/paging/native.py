"""Build pagesim.c into the user cache with the system cc on first use (as ``run`` builds its preload) and
load it with ctypes. Why C: a day-long trace touches billions of pages; Python cannot loop over them."""
from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path

from ..cbuild import compile_shared
from ..errors import GGUFExpertsError

SOURCE = Path(__file__).with_name("pagesim.c")
CFLAGS = ("-O2", "-shared", "-fPIC", "-std=gnu11")
NCOUNT = 9  # counters per ubatch, in pagesim.c's order
COUNTERS = ("majflt", "minflt", "read_pages", "read_requests", "touched_pages", "missed_pages", "evicted_pages",
            "io_s", "prefetched_pages")


class SimBuildError(GGUFExpertsError):
    """The page-cache simulator could not be compiled (no C compiler, or it failed)."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gguf-experts"


def library_path() -> Path:
    h = hashlib.sha256(" ".join(CFLAGS).encode() + b"\0" + SOURCE.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"pagesim-{h}" / "libpagesim.so"


def build(cc: str | None = None) -> Path:
    """The compiled simulator (built once per source; concurrent first uses each build, one wins)."""
    return compile_shared(library_path(), [*CFLAGS, str(SOURCE)], SimBuildError,
                          f"the page-cache simulator of `forecast` ({SOURCE})", "", cc)


_LIB: ctypes.CDLL | None = None
I64, F64, P = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class Replay(ctypes.Structure):
    """pagesim.c's replay_t: the model's page ranges in llama.cpp's order, and the replay's state."""

    _fields_ = [("n_block", ctypes.c_int32), ("n_expert", ctypes.c_int32),
                ("ne_idx", P), ("ne_a", P), ("ne_b", P), ("ex_idx", P), ("ex_base", P), ("ex_slice", P),
                ("embd_off", I64), ("embd_row", I64), ("mode", ctypes.c_int32), ("whole_frac", F64),
                ("cur_layer", ctypes.c_int32), ("cur_ub", I64), ("willneed_step", I64)]


def lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        so = ctypes.CDLL(str(build()))
        so.sim_new.restype = P
        so.sim_new.argtypes = [I64, I64, I64, I64, F64, F64]
        so.sim_free.argtypes = [P]
        so.sim_counters.argtypes = [P, P, ctypes.c_int]
        so.sim_resident.restype = I64
        so.sim_resident.argtypes = [P]
        so.sim_mmap_miss.restype = I64
        so.sim_mmap_miss.argtypes = [P]
        for f in ("sim_touch", "sim_willneed", "sim_read_seq"):
            getattr(so, f).argtypes = [P, I64, I64]
        so.sim_set_log.argtypes = [P, P, I64]
        so.sim_log_n.restype = I64
        so.sim_log_n.argtypes = [P]
        so.sim_set_rand.argtypes = [P, I64, I64, ctypes.c_int]
        so.sim_set_reclaim_batch.argtypes = [P, I64]
        so.sim_replay.restype = I64
        so.sim_replay.argtypes = [P, ctypes.POINTER(Replay), I64, P, P, P, P, P, ctypes.c_int, P]
        if so.sim_ncount() != NCOUNT:
            raise SimBuildError(f"{SOURCE}: counter count mismatch; reinstall gguf-experts")
        _LIB = so
    return _LIB
