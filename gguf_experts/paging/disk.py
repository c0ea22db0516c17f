"""The model file's block device: read-ahead (sysfs, read only), a disk model (sequential MB/s, 4 KiB random
IOPS) and ``measure_disk``, which times the device with O_DIRECT reads of the model file itself."""
from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

#: the machine of /work/shared/reference/paging-facts.md (virtio disk): used when nothing else is given
DEFAULT_SEQ_MBPS = 1900.0
DEFAULT_IOPS = 19300.0  # 79 MB/s at 4 KiB, queue depth 1


@dataclass(frozen=True)
class DiskModel:
    """A request of n pages costs lat + n x 4096 / seq: a 4 KiB request costs exactly 1/IOPS."""

    seq_mbps: float
    iops: float
    source: str  # "assumed", "given", "measured"

    @property
    def sec_per_page(self) -> float:
        return 4096.0 / (self.seq_mbps * 1e6)

    @property
    def latency(self) -> float:
        return max(0.0, 1.0 / self.iops - self.sec_per_page)


def _queue_dir(path: str | os.PathLike[str]) -> Path | None:
    st = os.stat(path)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    for q in (dev / "queue", dev / ".." / "queue"):  # a partition's queue is its disk's
        if (q / "read_ahead_kb").exists():
            return q
    return None


def _read_int(p: Path) -> int | None:
    try:
        return int(p.read_text().strip())
    except (OSError, ValueError):
        return None


def device_read_ahead_kb(path: str | os.PathLike[str]) -> int:
    """read_ahead_kb of the device holding ``path``; InputError (asking for --readahead) when unreadable."""
    q = _queue_dir(path)
    kb = _read_int(q / "read_ahead_kb") if q else None
    if kb is None:
        raise InputError(f"{path}: the read-ahead of its device cannot be read (no /sys/dev/block/.../queue/"
                         "read_ahead_kb: a network, overlay or FUSE file system?); give --readahead KB "
                         "(the kernel's default is 128)")
    return kb


def device_io_pages(path: str | os.PathLike[str], default: int) -> int:
    """bdi->io_pages: max_sectors_kb / 4 (WILLNEED reads at most max(io_pages, ra_pages) pages per call)."""
    try:
        q = _queue_dir(path)
    except OSError:
        return default
    kb = _read_int(q / "max_sectors_kb") if q else None
    return kb // 4 if kb else default


def measure_disk(path: str | os.PathLike[str], seconds: float = 3.0, block: int = 4 << 20) -> DiskModel:
    """Sequential MB/s (O_DIRECT reads of ``block`` bytes from a random start) and 4 KiB random IOPS (queue
    depth 1) over the model file, about ``seconds`` in all. Nothing is written; the page cache is bypassed."""
    size = os.path.getsize(path)
    if size < 2 * block:
        raise InputError(f"{path}: {size} bytes is too small to time the disk (need {2 * block})")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError as e:
        raise InputError(f"{path}: cannot open with O_DIRECT to time the disk ({e.strerror}); give --disk-seq "
                         "and --disk-iops instead") from None
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    small = memoryview(buf)[:4096]
    rng = np.random.default_rng()
    try:
        n_seq, t0 = 0, time.perf_counter()
        start = int(rng.integers(0, (size - block * 64) // block)) * block if size > block * 64 else 0
        while time.perf_counter() - t0 < seconds / 2:
            got = os.preadv(fd, [buf], start + n_seq * block if start + (n_seq + 1) * block <= size else 0)
            if got <= 0:
                break
            n_seq += 1
        t_seq = time.perf_counter() - t0
        offs = rng.integers(0, size // 4096, 1 << 20) * 4096
        n_rnd, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2 and n_rnd < len(offs):
            os.preadv(fd, [small], int(offs[n_rnd]))
            n_rnd += 1
        t_rnd = time.perf_counter() - t0
    except OSError as e:
        raise InputError(f"{path}: O_DIRECT read failed ({e.strerror}); give --disk-seq and --disk-iops") from None
    finally:
        os.close(fd)
        small.release()
        buf.close()
    return DiskModel(seq_mbps=n_seq * block / t_seq / 1e6, iops=n_rnd / t_rnd, source="measured")
