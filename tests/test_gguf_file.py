"""Header reader: versions, byte orders, alignments, every value type, lazy big arrays, every type id,
shards, realistic shapes, libggml cross-checks, and random files / random corruption (hypothesis)."""
from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import ggml_ref
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_experts.errors import GGUFExpertsError, GGUFFormatError, ShardError
from gguf_experts.gguf.types import TYPES
from gguf_experts.gguf.reader import SMALL_ARRAY, LazyArray, ValueType, open_model, read_header
from gguf_experts.gguf.writer import TensorSpec, write_gguf, write_split
from gguf_experts.gguf.layout import byte_map
from shapes import SHAPES

HAVE_GGML = ggml_ref.installed()
V = ValueType


def cross_check(path: Path) -> None:
    """Every generated little-endian file is read by libggml too, and must agree with us."""
    for h in open_model(path).shards:
        if HAVE_GGML and h.byteorder == "<":
            ggml_ref.assert_matches_ggml(h)


ALL_SCALARS = {
    "t.u8": (V.UINT8, 250), "t.i8": (V.INT8, -7), "t.u16": (V.UINT16, 65535), "t.i16": (V.INT16, -32768),
    "t.u32": (V.UINT32, 2**32 - 1), "t.i32": (V.INT32, -(2**31)), "t.f32": (V.FLOAT32, 1.5),
    "t.bool": (V.BOOL, True), "t.str": (V.STRING, "héllo ✓"), "t.u64": (V.UINT64, 2**64 - 1),
    "t.i64": (V.INT64, -(2**63)), "t.f64": (V.FLOAT64, 0.1),
}


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("alignment", [1, 32, 64, 128])
def test_versions_byteorders_alignments(tmp_path: Path, version: int, byteorder: str, alignment: int) -> None:
    kv = {"general.architecture": "qwen3moe", **ALL_SCALARS,
          "t.arr_i16": (V.ARRAY, (V.INT16, [-1, 2, -3])), "t.arr_str": ["a", "bc", ""],
          "t.arr_f64": np.array([0.25, -1e300]), "t.arr_bool": [True, False, True]}
    tensors = [TensorSpec.make("a", (3,), "F32"), TensorSpec.make("b", (32, 2), "Q8_0"),
               TensorSpec.make("c", (256, 3), "Q4_K")]
    p = write_gguf(tmp_path / "m.gguf", kv, tensors, alignment=alignment, version=version, byteorder=byteorder)
    h = read_header(p)
    assert (h.version, h.byteorder, h.alignment) == (version, byteorder, alignment)
    for k, (vt, val) in ALL_SCALARS.items():
        assert h.kv_types[k] == vt
        assert h.kv[k] == val or (vt == V.FLOAT64 and h.kv[k] == pytest.approx(val))
    assert h.kv["t.arr_i16"] == [-1, 2, -3] and h.kv["t.arr_str"] == ["a", "bc", ""]
    assert h.kv["t.arr_f64"] == [0.25, -1e300] and h.kv["t.arr_bool"] == [True, False, True]
    assert h.data_offset % alignment == 0 and 0 <= h.data_offset - h.header_size < alignment
    expect_rel, off = [], 0
    for t in tensors:
        off = -(-off // alignment) * alignment
        expect_rel.append(off)
        off += t.nbytes
    assert [t.rel_offset for t in h.tensors] == expect_rel
    assert [t.offset for t in h.tensors] == [h.data_offset + r for r in expect_rel]
    assert [t.nbytes for t in h.tensors] == [12, 2 * 34, 3 * 144]
    assert h.file_size == os.path.getsize(p) == h.data_offset + off
    if byteorder == "<":
        cross_check(p)


def test_arrays_of_arrays_small_and_lazy(tmp_path: Path) -> None:
    nested = [[1, 2, 3], [4], []]
    big_nested = [[i, i + 1] for i in range(SMALL_ARRAY + 5)]
    arrays = [(V.UINT32, r) if r else (V.UINT32, []) for r in nested]
    kv = {"general.architecture": "x", "n": (V.ARRAY, (V.ARRAY, arrays)),
          "strs": [["a", "b"], ["c"]], "big": big_nested}
    p = write_gguf(tmp_path / "n.gguf", kv, [TensorSpec.make("t", (4,), "F32")])
    h = read_header(p)
    assert h.kv["n"] == nested and h.kv["strs"] == [["a", "b"], ["c"]]
    assert isinstance(h.kv["big"], LazyArray) and len(h.kv["big"]) == SMALL_ARRAY + 5
    assert h.kv["big"].load() == big_nested
    assert h.tensors[0].name == "t"  # the walk over the lazy nested array ended at the right byte


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_big_arrays_are_lazy_and_load_right(tmp_path: Path, byteorder: str) -> None:
    rng = np.random.default_rng(0)
    toks = [f"tok{i}✓" * (i % 4) for i in range(5000)]
    scores = rng.standard_normal(5000).astype(np.float32)
    ids = rng.integers(-2**62, 2**62, 3000, dtype=np.int64)
    flags = rng.random(1000) < 0.5
    kv = {"general.architecture": "x", "tokenizer.ggml.tokens": toks, "tokenizer.ggml.scores": scores,
          "ids": ids, "flags": flags, "after": "still read"}
    p = write_gguf(tmp_path / "big.gguf", kv, [TensorSpec.make("t", (4,), "F32")], byteorder=byteorder)
    h = read_header(p)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "ids", "flags"):
        assert isinstance(h.kv[key], LazyArray), key
    assert h.kv["tokenizer.ggml.tokens"].load() == toks
    np.testing.assert_array_equal(h.kv["tokenizer.ggml.scores"].load(), scores)
    np.testing.assert_array_equal(h.kv["ids"].load(), ids)
    np.testing.assert_array_equal(h.kv["flags"].load(), flags)
    assert h.kv["after"] == "still read" and len(h.kv["ids"]) == 3000
    assert h.kv["ids"].nbytes == 3000 * 8 and "INT64" in repr(h.kv["ids"])


def test_every_live_type_id_in_one_file(tmp_path: Path) -> None:
    tensors = [TensorSpec.make(f"t{tid}.{t.name}", (2 * t.block_size, 3), tid) for tid, t in TYPES.items()]
    p = write_gguf(tmp_path / "types.gguf", {"general.architecture": "x"}, tensors)
    h = read_header(p)
    assert [(x.type.id, x.ne, x.nbytes) for x in h.tensors] == [(tid, (2 * t.block_size, 3), 6 * t.type_size)
                                                                for tid, t in TYPES.items()]
    cross_check(p)


def test_expert_tensor_variants_parse(tmp_path: Path) -> None:
    tensors = [TensorSpec.make("blk.0.ffn_gate_up_exps.weight", (64, 64, 8), "Q8_0"),
               TensorSpec.make("blk.0.ffn_gate_exps.bias", (2880, 8), "F32"),
               TensorSpec.make("blk.0.ffn_down_exps.weight", (128, 64, 8), "NVFP4"),
               TensorSpec.make("blk.0.ffn_down_exps.scale", (8,), "F32")]
    p = write_gguf(tmp_path / "v.gguf", {"general.architecture": "x"}, tensors)
    h = read_header(p)
    assert [t.nbytes for t in h.tensors] == [2 * 34 * 64 * 8, 2880 * 4 * 8, 2 * 36 * 64 * 8, 32]
    cross_check(p)


def _split_model(tmp_path: Path, n: int = 3) -> list[Path]:
    tensors = [TensorSpec.make(f"blk.{i}.ffn_up_exps.weight", (64, 32, 4), "Q8_0") for i in range(7)]
    return write_split(tmp_path, "M", {"general.architecture": "qwen3moe", "qwen3moe.expert_count": 4,
                                          "qwen3moe.expert_used_count": 2},
                       tensors, n, alignment=64)


def test_any_shard_finds_the_rest(tmp_path: Path) -> None:
    paths = _split_model(tmp_path)
    assert [p.name for p in paths] == [f"M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    models = [open_model(p) for p in paths]
    for m in models:
        assert [s.path for s in m.shards] == paths
        assert [t.name for t in m.tensors] == [f"blk.{i}.ffn_up_exps.weight" for i in range(7)]
        assert [t.shard for t in m.tensors] == [0, 0, 0, 1, 1, 1, 2]
        assert m.expert_count == 4 and m.alignment == 64
    m = models[1]
    for t in m.tensors:  # offsets are relative to each shard's own data section
        assert t.file == paths[t.shard] and t.offset == m.shards[t.shard].data_offset + t.rel_offset
    assert m.tensors[3].rel_offset == 0 and m.total_size == sum(os.path.getsize(p) for p in paths)
    cross_check(paths[0])


def test_missing_shard_is_named(tmp_path: Path) -> None:
    paths = _split_model(tmp_path)
    paths[1].unlink()
    for p in (paths[0], paths[2]):
        with pytest.raises(ShardError, match="M-00002-of-00003.gguf.*missing"):
            open_model(p)


def test_inconsistent_shards(tmp_path: Path) -> None:
    paths = _split_model(tmp_path)
    other = _split_model(tmp_path / "o" if (tmp_path / "o").mkdir() is None else tmp_path, 3)
    os.replace(paths[1], paths[2])  # shard 3's name now holds shard 2: split.no says 1, name says 2
    write_gguf(paths[1], {"general.architecture": "x", "split.no": (V.UINT16, 1)}, [])
    with pytest.raises(ShardError, match="split.no = 1, expected 2"):
        open_model(paths[0])
    assert other
    single = write_gguf(tmp_path / "lonely.gguf", {"split.count": (V.UINT16, 3)}, [])
    with pytest.raises(ShardError, match="split.count = 3"):
        open_model(single)


def test_tensor_count_mismatch(tmp_path: Path) -> None:
    paths = _split_model(tmp_path, 2)
    write_gguf(paths[1], {"general.architecture": "x", "split.no": (V.UINT16, 1)},
               [TensorSpec.make("only", (4,), "F32")])
    with pytest.raises(ShardError, match="split.tensors.count = 7 but the shards hold 5"):
        open_model(paths[0])


# --- realistic shapes: hand-computed expert sizes -------------------------------------------------------

EXPECTED = {  # (n_layer, n_expert, top-k, moe layers, tensors, {tensor name: (type, bytes of one expert)})
    "qwen3-30b-a3b": (48, 128, 8, 48, 3 + 48 * 12, {
        "blk.0.ffn_gate_exps.weight": ("Q4_K", 2048 // 256 * 144 * 768),
        "blk.0.ffn_down_exps.weight": ("Q6_K", 768 // 256 * 210 * 2048),  # use_more_bits layer
        "blk.7.ffn_down_exps.weight": ("Q4_K", 768 // 256 * 144 * 2048)}),
    "qwen3-next-80b-a3b": (48, 512, 10, 48, 3 + 36 * 18 + 12 * 16, {
        "blk.0.ffn_up_exps.weight": ("Q4_K", 2048 // 256 * 144 * 512),
        "blk.47.ffn_down_exps.weight": ("Q6_K", 512 // 256 * 210 * 2048)}),
    "qwen3-next-80b-a3b-fused": (48, 512, 10, 48, 3 + 36 * 17 + 12 * 15, {
        "blk.3.ffn_gate_up_exps.weight": ("Q4_K", 2048 // 256 * 144 * 1024)}),
    "gpt-oss-20b": (24, 32, 4, 24, 3 + 24 * 19, {
        "blk.0.ffn_gate_exps.weight": ("MXFP4", 2880 // 32 * 17 * 2880),
        "blk.5.ffn_down_exps.weight": ("MXFP4", 2880 // 32 * 17 * 2880),
        "blk.0.ffn_gate_exps.bias": ("F32", 2880 * 4)}),
    "deepseek-v3": (61, 256, 8, 58, 3 + 3 * 12 + 58 * 17, {
        "blk.3.ffn_gate_exps.weight": ("IQ2_XXS", 7168 // 256 * 66 * 2048),
        "blk.60.ffn_down_exps.weight": ("Q2_K", 2048 // 256 * 84 * 7168)}),
}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shapes")
    for key in SHAPES:
        SHAPES[key]().write(d)
    return d


@pytest.mark.parametrize("key", list(EXPECTED))
def test_realistic_shapes(shapes_dir: Path, key: str) -> None:
    shape = SHAPES[key]()
    n_layer, n_expert, k, n_moe, n_tensors, slices = EXPECTED[key]
    first = shapes_dir / (f"{shape.stem}-00001-of-{shape.n_shards:05d}.gguf" if shape.n_shards > 1
                          else f"{shape.stem}.gguf")
    m = open_model(first)
    assert (m.block_count, m.expert_count, m.expert_used_count) == (n_layer, n_expert, k)
    assert len(m.tensors) == n_tensors and len(m.shards) == shape.n_shards
    assert len({t.name.split(".")[1] for t in m.tensors if "_exps" in t.name}) == n_moe
    assert m.expert_ff_length == shape.facts["expert_ff"]
    tok = m.kv["tokenizer.ggml.tokens"]
    assert isinstance(tok, LazyArray) and len(tok) == shape.facts["n_tokens"]
    if "n_merges" in shape.facts:
        assert len(m.kv["tokenizer.ggml.merges"]) == shape.facts["n_merges"]
    by_name = {t.name: t for t in m.tensors}
    for name, (tname, one) in slices.items():
        t = by_name[name]
        assert t.type.name == tname and t.nbytes == one * n_expert, name
    if key == "deepseek-v3":
        assert m.leading_dense_block_count == 3 and m.expert_shared_count == 1
        assert "blk.2.ffn_gate_exps.weight" not in by_name and "blk.3.exp_probs_b.bias" in by_name
        shard = open_model(shapes_dir / f"{shape.stem}-00004-of-00005.gguf")  # any shard opens the model
        assert [t.name for t in shard.tensors] == [t.name for t in m.tensors]
    end = max(t.offset + t.nbytes for t in m.tensors if t.shard == len(m.shards) - 1)
    assert end == m.shards[-1].file_size  # the sparse file is exactly as long as its data
    cross_check(first)


# --- hypothesis: random tensor lists round-trip; random corruption fails cleanly ------------------------

LIVE = sorted(TYPES)


@st.composite
def tensor_lists(draw: st.DrawFn) -> list[TensorSpec]:
    n = draw(st.integers(0, 12))
    out = []
    for i in range(n):
        t = TYPES[draw(st.sampled_from(LIVE))]
        ndim = draw(st.integers(1, 4))
        ne = [t.block_size * draw(st.integers(1, 3))] + [draw(st.integers(1, 5)) for _ in range(ndim - 1)]
        name = draw(st.sampled_from(["blk.{l}.ffn_up_exps.weight", "blk.{l}.attn_q.weight", "t{i}", "é{i}"]))
        out.append(TensorSpec.make(name.format(l=i, i=i), ne, t))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=tensor_lists(), alignment=st.sampled_from([1, 8, 32, 64, 256]),
       byteorder=st.sampled_from(["<", ">"]), version=st.sampled_from([2, 3]))
def test_random_tensor_lists_round_trip(tmp_path: Path, tensors: list[TensorSpec], alignment: int,
                                        byteorder: str, version: int) -> None:
    p = write_gguf(tmp_path / "r.gguf", {"general.architecture": "x"}, tensors, alignment=alignment,
                   version=version, byteorder=byteorder)
    h = read_header(p)
    assert [(t.name, t.ne, t.type, t.nbytes) for t in h.tensors] == [(t.name, t.ne, t.type, t.nbytes)
                                                                     for t in tensors]
    assert all(t.rel_offset % alignment == 0 for t in h.tensors)
    if byteorder == "<":
        cross_check(p)


def _valid_small(tmp_path: Path) -> bytes:
    kv = {"general.architecture": "qwen3moe", "qwen3moe.expert_count": 4, "qwen3moe.expert_used_count": 2,
          "s": "abc", "a": [1, 2, 3],
          "big": list(range(100)), "nest": [[1], [2, 3]]}
    tensors = [TensorSpec.make("blk.0.ffn_up_exps.weight", (64, 8, 4), "Q8_0"), TensorSpec.make("n", (7,), "F32")]
    return write_gguf(tmp_path / "ok.gguf", kv, tensors).read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_mutations_fail_cleanly(tmp_path: Path, data: st.DataObject) -> None:
    raw = bytearray(_valid_small(tmp_path))
    head_len = 400  # the header is ~370 bytes; data after it is never parsed
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, head_len - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    p = tmp_path / "mut.gguf"
    p.write_bytes(raw)
    t0 = time.perf_counter()
    try:
        m = open_model(p)
    except GGUFExpertsError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert all(t.nbytes >= 0 and t.offset >= m.shards[0].data_offset for t in m.tensors)
        try:  # a corrupt shape may parse; the byte map then refuses it cleanly
            assert len(byte_map(m, split_experts=True)) >= len(m.tensors)
        except GGUFExpertsError as e:
            assert str(e) and "\n" not in str(e)
    assert time.perf_counter() - t0 < 20.0  # a hang guard, not a speed test


def test_deeply_nested_arrays_fail_cleanly(tmp_path: Path) -> None:
    body = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9)
    body += struct.pack("<IQ", 9, 1) * 100_000 + struct.pack("<IQ", 4, 0)
    p = tmp_path / "deep.gguf"
    p.write_bytes(body)
    with pytest.raises(GGUFFormatError, match="nest"):
        read_header(p)


@pytest.mark.parametrize("name", ["m-00001-of-00000.gguf", "m-00003-of-00002.gguf", "m-00000-of-00002.gguf"])
def test_impossible_shard_names_are_plain_files(tmp_path: Path, name: str) -> None:
    p = write_gguf(tmp_path / name, {"general.architecture": "x"}, [TensorSpec.make("t", (4,), "F32")])
    m = open_model(p)
    assert [s.path for s in m.shards] == [p] and len(m.tensors) == 1
