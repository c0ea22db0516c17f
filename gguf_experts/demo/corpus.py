"""The demo model's training corpus: a manifest of files on the machine (path, sha256, licence, kind, split).

Why: the trained demo model must be reproducible and redistributable, so the text it was trained on is named
file by file with its hash and licence. Training stops on the first file that is missing or changed (the check
is here, without torch, so that a CI test exercises it). The manifest is JSON in ``demo/data/``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

#: the corpus manifest committed with the package (scripts/train_tiny_moe.py reads and writes it)
MANIFEST = Path(__file__).resolve().parent / "data" / "corpus_manifest.json"
KINDS = ("code", "prose")
SPLITS = ("train", "heldout")


class CorpusError(InputError):
    """A corpus file that is missing, unreadable or not the file the manifest hashed."""


@dataclass(frozen=True)
class CorpusFile:
    path: str
    sha256: str
    bytes: int
    kind: str  # one of KINDS
    source: str  # key into the manifest's "sources" (licence, licence file)
    split: str  # one of SPLITS


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(path: str | os.PathLike[str] = MANIFEST) -> tuple[dict[str, dict[str, str]], list[CorpusFile]]:
    """(sources, files) of a manifest; a malformed manifest is a CorpusError naming it."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        sources = doc["sources"]
        files = [CorpusFile(**f) for f in doc["files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorpusError(f"{path}: not a readable corpus manifest ({e}); regenerate it with "
                          "scripts/train_tiny_moe.py --write-manifest") from e
    for f in files:
        if f.kind not in KINDS or f.split not in SPLITS or f.source not in sources:
            raise CorpusError(f"{path}: entry {f.path} has kind {f.kind!r}, split {f.split!r}, source {f.source!r}; "
                              f"kinds are {KINDS}, splits {SPLITS}, sources {sorted(sources)}")
    return sources, files


def check_files(files: list[CorpusFile]) -> None:
    """Every file exists with the manifest's size and sha256; the first that does not is a CorpusError
    naming it (training on a changed corpus would silently give another model)."""
    for f in files:
        try:
            size = os.stat(f.path).st_size
            digest = sha256_file(f.path) if size == f.bytes else ""
        except OSError as e:
            raise CorpusError(f"corpus file {f.path} is missing or unreadable ({e.strerror}); the manifest "
                              "names files of this machine's Debian packages (see its sources)") from e
        if size != f.bytes or digest != f.sha256:
            raise CorpusError(f"corpus file {f.path} changed: {size} bytes, sha256 {digest[:12] or '-'}..., the "
                              f"manifest has {f.bytes} bytes, sha256 {f.sha256[:12]}...")


def read_texts(files: list[CorpusFile], kind: str, split: str) -> list[str]:
    """The checked files of one kind and split, as text (UTF-8, undecodable bytes replaced), in manifest order."""
    return [Path(f.path).read_bytes().decode("utf-8", errors="replace")
            for f in files if f.kind == kind and f.split == split]


__all__ = ["KINDS", "MANIFEST", "SPLITS", "CorpusError", "CorpusFile", "check_files", "load_manifest",
           "read_texts", "sha256_file"]
