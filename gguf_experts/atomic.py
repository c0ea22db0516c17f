"""The one way outputs are written: to a temp file beside the target, renamed into place, never half-written.

- A regular file (or a new name) is replaced atomically: temp file in the same directory, then rename.
- A symlink is followed: its target is replaced, in the target's directory (the link stays a link).
- Something that is not a regular file (``/dev/null``, ``/dev/stdout``, a FIFO, a terminal) is written
  directly: renaming over it would replace a device with a file (0.1.0 did that to ``/dev/null`` as root).
- A missing or read-only directory is named in a :class:`OutputError` before anything is written.
- Temp files are named ``.NAME.gx<pid>-XXXXXXXX.tmp``; one whose process is gone (killed with -9) is
  removed by the next write to the same NAME. A failed write removes its own.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .errors import OutputError

_TMP_TAG = "gx"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temps(target: Path) -> list[Path]:
    """Remove temp files of our own pattern for ``target`` whose writing process no longer exists."""
    pat = re.compile(rf"^\.{re.escape(target.name)}\.{_TMP_TAG}(\d+)-[A-Za-z0-9_]+\.tmp$")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pat.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


GGUF_MAGIC = b"GGUF"


def refuse_model(path: str | os.PathLike[str]) -> None:
    """Refuse an output that would replace an existing GGUF model (``dump m.gguf -o m.gguf``): model
    files are only ever read."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return
    if head == GGUF_MAGIC:
        raise OutputError(f"{path}: is a GGUF model; outputs never replace a model, give another output name")


def resolve_target(path: str | os.PathLike[str], model: bool = False) -> tuple[Path, bool]:
    """(the path to write, whether to write it directly): symlinks followed, non-regular files direct;
    raises OutputError naming the directory when it is missing or not writable, or when the output
    would replace a GGUF model (unless ``model``: the output is a model itself, as make-model's)."""
    p = Path(path)
    if str(path) == "":
        raise OutputError("empty output path; give a file name")
    try:
        st = os.stat(p)  # follows symlinks
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise OutputError(f"{path}: a part of the path is not a directory; choose another output") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{path}: is a directory; give a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        return p, True  # a device, FIFO or socket: write into it, never rename over it
    if st is not None and not model:
        refuse_model(p)
    real = Path(os.path.realpath(p)) if p.is_symlink() else p
    parent = real.parent if str(real.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: the directory {parent} does not exist; create it or choose another output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: the directory {parent} is not writable; choose another output")
    return real, False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], model: bool = False) -> Iterator[Path]:
    """Yield a temp path for a writer that wants a file name (gguf-py, llama.cpp's quantizer); on success
    it replaces ``path`` atomically with the usual permissions (or is copied into a non-regular ``path``),
    on error it is removed. ``model``: the output is a GGUF model and may replace one."""
    target, direct = resolve_target(path, model)
    if direct:
        with tempfile.TemporaryDirectory(prefix="gguf-experts-") as d:
            tmp = Path(d) / target.name
            yield tmp
            with open(tmp, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        return
    clean_stale_temps(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.{_TMP_TAG}{os.getpid()}-", suffix=".tmp",
                                    dir=target.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write in the directory {target.parent} ({e.strerror}); "
                          "choose another output") from e
    os.close(fd)
    try:
        yield Path(name)
        os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; give outputs the usual permissions
        os.replace(name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8",
                 model: bool = False) -> Iterator[IO]:
    """Yield a file object; on success it replaces ``path`` atomically (or has been written straight into a
    device or FIFO), on error it is removed. ``model``: the output is a GGUF model and may replace one."""
    binary = "b" in mode
    kw = {} if binary else {"encoding": encoding, "newline": ""}
    target, direct = resolve_target(path, model)
    if direct:
        with open(target, mode, **kw) as fh:  # type: ignore[call-overload]
            yield fh
        return
    with atomic_path(target, model) as tmp:
        with open(tmp, mode, **kw) as fh:  # type: ignore[call-overload]
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_group() -> Iterator[contextlib.ExitStack]:
    """Several outputs that appear together or not at all: ``paths.enter_context(atomic_path(p))`` for each;
    if anything fails before the end, every temp file is removed and no output is replaced."""
    with contextlib.ExitStack() as stack:
        yield stack
