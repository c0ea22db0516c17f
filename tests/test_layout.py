"""Byte map: tensors tile the data section, expert slices tile their tensor, every expert byte is
attributed (fused gate_up, gpt-oss biases, NVFP4 scales), components are labelled, realistic shapes."""
from __future__ import annotations

from pathlib import Path

import ggml_ref
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_experts.gguf.types import TYPES
from gguf_experts.gguf.reader import Model, open_model
from gguf_experts.gguf.writer import TensorSpec, write_gguf, write_split
from gguf_experts.gguf.layout import (
    COLUMNS, byte_map, expert_bytes, expert_slices, kind_of, per_token_bytes, split_name,
)
from shapes import SHAPES


def cross_check(model: Model) -> None:
    """libggml reads the same offsets and sizes (little-endian files, where llama_cpp is installed)."""
    if ggml_ref.installed():
        for h in model.shards:
            if h.byteorder == "<":
                ggml_ref.assert_matches_ggml(h)


def assert_tiles_data_sections(model: Model, df: pd.DataFrame) -> None:
    """Whole tensors, sorted per file, start at the data section, leave only padding < alignment between
    them, and end at the end of the file."""
    for s in model.shards:
        g = df[df["file"] == s.path.name].sort_values("offset")
        start = g["offset"].to_numpy(np.int64)
        end = start + g["size"].to_numpy(np.int64)
        if not len(g):
            continue
        assert start[0] == s.data_offset
        pad = start[1:] - end[:-1]
        assert (pad >= 0).all() and (pad < s.alignment).all()
        assert end[-1] == s.file_size


def assert_slices_tile(model: Model, df: pd.DataFrame) -> None:
    """Per base tensor: slices 0..n-1, equal sizes, contiguous, covering exactly the tensor's bytes."""
    tens = {t.name: t for t in model.tensors}
    sl = df[df["expert_id"].notna()]
    for base, g in sl.groupby("base_name", sort=False):
        t = tens[base]
        g = g.sort_values("expert_id")
        assert g["expert_id"].tolist() == list(range(len(g)))
        assert len(g) == t.ne[-1]
        off = g["offset"].to_numpy(np.int64)
        size = g["size"].to_numpy(np.int64)
        assert (size == size[0]).all()
        assert off[0] == t.offset and (off[1:] == off[:-1] + size[:-1]).all()
        assert off[-1] + size[-1] == t.offset + t.nbytes
        assert (g["file"] == t.file.name).all()


def variants(tmp_path: Path) -> Path:
    """Every per-expert layout in one file: 3-D weights of odd types, fused gate_up, gpt-oss biases,
    NVFP4 weights with *_exps.scale, plus router, exp_probs_b and a shared expert that stay whole."""
    E = 8
    t = [TensorSpec.make("token_embd.weight", (64, 10), "F32"),
         TensorSpec.make("blk.0.ffn_gate_inp.weight", (64, E), "F32"),
         TensorSpec.make("blk.0.ffn_gate_inp.bias", (E,), "F32"),
         TensorSpec.make("blk.0.exp_probs_b.bias", (E,), "F32"),
         TensorSpec.make("blk.0.ffn_gate_up_exps.weight", (64, 2 * 32, E), "Q8_0"),
         TensorSpec.make("blk.0.ffn_gate_exps.weight", (64, 32, E), "MXFP4"),
         TensorSpec.make("blk.0.ffn_gate_exps.bias", (32, E), "F32"),
         TensorSpec.make("blk.0.ffn_down_exps.weight", (128, 64, E), "NVFP4"),
         TensorSpec.make("blk.0.ffn_down_exps.scale", (E,), "F32"),
         TensorSpec.make("blk.0.ffn_down_exps.bias", (64, E), "F32"),
         TensorSpec.make("blk.0.ffn_up_shexp.weight", (64, 32), "Q8_0"),
         TensorSpec.make("blk.0.ffn_gate_inp_shexp.weight", (64,), "F32"),
         TensorSpec.make("output.weight", (64, 10), "Q8_0")]
    return write_gguf(tmp_path / "variants.gguf", {"general.architecture": "gpt-oss", "gpt-oss.expert_count": E,
                                                    "gpt-oss.expert_used_count": 2}, t, alignment=64)


def test_every_expert_byte_is_attributed(tmp_path: Path) -> None:
    m = open_model(variants(tmp_path))
    df = byte_map(m, split_experts=True)
    assert list(df.columns) == COLUMNS
    assert_slices_tile(m, df)
    split = set(df.loc[df["expert_id"].notna(), "base_name"])
    assert split == {"blk.0.ffn_gate_up_exps.weight", "blk.0.ffn_gate_exps.weight", "blk.0.ffn_gate_exps.bias",
                     "blk.0.ffn_down_exps.weight", "blk.0.ffn_down_exps.scale", "blk.0.ffn_down_exps.bias"}
    row = df.set_index("name")
    r = row.loc["blk.0.ffn_gate_exps.weight[5]"]
    assert (r["ne0"], r["ne1"], r["ne2"], r["ne3"], r["size"]) == (64, 32, 1, 1, 64 // 32 * 17 * 32)
    assert r["component"] == "ffn_gate_exps" and r["layer"] == 0 and r["expert_id"] == 5 and r["ggml_type"] == "MXFP4"
    r = row.loc["blk.0.ffn_gate_up_exps.weight[7]"]
    assert (r["ne1"], r["size"], r["component"]) == (64, 2 * 34 * 64, "ffn_gate_up_exps")
    r = row.loc["blk.0.ffn_gate_exps.bias[3]"]
    assert (r["ne0"], r["ne1"], r["size"], r["component"]) == (32, 1, 128, "ffn_gate_exps.bias")
    r = row.loc["blk.0.ffn_down_exps.scale[2]"]
    assert (r["ne0"], r["size"], r["component"]) == (1, 4, "ffn_down_exps.scale")
    assert row.loc["blk.0.ffn_down_exps.weight[0]", "size"] == 128 // 64 * 36 * 64
    for whole in ("blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_inp.bias", "blk.0.exp_probs_b.bias",
                  "blk.0.ffn_up_shexp.weight", "blk.0.ffn_gate_inp_shexp.weight", "token_embd.weight"):
        assert pd.isna(row.loc[whole, "expert_id"]) and row.loc[whole, "base_name"] == whole
    assert pd.isna(row.loc["output.weight", "layer"])
    kinds = {c: kind_of(c) for c in df["component"].unique()}
    assert kinds["ffn_gate_inp"] == kinds["exp_probs_b.bias"] == "router"
    assert kinds["ffn_up_shexp"] == kinds["ffn_gate_inp_shexp"] == "shared_expert"
    assert kinds["ffn_down_exps.scale"] == "routed_expert"
    # per (layer, expert): the sum of all its slices, identical for every expert
    eb = expert_bytes(m)
    one = 2 * 34 * 64 + 2 * 17 * 32 + 32 * 4 + 2 * 36 * 64 + 4 + 64 * 4
    assert eb["bytes"].tolist() == [one] * 8
    assert_tiles_data_sections(m, byte_map(m, split_experts=False))
    cross_check(m)


def test_unsplit_map_and_expert_slices(tmp_path: Path, small_moe) -> None:
    m = open_model(small_moe(n_layer=3, n_expert=6, alignment=128))
    whole = byte_map(m)
    assert len(whole) == len(m.tensors) and whole["expert_id"].isna().all()
    assert whole["name"].tolist() == [t.name for t in m.tensors]
    assert whole["layer"].dtype == "Int64" and whole["offset"].dtype == np.int64
    assert_tiles_data_sections(m, whole)
    sl = expert_slices(m)
    assert len(sl) == 3 * 3 * 6 and sl["expert_id"].notna().all()
    assert_slices_tile(m, sl)
    assert sl["name"].iloc[0] == "blk.0.ffn_gate_exps.weight[0]"
    cross_check(m)


def test_per_token_bytes_by_hand(tmp_path: Path, small_moe) -> None:
    m = open_model(small_moe(n_layer=2, n_expert=4))
    pt = per_token_bytes(m)
    one_expert = 2 * (64 // 32 * 34 * 32) + 32 // 32 * 34 * 64  # gate + up + down, Q8_0
    dense_layer = 64 * 4 + 64 * 64 * 2 + 64 * 4 * 4  # attn_norm, attn_q (F16), router
    dense = 64 * 4 + 2 * dense_layer + 64 * 4 + 64 * 50 * 2  # one embedding row, output_norm, output
    assert pt["expert_bytes_per_token"] == 2 * 2 * one_expert
    assert pt["nonexpert_bytes_per_token"] == dense
    assert pt["bytes_per_token"] == dense + 4 * one_expert
    assert pt["all_expert_bytes"] == 2 * 4 * one_expert
    assert pt["model_bytes"] == sum(t.nbytes for t in m.tensors)


def test_split_names() -> None:
    assert split_name("blk.12.ffn_up_exps.weight") == (12, "ffn_up_exps")
    assert split_name("blk.0.ffn_gate_exps.bias") == (0, "ffn_gate_exps.bias")
    assert split_name("output.weight") == (None, "output")
    assert kind_of("attn_sinks") == "attention" and kind_of("ssm_conv1d") == "attention"


def test_shards_map_per_file(tmp_path: Path) -> None:
    t = [TensorSpec.make(f"blk.{i}.ffn_down_exps.weight", (256, 8, 4), "Q2_K") for i in range(5)]
    paths = write_split(tmp_path, "S", {"general.architecture": "deepseek2"}, t, 2)
    m = open_model(paths[1])
    df = byte_map(m, split_experts=True)
    assert set(df["file"]) == {p.name for p in paths}
    assert_slices_tile(m, df)
    assert_tiles_data_sections(m, byte_map(m))
    assert df.loc[df["base_name"] == "blk.3.ffn_down_exps.weight", "offset"].min() == m.shards[1].data_offset
    cross_check(m)


# --- realistic shapes -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shape_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:
    d = tmp_path_factory.mktemp("shapes")
    return {k: open_model(SHAPES[k]().write(d)) for k in ("gpt-oss-20b", "qwen3-next-80b-a3b", "deepseek-v3")}


def test_gpt_oss_mxfp4_slices(shape_models: dict[str, Model]) -> None:
    m = shape_models["gpt-oss-20b"]
    df = byte_map(m, split_experts=True)
    assert_slices_tile(m, df)
    assert_tiles_data_sections(m, byte_map(m))
    g = df[df["base_name"] == "blk.0.ffn_gate_exps.weight"]
    assert len(g) == 32 and (g["size"] == 2880 // 32 * 17 * 2880).all() and (g["ne2"] == 1).all()
    eb = expert_bytes(m)  # gate + up + down weights (MXFP4) + their three F32 bias rows
    assert (eb["bytes"] == 3 * (2880 // 32 * 17 * 2880) + 3 * 2880 * 4).all() and len(eb) == 24 * 32


def test_qwen3_next_slices(shape_models: dict[str, Model]) -> None:
    m = shape_models["qwen3-next-80b-a3b"]
    sl = expert_slices(m)
    assert len(sl) == 48 * 512 * 3 == 73728
    assert_slices_tile(m, sl)
    eb = expert_bytes(m).set_index("layer")["bytes"]
    gate_up = 2 * (2048 // 256 * 144 * 512)
    assert eb.loc[0].iloc[0] == gate_up + 512 // 256 * 210 * 2048  # layer 0 has Q6_K down
    assert eb.loc[6].iloc[0] == gate_up + 512 // 256 * 144 * 2048
    shexp = byte_map(m)
    assert (shexp.loc[shexp["component"].str.endswith("_shexp"), "expert_id"].isna()).all()


def test_deepseek_shards(shape_models: dict[str, Model]) -> None:
    m = shape_models["deepseek-v3"]
    df = byte_map(m, split_experts=True)
    assert df["file"].nunique() == 5
    assert_slices_tile(m, df)
    assert_tiles_data_sections(m, byte_map(m))
    assert set(df.loc[df["expert_id"].notna(), "layer"].unique()) == set(range(3, 61))


# --- hypothesis ---------------------------------------------------------------------------------------

@st.composite
def moe_lists(draw: st.DrawFn) -> list[TensorSpec]:
    out = []
    for i in range(draw(st.integers(1, 8))):
        t = TYPES[draw(st.sampled_from(sorted(TYPES)))]
        ne0 = t.block_size * draw(st.integers(1, 3))
        kind = draw(st.sampled_from(["w3", "bias", "scale", "dense"]))
        n_exp = draw(st.integers(1, 9))
        if kind == "w3":
            out.append(TensorSpec.make(f"blk.{i}.ffn_up_exps.weight", (ne0, draw(st.integers(1, 4)), n_exp), t))
        elif kind == "bias":
            out.append(TensorSpec.make(f"blk.{i}.ffn_up_exps.bias", (ne0, n_exp), t))
        elif kind == "scale":
            out.append(TensorSpec.make(f"blk.{i}.ffn_down_exps.scale", (n_exp,), "F32"))
        else:
            out.append(TensorSpec.make(f"blk.{i}.attn_q.weight", (ne0, 2), t))
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=moe_lists(), alignment=st.sampled_from([1, 16, 32, 64]), byteorder=st.sampled_from(["<", ">"]),
       version=st.sampled_from([2, 3]))
def test_random_byte_maps_tile(tmp_path: Path, tensors: list[TensorSpec], alignment: int, byteorder: str,
                               version: int) -> None:
    p = write_gguf(tmp_path / "h.gguf", {"general.architecture": "x"}, tensors, alignment=alignment,
                   byteorder=byteorder, version=version)
    m = open_model(p)
    assert_tiles_data_sections(m, byte_map(m))
    df = byte_map(m, split_experts=True)
    assert_slices_tile(m, df)
    assert df["size"].sum() == sum(t.nbytes for t in tensors)
    n_split = sum(t.ne[-1] for t in tensors if "_exps" in t.name)
    assert int(df["expert_id"].notna().sum()) == n_split
    cross_check(m)


def test_fingerprint_separates_structure_from_quantization(tmp_path: Path) -> None:
    from conftest import small_moe_kv, small_moe_tensors

    from gguf_experts.gguf.fingerprint import fingerprint

    a = open_model(write_gguf(tmp_path / "a.gguf", small_moe_kv(), small_moe_tensors(exp_type="Q8_0")))
    b = open_model(write_gguf(tmp_path / "b.gguf", small_moe_kv(), small_moe_tensors(exp_type="F16")))
    c = open_model(write_gguf(tmp_path / "c.gguf", small_moe_kv(), small_moe_tensors(n_ff=64)))
    fa, fb, fc = fingerprint(a), fingerprint(b), fingerprint(c)
    assert (fa.architecture, fa.n_layer, fa.n_expert, fa.n_expert_used) == ("qwen3moe", 2, 4, 2)
    assert fa == fingerprint(open_model(a.path))
    assert fa.tensor_digest == fb.tensor_digest and fa.type_digest != fb.type_digest
    assert fa.tensor_digest != fc.tensor_digest


def test_fingerprint_ignores_tensor_order(tmp_path: Path) -> None:
    """llama.cpp's quantizer reorders tensors: a trace of the F32 model must still match its quantization."""
    from conftest import small_moe_kv, small_moe_tensors

    from gguf_experts.gguf.fingerprint import fingerprint

    ts = small_moe_tensors()
    a = open_model(write_gguf(tmp_path / "a.gguf", small_moe_kv(), ts))
    b = open_model(write_gguf(tmp_path / "b.gguf", small_moe_kv(), sorted(ts, key=lambda t: t.name)[::-1]))
    assert [t.name for t in a.tensors] != [t.name for t in b.tensors]
    assert fingerprint(a) == fingerprint(b)
