"""Streaming GGUF output for models derived from another GGUF (prune): headers and bulk data copies.

Why not writer.py: a derived model keeps the source's metadata, including 150k-entry tokenizer arrays,
and any ggml type id (gguf-py's writer and its type table do not cover them all). Here the source's
key/value entries are copied byte for byte (never decoded), changed keys are encoded anew, and tensor
data is copied file to file in large runs (``os.copy_file_range``, else ``sendfile``, else pread/pwrite
through one fixed buffer), so memory does not depend on the model's size.
"""
from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable


from ..errors import GGUFFormatError
from .reader import GGUFHeader, Parser

COPY_CHUNK = 64 << 20  # bytes per copy call: big enough for throughput, small enough for a smooth progress bar
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.ENOTSUP}


def source_kv_entries(header: GGUFHeader) -> dict[str, bytes]:
    """Each metadata entry of ``header`` as its raw bytes (key, type, value), in file order."""
    out: dict[str, bytes] = {}
    with open(header.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        p = Parser(mm, header.path, header.byteorder, header.version)
        p.off = 24  # magic, version, tensor count, kv count
        for _ in range(len(header.kv)):
            start = p.off
            key = p.string("metadata key")
            vtype = p.u32(f"type of {key!r}")
            p.value(vtype, key=key)
            out[key] = bytes(mm[start:p.off])
    return out


class RangeCopier:
    """Copies byte ranges between open files, kernel-side where the OS allows (no user-space buffer)."""

    def __init__(self, progress: Callable[[int], None] | None = None) -> None:
        self.progress = progress
        self.method = "copy_file_range" if hasattr(os, "copy_file_range") else \
            "sendfile" if hasattr(os, "sendfile") else "pread"
        self._buf: bytearray | None = None

    def copy(self, src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int, where: str = "") -> None:
        while n > 0:
            step = min(n, COPY_CHUNK)
            got = self._copy_some(src_fd, src_off, dst_fd, dst_off, step)
            if got <= 0:
                raise GGUFFormatError(f"{where}: the source ended {n} bytes early at offset {src_off}; "
                                      "the file is truncated: download it again")
            src_off += got
            dst_off += got
            n -= got
            if self.progress is not None:
                self.progress(got)

    def _copy_some(self, src: int, s_off: int, dst: int, d_off: int, n: int) -> int:
        if self.method == "copy_file_range":
            try:
                return os.copy_file_range(src, dst, n, s_off, d_off)
            except OSError as e:
                if e.errno not in _FALLBACK_ERRNOS:
                    raise
                self.method = "sendfile" if hasattr(os, "sendfile") else "pread"
        if self.method == "sendfile":
            try:
                os.lseek(dst, d_off, os.SEEK_SET)
                return os.sendfile(dst, src, s_off, n)
            except OSError as e:
                if e.errno not in _FALLBACK_ERRNOS:
                    raise
                self.method = "pread"
        if self._buf is None:
            self._buf = bytearray(min(COPY_CHUNK, 16 << 20))
        view = memoryview(self._buf)[:min(n, len(self._buf))]
        got = os.preadv(src, [view], s_off)
        done = 0
        while done < got:
            done += os.pwrite(dst, view[done:got], d_off + done)
        return got
