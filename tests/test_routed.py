"""vLLM/SGLang routed experts (issue 22 part 1): .npy/.npz [tokens, layers, k] and the SGLang response JSON
(base64), written by our own writer from a real llama.cpp capture and read back; layer N = blk.N on a model
with leading dense blocks (DeepSeek-V3's header); bad arrays refused with the shape found and expected."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_experts.demo import tinymodel
from gguf_experts.errors import InputError
from gguf_experts.formats.counts import ExpertCounts
from gguf_experts.formats.load import detect_format, load_trace
from gguf_experts.formats.routed import RoutedArrays, from_trace, to_trace
from gguf_experts.gguf.fingerprint import fingerprint
from gguf_experts.gguf.reader import open_model
from gguf_experts.trace.reader import read_trace

import shapes

PROMPTS = "def add(a, b):\n    return a + b\nOnce upon a time, a small robot\nQ: 12 * 7? A: 84\n"
L, M, K = 4, 16, 4  # the tiny qwen3moe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real capture (llama.cpp through llama-cpp-python): three prompts, prefill + decode, gate weights."""
    from gguf_experts.cli import main

    d = tmp_path_factory.mktemp("routed")
    model = tinymodel.make_tiny_model(d / "tiny.gguf", seed=5)
    (d / "prompts.txt").write_text(PROMPTS)
    assert main(["capture", str(model), "--prompts", str(d / "prompts.txt"), "-n", "7", "--weights",
                 "--ignore-eos", "-t", "2", "-o", str(d / "t.bin"), "--no-progress"]) == 0
    return {"model": model, "trace": d / "t.bin", "dir": d}


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-V3's real header (61 blocks, 3 leading dense, 256 experts, top-8), data a sparse hole."""
    return shapes.deepseek_v3(n_shards=1).write(tmp_path_factory.mktemp("ds3"))


def rows(td) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    """The trace's rows as a sorted table (row order differs between a capture and a replayed array)."""
    d = {"seq": td.seq, "phase": td.phase, "pos": td.pos, "token": td.token, "layer": td.layer}
    for j in range(td.k):
        d[f"e{j}"] = td.experts[:, j]
        if td.weights is not None:
            d[f"w{j}"] = td.weights[:, j]
    return pd.DataFrame(d).sort_values(["seq", "pos", "layer"], ignore_index=True)


def stats_csv(run_cli, *argv) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    r = run_cli("stats", *argv, "-f", "csv")
    assert r.rc == 0, r.err
    return pd.read_csv(io.StringIO(r.out)).sort_values(["layer", "expert"], ignore_index=True)


# --- round trips through our writer ---------------------------------------------------------------------

def test_npz_round_trip_is_lossless(run_cli, tiny, tmp_path):
    src = read_trace(tiny["trace"])
    out, back = tmp_path / "r.npz", tmp_path / "back.bin"
    r = run_cli("convert", tiny["trace"], out)
    assert r.rc == 0, r.err
    assert detect_format(out) == "routed-npy"
    z = np.load(out)
    T = len(np.unique(np.stack([src.seq, src.pos]), axis=1)[0])
    assert z["routed_experts"].shape == (T, L, K) and z["routed_experts"].dtype == np.int32
    assert z["lengths"].sum() == T and len(z["lengths"]) == len(np.unique(src.seq))
    assert run_cli("convert", out, back, "--model", tiny["model"]).rc == 0
    got = read_trace(back)
    assert got.header.fingerprint == src.header.fingerprint
    pd.testing.assert_frame_equal(rows(got), rows(src))
    cols = ["layer", "expert", "activations", "prefill", "decode"]
    pd.testing.assert_frame_equal(stats_csv(run_cli, tiny["trace"])[cols],
                                  stats_csv(run_cli, out, "--model", tiny["model"])[cols])


def test_npy_one_request(run_cli, tiny, tmp_path):
    """A bare .npy (one request, as vLLM's RequestOutput gives it): ids only, every token decode-ordered."""
    src = read_trace(tiny["trace"])
    one = src.select(src.seq == src.seq[0])
    p = tmp_path / "one.npy"
    with open(p, "wb") as fh:
        from gguf_experts.formats.routed import write_routed
        n = write_routed(one, fh, npy=True)
    a = np.load(p)
    assert a.shape == (n, L, K) and detect_format(p) == "routed-npy"
    got = load_trace(p, tiny["model"])
    want = rows(one)[["pos", "layer", *[f"e{j}" for j in range(K)]]]
    have = rows(got)[["pos", "layer", *[f"e{j}" for j in range(K)]]]
    pd.testing.assert_frame_equal(have, want)
    assert got.header.meta["phase_known"] is False and (got.phase == 1).all()
    r = run_cli("convert", tiny["trace"], tmp_path / "all.npy")  # several sequences do not fit one .npy
    assert r.rc == 2 and ".npz" in r.err and r.err.count("\n") == 1


def _responses(npz: Path) -> list[dict]:
    """SGLang /generate responses built from the arrays: flat base64 int32 in meta_info.routed_experts."""
    z = np.load(npz)
    e, lengths, prompt = z["routed_experts"], z["lengths"], z["prompt_lengths"]
    out, s = [], 0
    for n, p in zip(lengths, prompt):
        flat = np.ascontiguousarray(e[s:s + n], "<i4").tobytes()
        out.append({"text": "...", "meta_info": {"id": f"r{s}", "prompt_tokens": int(p),
                                                 "completion_tokens": int(n - p),
                                                 "routed_experts": base64.b64encode(flat).decode()}})
        s += n
    return out


@pytest.mark.parametrize("form", ["list", "jsonl", "shaped"])
def test_sglang_json(run_cli, tiny, tmp_path, form):
    npz = tmp_path / "r.npz"
    assert run_cli("convert", tiny["trace"], npz).rc == 0
    docs = _responses(npz)
    p = tmp_path / "resp.json"
    if form == "list":
        p.write_text(json.dumps(docs))
    elif form == "jsonl":
        p.write_text("".join(json.dumps(d) + "\n" for d in docs))
    else:  # {"data", "shape", "dtype"}: a uint8 wire type with its shape, no model needed to reshape
        z = np.load(npz)
        e = z["routed_experts"][:z["lengths"][0]]
        e = np.where(e < 0, 255, e).astype(np.uint8)  # -1 cannot ride in uint8: this file keeps ids only
        docs = [{"meta_info": {"routed_experts": {"data": base64.b64encode(e.tobytes()).decode(),
                                                  "shape": list(e.shape), "dtype": "uint8"}}}]
        p.write_text(json.dumps(docs[0]))
        r = run_cli("stats", p, "--model", tiny["model"])
        assert r.rc == 2 and "expert id 255" in r.err and str(tuple(e.shape)) in r.err
        return
    assert detect_format(p) == "routed-json"
    src, got = read_trace(tiny["trace"]), load_trace(p, tiny["model"])
    cols = ["seq", "phase", "pos", "layer", *[f"e{j}" for j in range(K)]]
    pd.testing.assert_frame_equal(rows(got)[cols], rows(src)[cols])
    cols = ["layer", "expert", "activations", "prefill", "decode"]
    pd.testing.assert_frame_equal(stats_csv(run_cli, tiny["trace"])[cols],
                                  stats_csv(run_cli, p, "--model", tiny["model"])[cols])


def test_join_diff_cache_sim_take_routed(run_cli, tiny, tmp_path):
    """Byte heat of a vLLM workload on the GGUF's byte map; the same workload compared with llama.cpp's."""
    npz = tmp_path / "r.npz"
    assert run_cli("convert", tiny["trace"], npz).rc == 0
    a = run_cli("join-trace", tiny["trace"], "-m", tiny["model"], "-f", "csv")
    b = run_cli("join-trace", npz, "-m", tiny["model"], "-f", "csv")
    assert a.rc == 0 and b.rc == 0, b.err
    assert a.out == b.out
    d = run_cli("diff", tiny["trace"], npz, "-m", tiny["model"], "-f", "json")
    assert d.rc == 0, d.err
    w = run_cli("cache-sim", tiny["trace"], "--capacity", "4,8", "-f", "csv")
    g = run_cli("cache-sim", npz, "--model", tiny["model"], "--capacity", "4,8", "-f", "csv")
    assert w.rc == 0 and g.rc == 0, g.err


# --- layer numbering on a model with leading dense blocks ------------------------------------------------

def test_layer_axis_is_blk_n_with_leading_dense_blocks(deepseek, tmp_path):
    """vLLM and SGLang size the axis by num_hidden_layers and index it by the decoder layer (dense layers stay
    0): index N is blk.N; an axis of MoE layers only maps onto blocks 3..60 in order."""
    model = open_model(deepseek)
    fp = fingerprint(model)
    assert model.leading_dense_block_count == 3
    rng = np.random.default_rng(1)
    T, Lm = 5, 58
    moe = np.argsort(rng.random((T, Lm, 256)), axis=2)[:, :, :8].astype(np.int32)
    every = np.zeros((T, 61, 8), np.int32)  # as the engines return it: zeros in the dense layers
    every[:, 3:] = moe
    p_every, p_moe = tmp_path / "every.npy", tmp_path / "moe.npy"
    np.save(p_every, every)
    np.save(p_moe, moe)
    a, b = load_trace(p_every, deepseek), load_trace(p_moe, deepseek)
    assert sorted(set(a.layer.tolist())) == list(range(3, 61))  # blk.3 .. blk.60, no row of a dense block
    assert np.array_equal(a.layer, b.layer) and np.array_equal(a.experts, b.experts)
    first = a.select((a.pos == 2) & (a.layer == 3))
    assert np.array_equal(first.experts[0], moe[2, 0])  # axis index 3 = blk.3 = first MoE layer
    assert a.header.fingerprint == fp
    back = from_trace(a)  # written back: every block, -1 where no routing (the dense blocks)
    assert back.experts.shape == (T, 61, 8)
    assert (back.experts[:, :3] == -1).all() and np.array_equal(back.experts[:, 3:], moe)


def test_mtp_blocks_not_counted(tmp_path):
    """A GGUF with nextn_predict_layers has those blocks at the end; Hugging Face's num_hidden_layers (the
    engines' layer axis) omits them: both sizes read, index N = blk.N either way."""
    import dataclasses

    from gguf_experts.formats.routed import hf_layers, layer_map

    ds = shapes.deepseek_v3(n_shards=1)
    mtp = dataclasses.replace(ds, kv={**ds.kv, "deepseek2.nextn_predict_layers": 1})
    model = open_model(mtp.write(tmp_path))
    assert hf_layers(model) == 60 and model.block_count == 61
    for L in (60, 61):
        m = layer_map(L, model, "x")
        assert len(m) == L and (m[:3] == -1).all() and np.array_equal(m[3:], np.arange(3, L))
    with pytest.raises(InputError, match="expected 60 or 61 .* or 58"):
        layer_map(59, model, "x")


# --- hypothesis: arrays -> trace -> arrays -----------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_arrays_round_trip(tiny, data):
    model = open_model(tiny["model"])
    fp = fingerprint(model)
    lengths = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    T = sum(lengths)
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    e = np.argsort(rng.random((T, L, M)), axis=2)[:, :, :K].astype(np.int32)
    e[rng.random((T, L)) < 0.2] = -1  # rows llama.cpp skipped
    prompt = np.array([data.draw(st.integers(0, n)) for n in lengths], np.int64)
    w = rng.random((T, L, K)).astype(np.float32)
    ra = RoutedArrays(experts=e, lengths=np.array(lengths, np.int64), weights=w, prompt_lengths=prompt)
    td = to_trace(ra, model, fp, "h", "routed-npy")
    assert len(td) == int((e != -1).all(axis=2).sum())
    back = from_trace(td)
    keep = (e != -1).all(axis=2).any(axis=1)  # tokens with no row at all are not in a trace
    assert np.array_equal(back.experts, e[keep])
    assert np.array_equal(back.weights[back.experts != -1], w[keep][e[keep] != -1])  # type: ignore[index]
    seq_t = np.repeat(np.arange(len(lengths)), lengths)[keep]
    within = (np.arange(T) - np.repeat(np.cumsum(lengths) - lengths, lengths))[keep]
    assert np.array_equal(back.phases, (within >= prompt[seq_t]).astype(np.uint8))
    c = ExpertCounts.from_chunks([td], fp)
    assert int(c.activations.sum()) == int((e[keep] >= 0).sum())


# --- bad input -------------------------------------------------------------------------------------------

def _bad(tmp_path: Path, name: str, arr: np.ndarray) -> Path:
    p = tmp_path / name
    np.save(p, arr)
    return p


@pytest.mark.parametrize("arr,msg", [
    (np.zeros((5, 4), np.int32), "shape (5, 4) (rank 2), expected rank 3: [tokens, layers, k]"),
    (np.zeros((5, 4, 4), np.float32), "dtype float32, expected an integer type"),
    (np.full((5, 4, 4), 16, np.int32), "expert id 16 at token 0, layer 0, slot 0 (shape (5, 4, 4))"),
    (np.full((5, 4, 4), -3, np.int32), "expert id -3"),
    (np.zeros((5, 7, 4), np.int32), "the layer axis has 7 layers"),
    (np.zeros((5, 4, 2), np.int32), "shape (5, 4, 2): top-2 per token"),
])
def test_bad_arrays_one_line_exit_2(run_cli, tiny, tmp_path, arr, msg):
    p = _bad(tmp_path, "bad.npy", arr)
    for argv in (["stats", p, "--model", tiny["model"]], ["convert", p, tmp_path / "o.bin", "-m", tiny["model"]]):
        r = run_cli(*argv)
        assert r.rc == 2 and r.err.count("\n") == 1 and msg in r.err and "Traceback" not in r.err, r.err
    assert not (tmp_path / "o.bin").exists()


def test_routed_needs_the_model_and_says_why(run_cli, tmp_path):
    p = _bad(tmp_path, "r.npy", np.zeros((3, 4, 4), np.int32))
    r = run_cli("stats", p)
    assert r.rc == 2 and "--model MODEL.gguf" in r.err and "byte map" in r.err, r.err


def test_bad_npz_and_json(run_cli, tiny, tmp_path):
    p = tmp_path / "l.npz"
    np.savez(p, routed_experts=np.zeros((5, 4, 4), np.int32), lengths=np.array([2, 2]))
    r = run_cli("stats", p, "--model", tiny["model"])
    assert r.rc == 2 and "adding up to the 5 tokens" in r.err, r.err
    j = tmp_path / "r.json"
    j.write_text(json.dumps({"meta_info": {"routed_experts": base64.b64encode(np.zeros(7, "<i4").tobytes()).decode()}}))
    r = run_cli("stats", j, "--model", tiny["model"])
    assert r.rc == 2 and "holds 7 values, not a whole number of tokens of 4 layers x top-4" in r.err, r.err
    j.write_text(json.dumps({"meta_info": {"routed_experts": "@@@"}}))
    r = run_cli("stats", j, "--model", tiny["model"])
    assert r.rc == 2 and "not valid base64" in r.err, r.err


def test_sglang_valid_mask_and_int16(run_cli, tiny, tmp_path):
    """SGLang's {"values", "valid_mask"} payload (a masked (token, layer) is no routing) and the int16 arrays
    RL stacks keep: read as the same rows."""
    z = np.load(_npz_of(run_cli, tiny, tmp_path))
    n = int(z["lengths"][0])
    e = z["routed_experts"][:n]
    valid = (e != -1).all(axis=2)
    vals = np.where(e < 0, 0, e).astype("<i4")  # what a server leaves in unrouted slots
    doc = {"meta_info": {"prompt_tokens": int(z["prompt_lengths"][0]), "routed_experts": {
        "values": base64.b64encode(vals.tobytes()).decode(),
        "valid_mask": base64.b64encode(valid.astype(np.uint8).tobytes()).decode()}}}
    j = tmp_path / "masked.json"
    j.write_text(json.dumps(doc))
    p16 = tmp_path / "r16.npy"
    np.save(p16, e.astype(np.int16))
    got, got16 = load_trace(j, tiny["model"]), load_trace(p16, tiny["model"])
    assert len(got) == int(valid.sum()) == len(got16)
    cols = ["pos", "layer", *[f"e{j}" for j in range(K)]]
    pd.testing.assert_frame_equal(rows(got)[cols], rows(got16)[cols])
    bad = dict(doc)
    bad["meta_info"] = {"routed_experts": {"values": doc["meta_info"]["routed_experts"]["values"],
                                           "valid_mask": base64.b64encode(b"\x01\x01\x01").decode()}}
    j.write_text(json.dumps(bad))
    r = run_cli("stats", j, "--model", tiny["model"])
    assert r.rc == 2 and "valid_mask holds 3 flags" in r.err, r.err


def _npz_of(run_cli, tiny, tmp_path) -> Path:  # type: ignore[no-untyped-def]
    npz = tmp_path / "r.npz"
    assert run_cli("convert", tiny["trace"], npz).rc == 0
    return npz


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_routed_through_the_cli_in_every_format(run_cli, tiny, tmp_path, fmt):
    npz = tmp_path / "r.npz"
    r = run_cli("convert", tiny["trace"], npz, "-f", fmt)
    assert r.rc == 0, r.err
    if fmt == "json":
        info = json.loads(r.out)
        assert info["direction"] == "trace -> routed-npy" and info["rows"] == len(np.load(npz)["routed_experts"])
    elif fmt == "csv":
        assert r.out.startswith("input,output,direction")
    else:
        assert "trace -> routed-npy" in r.out
    s = run_cli("stats", npz, "--model", tiny["model"], "-f", fmt)
    assert s.rc == 0, s.err
    if fmt == "json":
        assert json.loads(s.out)["source_format"] == "routed-npy"
    elif fmt == "table":
        assert "vLLM/SGLang routed experts array" in s.out
