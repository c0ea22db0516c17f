"""join-trace: heat totals, chunked == whole, page heat by hand, model mismatch refused, CLI per format."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gguf_experts.cli import main
from gguf_experts.errors import ModelMismatchError
from gguf_experts.gguf.reader import open_model
from gguf_experts.heat import Counts, heat, join, page_heat
from gguf_experts.gguf.layout import expert_slices
from gguf_experts.gguf.fingerprint import fingerprint
from gguf_experts.trace.writer import TraceWriter
from gguf_experts.trace.reader import iter_trace_chunks, read_trace

from conftest import sparse_moe_model  # noqa: E402

N_LAYER, N_EXPERT, K, N_EMBD, N_FF = 3, 8, 2, 64, 32


def tiny_model(path: Path, down_type: str = "Q8_0", n_expert: int = N_EXPERT) -> Path:
    return sparse_moe_model(path, N_LAYER, n_expert, K, N_EMBD, N_FF, down_type)


def distinct_experts(rng: np.random.Generator, n: int, n_expert: int = N_EXPERT, k: int = K) -> np.ndarray:
    """n rows of k distinct expert ids, skewed so that some experts are hot and some cold."""
    scores = rng.random((n, n_expert)) * np.linspace(1.0, 3.0, n_expert)
    return np.argsort(-scores, axis=1)[:, :k].astype(np.int32)


def make_trace(path: Path, model: Path, seqs: int = 3, prompt: int = 7, decode: int = 5, seed: int = 0,
               weights: bool = False, layers: tuple[int, ...] = (1, 2)) -> Path:
    """A capture-shaped trace: per sequence one prefill ubatch then decode steps, one record per MoE layer."""
    rng = np.random.default_rng(seed)
    with TraceWriter(path, fingerprint(open_model(model)), {"test": True}) as w:
        for s in range(seqs):
            steps = [(0, np.arange(prompt))] + [(1, np.array([prompt + i])) for i in range(decode)]
            for phase, pos in steps:
                tok = rng.integers(0, 100, len(pos))
                for layer in layers:
                    e = distinct_experts(rng, len(pos))
                    wt = rng.random(e.shape).astype(np.float32) if weights else None
                    w.write(s, phase, layer, pos, tok, e, wt)
    return path


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return tiny_model(tmp_path / "tiny.gguf")


@pytest.fixture()
def trace(tmp_path: Path, model: Path) -> Path:
    return make_trace(tmp_path / "t.bin", model)


def test_heat_totals_match_an_independent_count(model: Path, trace: Path) -> None:
    res = join(trace, model)
    data = read_trace(trace)
    # independent count: pandas over the flat selections
    sel = pd.DataFrame({"layer": np.repeat(data.layer, K), "expert": data.experts.ravel()})
    naive = sel.groupby(["layer", "expert"]).size()
    ex = res.experts.set_index(["layer", "expert"])
    assert (ex.loc[naive.index, "activations"].to_numpy() == naive.to_numpy()).all()
    assert ex["activations"].sum() == len(sel)
    # per layer: activations == tokens x n_expert_used; layer 0 is dense: not listed
    ly = res.layers.set_index("layer")
    assert list(ly.index) == [1, 2]
    tokens = pd.Series(data.layer).value_counts()
    for layer in (1, 2):
        assert ly.loc[layer, "tokens"] == tokens[layer] == 3 * (7 + 5)
        assert ly.loc[layer, "activations"] == tokens[layer] * K
    # bytes == counts x slice sizes, at every level
    per_act = 2 * (N_EMBD * N_FF * 2) + N_EMBD * (N_FF // 32) * 34
    assert (res.experts["bytes_per_activation"] == per_act).all()
    assert (res.experts["bytes_read"] == res.experts["activations"] * per_act).all()
    assert (res.slices["bytes_read"] == res.slices["activations"] * res.slices["size"]).all()
    by_expert = res.slices.groupby(["layer", "expert"])["bytes_read"].sum()
    assert (ex.loc[by_expert.index, "bytes_read"].to_numpy() == by_expert.to_numpy()).all()
    share = res.experts.groupby("layer")["share"].sum()
    assert np.allclose(share, 1.0)
    s = res.summary
    assert s["tokens"] == 36 and s["sequences"] == 3 and s["prefill_tokens"] == 21 and s["decode_tokens"] == 15
    assert s["bytes_read"] == res.slices["bytes_read"].sum() == len(sel) * per_act
    assert s["n_layer_moe"] == 2
    assert s["dense_bytes_per_token"] == 2 * N_EXPERT * per_act
    assert s["ratio"] == pytest.approx(K / N_EXPERT)
    assert s["files"] == ["tiny.gguf"]


def test_chunked_join_equals_whole_join(model: Path, trace: Path) -> None:
    whole = join(trace, model)
    small = join(trace, model, max_rows=3)
    assert len(list(iter_trace_chunks(trace, max_rows=3))) > 10
    from_chunks = join(list(iter_trace_chunks(trace, max_rows=5)), model)
    for other in (small, from_chunks):
        pd.testing.assert_frame_equal(whole.experts, other.experts)
        pd.testing.assert_frame_equal(whole.slices, other.slices)
        pd.testing.assert_frame_equal(whole.layers, other.layers)
        assert whole.summary == other.summary


def _slices(rows: list[tuple[str, int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["file", "offset", "size", "activations"])


def test_page_heat_small_case_by_hand() -> None:
    sl = _slices([("a", 0, 4096, 3), ("a", 4096, 100, 5), ("a", 4196, 5000, 2), ("a", 12288, 4096, 2),
                  ("a", 20000, 10, 0), ("b", 10, 10, 9)])
    got = page_heat(sl, 4096)
    want = [("a", 0, 0, 3), ("a", 1, 1, 7), ("a", 2, 3, 2), ("a", 4, 4, 0), ("b", 0, 0, 9)]
    assert list(zip(got["file"], got["page_start"], got["page_end"], got["activations"])) == want
    assert got["offset_start"].tolist() == [0, 4096, 8192, 16384, 0]
    assert got["offset_end"].tolist() == [4096, 8192, 16384, 20480, 4096]
    assert got["bytes_read"].tolist() == [3 * 4096, 7 * 4096, 2 * 2 * 4096, 0, 9 * 4096]


def test_page_heat_equals_dense_brute_force() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(1, 30))
        off = rng.integers(0, 50_000, n)
        size = rng.integers(1, 9000, n)
        acts = rng.integers(0, 4, n)
        ps = int(rng.choice([512, 4096]))
        got = page_heat(_slices([("f", int(o), int(s), int(a)) for o, s, a in zip(off, size, acts)]), ps)
        n_pages = int((off + size).max() // ps + 2)
        heat_dense, cover = np.zeros(n_pages, np.int64), np.zeros(n_pages, bool)
        for o, s, a in zip(off, size, acts):
            heat_dense[o // ps:(o + s - 1) // ps + 1] += a
            cover[o // ps:(o + s - 1) // ps + 1] = True
        back, back_cover = np.zeros(n_pages, np.int64), np.zeros(n_pages, bool)
        for a, b, h in zip(got["page_start"], got["page_end"], got["activations"]):
            back[a:b + 1] = h
            back_cover[a:b + 1] = True
        assert (back == heat_dense).all() and (back_cover == cover).all()
        # runs are maximal: neighbours that touch differ in heat
        touch = got["page_start"].to_numpy()[1:] == got["page_end"].to_numpy()[:-1] + 1
        assert not (touch & (got["activations"].to_numpy()[1:] == got["activations"].to_numpy()[:-1])).any()


def test_heat_core_works_on_a_hand_built_slice_table() -> None:
    acts = np.zeros((2, 4), np.int64)
    acts[1] = [5, 0, 3, 2]
    counts = Counts(acts, np.array([[0, 0], [4, 1]]), sequences=1)
    slices = pd.DataFrame({"name": [f"x[{e}]" for e in range(4)], "base_name": "x", "layer": 1,
                           "expert_id": np.arange(4), "component": "ffn_up_exps", "file": "m.gguf",
                           "offset": 1000 + 100 * np.arange(4), "size": 100})
    res = heat(counts, slices, "m")
    assert res.experts["activations"].tolist() == [5, 0, 3, 2]
    assert res.experts["share"].tolist() == [0.5, 0.0, 0.3, 0.2]
    assert res.layers.to_dict("records") == [{"layer": 1, "tokens": 5, "activations": 10, "bytes_read": 1000,
                                              "dense_bytes": 2000}]
    assert res.summary["bytes_per_token"] == 200 and res.summary["ratio"] == 0.5


def test_trace_from_another_model_is_refused(tmp_path: Path, model: Path, trace: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    other = tiny_model(tmp_path / "other.gguf", n_expert=16)
    with pytest.raises(ModelMismatchError, match="n_expert"):
        join(trace, other)
    assert main(["join-trace", str(trace), "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "n_expert: trace 8 vs model 16" in err


def test_other_quantization_of_the_same_model_warns(tmp_path: Path, trace: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    q4 = tiny_model(tmp_path / "q4.gguf", down_type="Q4_0")
    with pytest.warns(UserWarning, match="another quantization"):
        res = join(trace, q4)
    assert (res.experts["bytes_per_activation"] == 2 * N_EMBD * N_FF * 2 + N_EMBD * 18).all()
    assert main(["join-trace", str(trace), "--model", str(q4), "-f", "csv"]) == 0
    assert "warning: " in capsys.readouterr().err


def test_expert_ids_outside_the_model_are_refused(tmp_path: Path, model: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.bin"
    with TraceWriter(bad, fingerprint(open_model(model))) as w:
        w.write(0, 0, 1, np.arange(2), np.arange(2), np.array([[0, 1], [2, 8]]))
    assert main(["join-trace", str(bad), "--model", str(model)]) == 2
    assert "expert id 8" in capsys.readouterr().err


@pytest.mark.parametrize("by", ["expert", "tensor", "page"])
@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_cli_per_format(model: Path, trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        by: str, fmt: str) -> None:
    out = tmp_path / f"heat.{fmt}"
    assert main(["join-trace", str(trace), "--model", str(model), "--by", by, "-f", fmt, "-o", str(out)]) == 0
    text = out.read_text()
    res = join(trace, model)
    if fmt == "csv":
        df = pd.read_csv(out)
        if by == "expert":
            assert df["activations"].sum() == res.summary["selections"]
            assert list(df.columns) == list(res.experts.columns)
        elif by == "tensor":
            assert df["bytes_read"].sum() == res.summary["bytes_read"]
            assert len(df) == len(expert_slices(open_model(model)))
        else:
            assert list(df.columns) == ["file", "page_start", "page_end", "offset_start", "offset_end",
                                        "activations", "bytes_read"]
            assert (df["page_end"] >= df["page_start"]).all()
    elif fmt == "json":
        doc = json.loads(text)
        assert doc["summary"]["tokens"] == 36 and doc["by"] == by and len(doc["rows"]) > 0
    else:
        assert "36 tokens" in text and "ratio 0.2500" in text
    assert capsys.readouterr().err == f"wrote {out} ({fmt})\n"  # a person learns where the output went


def test_damaged_traces_via_join_trace(tmp_path: Path, model: Path, trace: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    raw = trace.read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:-7])
    assert main(["join-trace", str(tmp_path / "cut.bin"), "--model", str(model), "-f", "json"]) == 0
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and "warning:" in cap.err and "dropped" in cap.err
    doc = json.loads(cap.out)
    assert doc["summary"]["recovered"] and doc["summary"]["selections"] == (3 * 12 * 2 - 1) * K
    (tmp_path / "magic.bin").write_bytes(b"XXXX" + raw[4:])
    assert main(["join-trace", str(tmp_path / "magic.bin"), "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a gguf-experts trace" in err


@pytest.mark.live
def test_join_a_real_llama_cpp_capture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A llama.cpp-quantized tiny model, a real capture, then join-trace and the CSV log round trip."""
    pytest.importorskip("llama_cpp")
    model, trace = tmp_path / "tiny.gguf", tmp_path / "live.bin"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def quicksort(xs):\nOnce upon a time\n")
    assert main(["make-model", str(model), "--quant", "Q4_K_M", "-f", "json"]) == 0
    assert main(["capture", str(model), "--prompts", str(prompts), "-n", "6", "--weights", "-o", str(trace),
                 "--no-progress", "-f", "json"]) == 0
    capsys.readouterr()
    data = read_trace(trace)
    res = join(trace, model)
    k = data.header.fingerprint.n_expert_used
    tokens = np.bincount(data.layer)
    ly = res.layers.set_index("layer")
    assert (ly["tokens"].to_numpy() == tokens).all() and (ly["activations"].to_numpy() == tokens * k).all()
    sizes = expert_slices(open_model(model)).groupby(["layer", "expert_id"])["size"].sum()
    ex = res.experts.set_index(["layer", "expert"])
    assert (ex.loc[sizes.index, "bytes_per_activation"].to_numpy() == sizes.to_numpy()).all()
    assert (res.experts["bytes_read"] == res.experts["activations"] * res.experts["bytes_per_activation"]).all()
    assert res.summary["sequences"] == 2 and res.summary["decode_tokens"] == 2 * 6
    assert res.summary["tokens"] == tokens.max() and res.summary["bytes_read"] == res.slices["bytes_read"].sum()
    assert main(["join-trace", str(trace), "--model", str(model), "--by", "page", "-f", "csv",
                 "-o", str(tmp_path / "pages.csv")]) == 0
    pages = pd.read_csv(tmp_path / "pages.csv")
    assert pages["activations"].max() > 0 and (pages["offset_end"] > pages["offset_start"]).all()
    log, back = tmp_path / "log.csv", tmp_path / "back.bin"
    assert main(["convert", str(trace), str(log)]) == 0
    assert main(["convert", str(log), str(back), "--model", str(model)]) == 0
    again = read_trace(back)
    for f in ("seq", "pos", "layer", "experts"):
        assert np.array_equal(getattr(data, f), getattr(again, f)), f
