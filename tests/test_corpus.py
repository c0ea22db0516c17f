"""The demo model's corpus manifest (gguf_experts/demo/corpus.py): a missing or changed corpus file stops
training with the file's name (one line, exit 2) before torch is imported; the committed manifest is well formed
(both kinds, each with training and held-out files, every source with a licence)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_experts.demo.corpus import KINDS, MANIFEST, CorpusError, check_files, load_manifest, sha256_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_tiny_moe.py"


def _manifest(tmp_path: Path) -> tuple[Path, list[Path]]:
    files = []
    for i, text in enumerate(["def f():\n    return 1\n", "A short sentence.\n"]):
        p = tmp_path / f"f{i}.txt"
        p.write_text(text)
        files.append(p)
    doc = {"sources": {"s": {"licence": "MIT", "licence_file": "-", "kind": "code"}},
           "files": [{"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size, "kind": k,
                      "source": "s", "split": "train"} for p, k in zip(files, KINDS)]}
    m = tmp_path / "manifest.json"
    m.write_text(json.dumps(doc))
    return m, files


def _train(manifest: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--manifest", str(manifest), "--out", str(tmp_path / "o"),
                           "--steps", "1"], capture_output=True, text=True, timeout=120)


def test_intact_corpus_passes(tmp_path: Path) -> None:
    m, _ = _manifest(tmp_path)
    check_files(load_manifest(m)[1])


@pytest.mark.parametrize("damage", ["changed", "same-size-changed", "missing"])
def test_damaged_corpus_file_stops_training_naming_it(tmp_path: Path, damage: str) -> None:
    m, files = _manifest(tmp_path)
    bad = files[1]
    if damage == "missing":
        bad.unlink()
    elif damage == "changed":
        bad.write_text(bad.read_text() + "more\n")
    else:
        bad.write_text(bad.read_text().replace("A", "B"))  # same size: only the hash tells
    with pytest.raises(CorpusError, match=str(bad)):
        check_files(load_manifest(m)[1])
    r = _train(m, tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and ("missing" in lines[0] or "changed" in lines[0]), r.stderr
    assert not (tmp_path / "o").exists()


def test_malformed_manifest_is_one_line(tmp_path: Path) -> None:
    m = tmp_path / "m.json"
    m.write_text('{"files": [')
    r = _train(m, tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and str(m) in r.stderr


def test_committed_manifest_is_well_formed() -> None:
    sources, files = load_manifest(MANIFEST)
    for kind in KINDS:
        splits = {f.split for f in files if f.kind == kind}
        assert splits == {"train", "heldout"}, (kind, splits)
    for s in sources.values():
        assert s["licence"] and s["licence_file"]
    assert len({f.path for f in files}) == len(files)
    assert all(len(f.sha256) == 64 and f.bytes > 0 for f in files)
