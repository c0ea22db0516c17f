"""Bounded waits for the tests: read a pipe or pty until the awaited output, wait for a process; each with a
deadline, each woken by the kernel (select, pidfd) rather than by polling with sleeps."""
from __future__ import annotations

import os
import select
import time
from collections.abc import Callable


def read_until(fd: int, done: Callable[[bytes], bool], timeout: float) -> bytes:
    """Read a pipe or pty until ``done(what was read)``, at most ``timeout`` seconds (select: no polling).
    Raises AssertionError at the deadline or at end of file, with what was read."""
    deadline = time.monotonic() + timeout
    out = b""
    while not done(out):
        left = deadline - time.monotonic()
        assert left > 0, f"nothing like the awaited output in {timeout} s: {out[-2000:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # a pty whose other end closed
                chunk = b""
            assert chunk, f"end of output before the awaited line: {out[-2000:]!r}"
            out += chunk
    return out


def wait_pid(pid: int, timeout: float) -> int:
    """waitpid with a deadline (a pidfd, where the kernel has them: no polling); kills the child at the deadline."""
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError(f"process {pid} did not end in {timeout} s")
    return os.waitpid(pid, 0)[1]
