"""Checks shared by the prune tests: every byte of the output is where the plan says, read independently."""
from __future__ import annotations

from pathlib import Path

import ggml_ref
import numpy as np
import pandas as pd

from gguf_experts.gguf.check import check_paths
from gguf_experts.gguf.reader import open_model
from gguf_experts.gguf.layout import byte_map
from gguf_experts.gguf.names import split_name
from gguf_experts.gguf.expert_ids import mapping_of


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def assert_pruned_correctly(src_path: Path, out_path: Path) -> dict[int, np.ndarray]:
    """libggml reads every output shard as we do; check-overlaps is clean; every kept expert slice (through
    the two byte maps), router row, per-expert vector and every other tensor equals its source bytes."""
    src, out = open_model(src_path), open_model(out_path)
    for sh in out.shards:
        ggml_ref.assert_matches_ggml(sh)
    findings = check_paths([str(out_path)])
    assert findings.empty, findings
    mapping = mapping_of(out.kv)
    assert mapping is not None
    ids = mapping.original_ids
    assert out.expert_count == len(next(iter(ids.values())))
    sm = byte_map(src, split_experts=True)
    om = byte_map(out, split_experts=True)
    sdir, odir = Path(src_path).parent, Path(out_path).parent
    src_rows = {(r.base_name, None if pd.isna(r.expert_id) else int(r.expert_id)): r for r in sm.itertuples()}
    n_sliced = 0
    for r in om.itertuples():
        layer = split_name(r.base_name)[0]
        if not pd.isna(r.expert_id):  # an expert slice: through the mapping
            orig = int(ids[layer][int(r.expert_id)])
            s = src_rows[(r.base_name, orig)]
            n_sliced += 1
            assert r.size == s.size
            assert read_at(odir / r.file, r.offset, r.size) == read_at(sdir / s.file, s.offset, s.size), r.name
            continue
        s = src_rows[(r.base_name, None)]
        got = read_at(odir / r.file, r.offset, r.size)
        if r.size == s.size:
            assert got == read_at(sdir / s.file, s.offset, s.size), r.name
        else:  # router rows / per-expert vectors: the kept rows, in order, of the source tensor
            n_src = src.expert_count
            row = s.size // n_src
            whole = read_at(sdir / s.file, s.offset, s.size)
            want = b"".join(whole[e * row:(e + 1) * row] for e in ids[layer])
            assert got == want, r.name
    assert n_sliced > 0
    return ids
