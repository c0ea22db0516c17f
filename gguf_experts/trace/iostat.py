"""Measured I/O of this process: the counters a trace records per ubatch, and the state at start (``io_start``).

Why these: ``/proc/self/io`` ``read_bytes`` counts the bytes the process made the block layer read (page-cache
misses, read-ahead included); ``ru_majflt`` the page faults that waited for I/O; together with the model's
page-cache residency, MemAvailable and the device's ``read_ahead_kb`` they are what `forecast` needs to compare
its model of the kernel with what the kernel did. The C tracer (preload/ggexp_io.c) measures the same things
the same way. Linux only; where a counter cannot be read it is reported as unknown (-1 / None), never guessed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["IoCounters", "IoSnapshot", "io_start", "mem_available", "model_files", "model_resident",
           "read_ahead_kb"]


@dataclass(frozen=True)
class IoSnapshot:
    """The process's counters at one moment (-1: unknown)."""

    read_bytes: int
    majflt: int
    ns: int  # time.monotonic_ns()

    def delta(self, before: "IoSnapshot") -> tuple[int, int, int]:
        """(read_bytes, majflt, wall_ns) since ``before``; -1 where either side is unknown."""
        rb = self.read_bytes - before.read_bytes if min(self.read_bytes, before.read_bytes) >= 0 else -1
        mf = self.majflt - before.majflt if min(self.majflt, before.majflt) >= 0 else -1
        return rb, mf, self.ns - before.ns


class IoCounters:
    """Cheap repeated reads of /proc/self/io (one pread on a descriptor kept open) and getrusage."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/self/io", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # not Linux, or /proc not mounted / not readable (some containers)
            self._fd = None

    def read_bytes(self) -> int:
        if self._fd is None:
            return -1
        try:
            raw = os.pread(self._fd, 512, 0)
        except OSError:
            return -1
        at = raw.find(b"\nread_bytes: ")
        if at < 0:
            return -1
        end = raw.find(b"\n", at + 13)
        return int(raw[at + 13:end if end >= 0 else None])

    def snapshot(self) -> IoSnapshot:
        try:
            majflt = int(resource.getrusage(resource.RUSAGE_SELF).ru_majflt)
        except (OSError, ValueError):
            majflt = -1
        return IoSnapshot(self.read_bytes(), majflt, time.monotonic_ns())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where unreadable)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def model_files(path: str | os.PathLike[str]) -> list[Path]:
    """The file(s) of a model: every shard of a split GGUF (named like llama.cpp's gguf-split), else the file."""
    from ..gguf.reader import shard_paths

    p = Path(path)
    try:
        shards = shard_paths(p)
    except Exception:  # noqa: BLE001  (a name that only looks like a shard: the file alone)
        shards = None
    return list(shards) if shards else [p]


_libc: Any = None


def _mincore_fn() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return _libc


_WINDOW = 1 << 30  # mincore's vector for 1 GiB at a time: 256 KiB at 4 KiB pages


def file_resident(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(bytes of the file in the page cache, file size): mincore over a fresh read-only mapping.

    The mapping is never touched, so measuring reads nothing and changes no page's state. None where the
    file cannot be mapped or mincore fails."""
    libc = _mincore_fn()
    page = mmap.PAGESIZE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, 0
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = np.empty(_WINDOW // page, np.uint8)
            pages = 0
            for off in range(0, size, _WINDOW):
                length = min(_WINDOW, size - off)
                if libc.mincore(ctypes.c_void_p(addr + off), length, vec.ctypes.data) != 0:
                    return None
                npg = -(-length // page)
                pages += int(np.count_nonzero(vec[:npg] & 1))
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
        return min(pages * page, size), size
    finally:
        os.close(fd)


def model_resident(path: str | os.PathLike[str]) -> tuple[int | None, int]:
    """(resident bytes, size) summed over the model's files; resident None when any file cannot be measured."""
    resident: int | None = 0
    size = 0
    for f in model_files(path):
        got = file_resident(f)
        if got is None:
            resident = None
            try:
                size += f.stat().st_size
            except OSError:
                pass
            continue
        if resident is not None:
            resident += got[0]
        size += got[1]
    return resident, size


def read_ahead_kb(path: str | os.PathLike[str]) -> int | None:
    """``read_ahead_kb`` of the block device holding ``path``: /sys/dev/block/MAJ:MIN, a partition's parent queue.

    None where it cannot be told (a file system without one block device: overlay, tmpfs, btrfs, NFS)."""
    try:
        dev = os.stat(path).st_dev
        node = Path(os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
        if not node.exists():
            return None
        queue = node / "queue" / "read_ahead_kb"
        if not queue.exists() and (node / "partition").exists():
            queue = node.parent / "queue" / "read_ahead_kb"
        return int(queue.read_text().strip())
    except (OSError, ValueError):
        return None


def io_start(model_path: str | os.PathLike[str], counters: IoCounters | None = None) -> dict[str, Any]:
    """The trace header's ``io_start``: the memory and page-cache state before the model is loaded, plus the
    process counters then (``read_bytes``, ``majflt``: a later ``io_load`` is the load's share)."""
    resident, size = model_resident(model_path)
    snap = (counters or IoCounters()).snapshot()
    return {"mem_available": mem_available(), "model_resident": resident, "model_size": size,
            "read_ahead_kb": read_ahead_kb(model_path), "page_size": mmap.PAGESIZE,
            "read_bytes": snap.read_bytes if snap.read_bytes >= 0 else None,
            "majflt": snap.majflt if snap.majflt >= 0 else None}


def io_load(start: IoSnapshot, now: IoSnapshot) -> dict[str, Any]:
    """The ``io_load`` meta: what the load (and context creation) read, from ``io_start`` to the first ubatch."""
    rb, mf, ns = now.delta(start)
    return {"read_bytes": rb if rb >= 0 else None, "majflt": mf if mf >= 0 else None, "wall_ns": ns}
