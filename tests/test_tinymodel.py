"""Tiny models: deterministic, the exact tensor set llama.cpp needs, quantized by llama.cpp, cached demo model."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from gguf_experts.cli import main
from gguf_experts.errors import InputError
from gguf_experts.gguf.reader import open_model
from gguf_experts.gguf.layout import byte_map
from gguf_experts.gguf.fingerprint import fingerprint
from gguf_experts.demo.tinymodel import QUANT_FTYPES, demo_model_path, make_tiny_model

QWEN_PER_LAYER = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                  "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}


def test_deterministic_from_seed(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a.gguf", seed=3)
    b = make_tiny_model(tmp_path / "b.gguf", seed=3)
    c = make_tiny_model(tmp_path / "c.gguf", seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert oct(a.stat().st_mode & 0o077) != "0o0"  # not left with mkstemp's 0600


@pytest.mark.parametrize("arch", ["qwen3moe", "gpt-oss"])
def test_header_and_tensor_set(tmp_path: Path, arch: str) -> None:
    p = make_tiny_model(tmp_path / "m.gguf", arch=arch, n_layer=3, n_expert=8, n_expert_used=2)
    m = open_model(p)
    assert (m.architecture, m.block_count, m.expert_count, m.expert_used_count) == (arch, 3, 8, 2)
    names = {t.name for t in m.tensors}
    per_layer = {n.split(".", 2)[2].rsplit(".", 1)[0] for n in names if n.startswith("blk.0.")}
    if arch == "qwen3moe":
        assert per_layer == QWEN_PER_LAYER
    else:
        assert {"attn_sinks", "post_attention_norm", "ffn_gate_inp"} <= per_layer
        assert "blk.0.ffn_down_exps.bias" in names and "blk.0.ffn_gate_inp.bias" in names
    gate = next(t for t in m.tensors if t.name == "blk.1.ffn_gate_exps.weight")
    assert gate.ne == (64, 32, 8)
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= names


def test_ftype_numbers_match_llama_cpp() -> None:
    lc = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [live] extra) is not installed")
    assert QUANT_FTYPES["Q8_0"] == lc.LLAMA_FTYPE_MOSTLY_Q8_0
    assert QUANT_FTYPES["Q4_K_M"] == lc.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert QUANT_FTYPES["MXFP4_MOE"] == lc.LLAMA_FTYPE_MOSTLY_MXFP4_MOE
    assert QUANT_FTYPES["F16"] == lc.LLAMA_FTYPE_MOSTLY_F16


@pytest.mark.live
@pytest.mark.parametrize("quant,expert_types", [("Q8_0", {"Q8_0"}), ("MXFP4_MOE", {"MXFP4"}),
                                                ("Q4_K_M", {"Q4_K", "Q6_K"})])
def test_requantized_by_llama_cpp(tmp_path: Path, quant: str, expert_types: set[str]) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [live] extra) is not installed")
    # K-quants need rows of 256: a wider, shallower model so llama.cpp does not fall back to Q5_0
    p = make_tiny_model(tmp_path / "q.gguf", quant=quant, n_layer=2, n_expert=4, n_expert_used=2, n_embd=256,
                        n_ff_exp=256)
    m = open_model(p)
    bm = byte_map(m, split_experts=False)
    exp_types = set(bm.loc[bm["component"].str.endswith("_exps"), "ggml_type"])
    assert exp_types <= expert_types and exp_types
    f32 = open_model(make_tiny_model(tmp_path / "f.gguf", n_layer=2, n_expert=4, n_expert_used=2, n_embd=256,
                                     n_ff_exp=256))
    # llama.cpp's quantizer reorders tensors (by layer, then name); names and shapes are kept
    assert sorted((t.name, t.ne) for t in m.tensors) == sorted((t.name, t.ne) for t in f32.tensors)
    assert fingerprint(m).type_digest != fingerprint(f32).type_digest


def test_demo_model_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUF_EXPERTS_CACHE", str(tmp_path / "cache"))
    p1 = demo_model_path()
    mtime = p1.stat().st_mtime_ns
    p2 = demo_model_path()
    assert p1 == p2 and p2.stat().st_mtime_ns == mtime
    assert p1.parent == tmp_path / "cache" and not list(p1.parent.glob("*.tmp"))
    assert open_model(p1).expert_count == 16


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="n_expert_used"):
        make_tiny_model(tmp_path / "x.gguf", n_expert=4, n_expert_used=5)
    with pytest.raises(InputError, match="architecture"):
        make_tiny_model(tmp_path / "x.gguf", arch="llama")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_cli_make_model(tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    out = tmp_path / "m.gguf"
    assert main(["make-model", str(out), "--arch", "gpt-oss", "--experts", "8", "--top-k", "2",
                 "--format", fmt]) == 0
    text = capsys.readouterr().out
    if fmt == "json":
        assert json.loads(text)["bytes"] == out.stat().st_size
    elif fmt == "csv":
        assert pd.read_csv(__import__("io").StringIO(text))["experts"].tolist() == [8]
    else:
        assert "gpt-oss" in text and str(out) in text
    assert open_model(out).expert_count == 8
    assert main(["make-model", str(tmp_path / "y.gguf"), "--experts", "2", "--top-k", "3"]) == 2
    assert "n_expert_used" in capsys.readouterr().err


def test_live_unavailable_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    import gguf_experts
    from gguf_experts.errors import LiveUnavailableError
    from gguf_experts.trace.live import ggml_ctypes

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    monkeypatch.setattr(ggml_ctypes, "_llama_cpp", None)
    rec = gguf_experts.Recorder(tmp_path / "t.bin")  # lazily exported; no llama_cpp needed yet
    with pytest.raises(LiveUnavailableError, match=r"pip install 'gguf-experts\[live\]'"):
        rec.llama(make_tiny_model(tmp_path / "m.gguf"))
    assert not (tmp_path / "t.bin").exists()
    assert main(["capture", str(tmp_path / "m.gguf"), "-p", "hi", "-o", str(tmp_path / "t.bin")]) == 2
