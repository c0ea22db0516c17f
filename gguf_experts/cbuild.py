"""Compile a shared library into the user cache, once per source (the `run` tracer, `forecast`'s simulator).

Why one place: a missing compiler, a failed build and two processes building at once must end the same way
for every C part: one clear error, no half-written library (temp file + rename; concurrent builders each build,
one wins).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import GGUFExpertsError


def compile_shared(out: Path, args: list[str], error: type[GGUFExpertsError], what: str, no_cc_hint: str,
                   cc: str | None = None) -> Path:
    """``out`` built as ``cc *args -o out`` unless it exists; ``error`` (naming ``what``) when it cannot be."""
    if out.exists():
        return out
    compiler = cc or os.environ.get("CC") or "cc"
    exe = shutil.which(compiler)
    if exe is None:
        raise error(f"no C compiler ({compiler!r} not found) to build {what}; install one (e.g. apt-get install "
                    f"gcc) or set CC{no_cc_hint}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([exe, "-o", tmp, *args], capture_output=True, text=True)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise error(f"{compiler} could not build {what}: {last}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)  # atomic: concurrent first uses each build, one wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
