"""scripts/make_big_model.py's routing shapes: --token-dependent changes exactly the weights it says (token
embeddings sqrt(n_embd) times larger, attn_output and ffn_down_exps 20x smaller, a flat router) and nothing else,
so the paging harness compares two models with the same tensors, sizes and offsets."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gguf_experts.gguf.reader import open_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_big_model.py"
SMALL = ["--layers", "2", "--experts", "8", "--top-k", "2", "--embd", "256", "--ff", "64", "--heads", "4",
         "--heads-kv", "2", "--head-dim", "64"]
EMBD = 256


def make(tmp: Path, name: str, *extra: str) -> Path:
    out = tmp / f"{name}.gguf"
    subprocess.run([sys.executable, str(SCRIPT), str(out), *SMALL, *extra], check=True, capture_output=True)
    return out


def tensors(path: Path) -> dict[str, tuple[int, bytes, str]]:
    """name -> (offset, bytes, type name), read with our own reader."""
    m = open_model(path)
    raw = path.read_bytes()
    return {t.name: (t.offset, raw[t.offset:t.offset + t.nbytes], str(t.type.name)) for t in m.tensors}


def q8_scales(b: bytes) -> np.ndarray:
    blocks = np.frombuffer(b, np.uint8).reshape(-1, 34)
    return blocks[:, :2].copy().view(np.float16).astype(np.float64).ravel()


def q8_quants(b: bytes) -> bytes:
    return np.frombuffer(b, np.uint8).reshape(-1, 34)[:, 2:].tobytes()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, tuple[int, bytes, str]]]:
    tmp = tmp_path_factory.mktemp("big")
    return {"default": tensors(make(tmp, "default")), "tokdep": tensors(make(tmp, "tokdep", "--token-dependent")),
            "flat": tensors(make(tmp, "flat", "--router", "flat"))}


def test_token_dependent_scales_exactly_the_named_weights(models: dict) -> None:
    d, t = models["default"], models["tokdep"]
    assert list(d) == list(t)
    scaled = {"token_embd.weight": np.sqrt(EMBD)}
    for i in range(2):
        scaled[f"blk.{i}.attn_output.weight"] = 1 / 20
        scaled[f"blk.{i}.ffn_down_exps.weight"] = 1 / 20
    for name, (off, data, typ) in d.items():
        off_t, data_t, typ_t = t[name]
        assert (off_t, typ_t, len(data_t)) == (off, typ, len(data)), name
        if name in scaled:
            assert q8_quants(data_t) == q8_quants(data), name  # the same random quants
            ratio = q8_scales(data_t) / q8_scales(data)
            assert np.allclose(ratio, scaled[name], rtol=2e-3), (name, ratio.min(), ratio.max())
        elif name.endswith("ffn_gate_inp.weight"):
            assert data_t != data
        else:
            assert data_t == data, name


def router_row_norms(data: bytes) -> np.ndarray:
    return np.linalg.norm(np.frombuffer(data, np.float32).reshape(8, EMBD), axis=1)


def test_flat_router_draws_every_row_alike(models: dict) -> None:
    for i in range(2):
        name = f"blk.{i}.ffn_gate_inp.weight"
        peaked = router_row_norms(models["default"][name][1])
        flat = router_row_norms(models["tokdep"][name][1])
        # peaked: each expert's row has its own scale (0.5 to 5.5); flat: one scale, norms within sampling noise
        assert peaked.max() / peaked.min() > 3
        assert flat.max() / flat.min() < 1.3
        assert np.allclose(flat, 1.0, atol=0.2)  # logits of unit variance for a normalised input
    # --router flat alone changes the router rows only
    d, f = models["default"], models["flat"]
    assert [n for n in d if d[n][1] != f[n][1]] == [f"blk.{i}.ffn_gate_inp.weight" for i in range(2)]
