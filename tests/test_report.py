"""report / diff: the HTML is self-contained and holds the data, the PNG shows hot vs cold, JS divergence
is right, and the CLI works per format; a real llama.cpp trace of the tiny model goes through end to end."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gguf_experts.analysis.diff import diff_frames, js_divergence, share_diff, shares, top_changes
from gguf_experts.cli import main
from gguf_experts.report import build_report, write_report
from gguf_experts.gguf.reader import open_model
from gguf_experts.gguf.writer import TensorSpec, write_gguf
from gguf_experts.heat import Counts, heat, join
from gguf_experts.gguf.layout import byte_map
from gguf_experts.gguf.fingerprint import fingerprint
from gguf_experts.reporters.html import ReportInput, render_html
from gguf_experts.trace.writer import TraceWriter

from conftest import sparse_moe_model  # noqa: E402

N_LAYER, N_EXPERT, K, N_EMBD, N_FF = 3, 8, 2, 64, 32
HOT, COLD = 5, 0  # in layer 1 expert HOT is always chosen, expert COLD never


def tiny_model(path: Path) -> Path:
    return sparse_moe_model(path, N_LAYER, N_EXPERT, K, N_EMBD, N_FF, name="report-test")


def make_trace(path: Path, model: Path, seed: int, skew: float = 2.0, tokens: int = 40) -> Path:
    """Prefill + decode rows for layers 1 and 2; in layer 1 expert HOT is always top-1, COLD never chosen."""
    rng = np.random.default_rng(seed)
    with TraceWriter(path, fingerprint(open_model(model)), {"test": True}) as w:
        for s in range(2):
            steps = [(0, np.arange(6))] + [(1, np.array([6 + i])) for i in range(tokens // 2 - 6)]
            for phase, pos in steps:
                for layer in (1, 2):
                    sc = rng.random((len(pos), N_EXPERT)) * np.linspace(1.0, skew, N_EXPERT)
                    if layer == 1:
                        sc[:, HOT], sc[:, COLD] = 10.0, -1.0
                    e = np.argsort(-sc, axis=1)[:, :K].astype(np.int32)
                    w.write(s, phase, layer, pos, rng.integers(0, 100, len(pos)), e, None)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("report")
    m = tiny_model(d / "m.gguf")
    return {"dir": d, "model": m, "a": make_trace(d / "a.bin", m, 1), "b": make_trace(d / "b.bin", m, 2, skew=0.2)}


@pytest.fixture(scope="module")
def report(files: dict[str, Path]) -> tuple[ReportInput, str]:
    inp = build_report([files["a"], files["b"]], files["model"], labels=("code", "chat"))
    return inp, render_html(inp)


def blob(text: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.DOTALL)
    assert m, "no data blob"
    return json.loads(m.group(1).replace("<\\/", "</"))


# ---- self-contained HTML holding the right data ----

def test_html_is_self_contained(report: tuple[ReportInput, str]) -> None:
    _, text = report
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", text, re.IGNORECASE)
    assert not re.search(r"<(link|iframe|object|embed|img)\b", text, re.IGNORECASE)
    for forbidden in ("fetch(", "XMLHttpRequest", "@import", "url(", "WebSocket", "sendBeacon", "import("):
        assert forbidden not in text, forbidden
    assert text.count("<script") == 2 and "<style>" in text  # the data blob and the inlined JS


def test_html_holds_heat_and_strip(report: tuple[ReportInput, str], files: dict[str, Path]) -> None:
    inp, text = report
    d = blob(text)
    ex = inp.heat.experts
    assert d["rows"] == [1, 2] and d["E"] == N_EXPERT
    acts = np.array(d["acts"]).reshape(2, N_EXPERT)
    np.testing.assert_array_equal(acts.ravel(), ex.sort_values(["layer", "expert"])["activations"].to_numpy())
    assert acts[0, COLD] == 0 and acts[0, HOT] == acts[0].max()
    # every expert slice is recoverable from the per-tensor encoding: offset + e * slice, same file
    t = pd.DataFrame(d["tensors"])
    t["fname"] = [d["files"][i]["name"] for i in t["file"]]
    sl = inp.heat.slices.merge(t, left_on="base_name", right_on="name", suffixes=("", "_t"))
    assert len(sl) == len(inp.heat.slices) == 2 * 3 * N_EXPERT
    np.testing.assert_array_equal(sl["offset"], sl["off"] + sl["expert"] * sl["slice"])
    np.testing.assert_array_equal(sl["size"], sl["slice"])
    assert (sl["fname"] == sl["file"]).all()
    np.testing.assert_array_equal(sl["row"], sl["layer"] - 1)
    # every whole tensor of the model is on the strip, at its offset
    bm = byte_map(open_model(files["model"]))
    got = dict(zip(t["name"], zip(t["off"], t["size"])))
    assert {n: (o, s) for n, o, s in zip(bm["name"], bm["offset"], bm["size"])} == got
    dense = t[t["row"] < 0]
    assert set(dense["name"]) == set(bm["name"]) - set(inp.heat.slices["base_name"])


def test_html_sections(report: tuple[ReportInput, str]) -> None:
    inp, text = report
    d = blob(text)
    series = d["curves"]["series"]
    assert {(s["layer"], s["policy"]) for s in series} >= {(None, "LRU"), (None, "OPT"), (1, "LRU"), (2, "LRU")}
    lru_all = next(s for s in series if s["layer"] is None and s["policy"] == "LRU")
    assert lru_all["cap"][-1] == N_EXPERT and all(np.diff(lru_all["hit"]) >= 0)
    for s in series:  # OPT is an upper bound of LRU at every capacity it was simulated at
        if s["policy"] == "OPT":
            lru = next(x for x in series if x["layer"] == s["layer"] and x["policy"] == "LRU")
            ref = dict(zip(lru["cap"], lru["hit"]))
            assert all(h >= ref[c] - 1e-9 for c, h in zip(s["cap"], s["hit"]))
    assert "Working sets" in text and "Hottest and never-used experts" in text
    assert "(memory traffic), not disk reads" in text  # what the byte heat means, and no more
    assert "Difference: code vs chat" in text and f"{inp.diff.overall:.4f}" in text
    # the never-used table names expert COLD of layer 1
    never = re.search(r"<b>Never used</b>(.*?)</table>", text, re.DOTALL).group(1)
    assert re.search(rf"<td[^>]*>1</td><td[^>]*>\d+</td><td[^>]*>[^<]*\b{COLD}\b", never)
    assert np.allclose(np.array(d["diff"]["delta"]), np.array(d["diff"]["sb"]) - np.array(d["diff"]["sa"]),
                       atol=2e-6)


def test_html_escapes_names(report: tuple[ReportInput, str]) -> None:
    """Names come from the GGUF file: they must not be able to inject markup or end the data script."""
    import dataclasses

    inp, _ = report
    evil = '</script><script>alert(1)</script><b x="'
    h = dataclasses.replace(inp.heat, summary={**inp.heat.summary, "model": evil})
    text = render_html(dataclasses.replace(inp, heat=h, sources=[evil]))
    assert evil not in text and "alert(1)" in text  # present, but only escaped
    assert text.count("<script") == 2 and blob(text)["E"] == N_EXPERT


def test_opt_left_out_for_long_traces_with_a_note(files: dict[str, Path]) -> None:
    from gguf_experts.report import cache_tables

    h = join(files["a"], files["model"])
    curves, ws, notes = cache_tables(files["a"], h, opt=True, opt_max_rows=10)
    assert set(curves["policy"].str.upper()) == {"LRU"} and "OPT curves left out" in notes[0]
    assert "OPT curves left out" in render_html(ReportInput(h, curves=curves, working_set=ws, notes=notes))
    curves, _, notes = cache_tables(files["a"], h, opt=True)
    assert set(curves["policy"].str.upper()) == {"LRU", "OPT"} and notes == []


def test_strip_stays_small_for_74k_slices() -> None:
    """48 layers x 512 experts x 3 tensors = 73,728 slices: the HTML grows with tensors, not slices."""
    n_layer, n_expert, size = 48, 512, 1 << 20
    comps = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
    lay = np.repeat(np.arange(n_layer), 3 * n_expert)
    comp = np.tile(np.repeat(np.arange(3), n_expert), n_layer)
    exp = np.tile(np.arange(n_expert), 3 * n_layer)
    tensor_idx = lay * 3 + comp
    base = np.array([f"blk.{lt // 3}.{comps[lt % 3]}.weight" for lt in range(3 * n_layer)])
    slices = pd.DataFrame({"name": [""] * len(lay), "base_name": base[tensor_idx], "expert_id": exp, "layer": lay,
                           "component": np.array(comps)[comp], "file": "big.gguf",
                           "offset": 4096 + (tensor_idx * n_expert + exp) * size, "size": size})
    rng = np.random.default_rng(0)
    acts = rng.poisson(3.0, (n_layer, n_expert)).astype(np.int64)
    res = heat(Counts(acts, np.full((n_layer, 2), 1000, np.int64), sequences=1), slices, "big", ["big.gguf"])
    assert len(res.slices) == 73_728
    text = render_html(ReportInput(res))
    assert len(text.encode()) < 400_000, len(text)
    assert len(blob(text)["tensors"]["name"]) == 3 * n_layer


# ---- PNG ----

def test_png_size_and_hot_vs_cold(report: tuple[ReportInput, str], tmp_path: Path) -> None:
    mpimg = pytest.importorskip("matplotlib.image")
    from gguf_experts.reporters.png import write_heat_png

    inp, _ = report
    info = write_heat_png(str(tmp_path / "h.png"), inp.heat)
    img = mpimg.imread(tmp_path / "h.png")
    assert img.shape[:2] == (info.height, info.width) and info.n_rows == 2 and info.n_cols == N_EXPERT
    px = lambda r, c: img[info.cell_center(r, c)[1], info.cell_center(r, c)[0], :3]
    hot, cold = px(0, HOT), px(0, COLD)
    assert np.allclose(cold, [0xD9 / 255] * 3, atol=0.01)  # never used: grey
    assert np.abs(hot - cold).sum() > 0.5
    share = inp.heat.experts.set_index(["layer", "expert"])["share"]
    least = int(share.loc[1].drop(COLD).idxmin())  # used but rare: a dark colour, unlike the hot one
    assert share.loc[(1, least)] < share.loc[(1, HOT)] / 4
    assert np.abs(px(0, least) - hot).sum() > 0.5
    assert hot[1] > px(0, least)[1]  # viridis: brighter green channel for hotter cells


def test_png_without_matplotlib_is_a_clear_error(files: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = main(["report", str(files["a"]), "-m", str(files["model"]), "-o", str(tmp_path / "r.html"),
               "--png", str(tmp_path / "h.png"), "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'gguf-experts[plot]'" in err and "Traceback" not in err
    assert not (tmp_path / "h.png").exists()


# ---- diff ----

def js_reference(p: list[float], q: list[float]) -> float:
    """Plain-Python Jensen-Shannon in bits."""
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda x: sum(a * math.log2(a / c) for a, c in zip(x, m) if a > 0)
    return 0.5 * kl(p) + 0.5 * kl(q)


def test_js_divergence_known_values() -> None:
    p = np.array([[0.5, 0.5, 0, 0], [1, 0, 0, 0], [0.25] * 4, [0.7, 0.2, 0.1, 0]])
    q = np.array([[0, 0, 0.5, 0.5], [1, 0, 0, 0], [0.25] * 4, [0.1, 0.2, 0.3, 0.4]])
    js = js_divergence(p, q)
    assert js[0] == pytest.approx(1.0) and js[1] == 0 and js[2] == 0
    assert js[3] == pytest.approx(js_reference(p[3].tolist(), q[3].tolist()))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 50), min_size=5, max_size=5), min_size=2, max_size=2))
def test_js_divergence_symmetric_bounded(rows: list[list[int]]) -> None:
    a, b = np.array([rows[0]]), np.array([rows[1]])
    if a.sum() == 0 or b.sum() == 0:
        return
    pa, pb = shares(a), shares(b)
    ab, ba = js_divergence(pa, pb)[0], js_divergence(pb, pa)[0]
    assert ab == pytest.approx(ba) and 0 <= ab <= 1
    assert ab == pytest.approx(js_reference(pa[0].tolist(), pb[0].tolist()), abs=1e-12)


def test_share_diff_frames() -> None:
    a = np.array([[0, 0], [3, 1], [2, 2]])
    b = np.array([[0, 0], [1, 3], [2, 2]])
    d = share_diff(a, b)
    assert d.layers["layer"].tolist() == [1, 2]  # a layer with no activations in either is left out
    assert d.experts["delta"].tolist() == pytest.approx([-0.5, 0.5, 0, 0])
    assert d.layers["js_divergence"].iloc[1] == 0 and d.layers["top_gain_expert"].iloc[0] == 1
    top = top_changes(d, 1)
    assert top[["layer", "expert"]].values.tolist() == [[1, 0], [2, 0]]


def test_diff_cli_per_format(files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a, b, m = str(files["a"]), str(files["b"]), str(files["model"])
    ref = diff_frames(join(a, m).experts, join(b, m).experts)
    assert main(["diff", a, b, "--format", "csv"]) == 0
    df = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert list(df.columns[:7]) == ["layer", "expert", "activations_a", "activations_b", "share_a", "share_b",
                                    "delta"] and "js_divergence" in df.columns
    assert len(df) == 2 * N_EXPERT
    np.testing.assert_allclose(df["delta"], df["share_b"] - df["share_a"], atol=1e-12)
    np.testing.assert_allclose(df["delta"], ref.experts["delta"], atol=1e-12)
    js = df.groupby("layer")["js_divergence"].first()
    np.testing.assert_allclose(js.to_numpy(), ref.layers["js_divergence"].to_numpy())
    assert main(["diff", a, b, "--model", m, "--format", "json", "--by", "layer"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["overall_js_divergence"] == pytest.approx(ref.overall) and len(doc["rows"]) == 2
    assert main(["diff", a, b, "--format", "table", "-o", str(tmp_path / "d.txt")]) == 0
    text = (tmp_path / "d.txt").read_text()
    assert "Jensen-Shannon" in text and "largest share changes" in text
    assert main(["diff", a, a, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall_js_divergence"] == 0


def test_diff_refuses_other_model(files: dict[str, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    kv = {"general.architecture": "qwen3moe", "qwen3moe.block_count": 2, "qwen3moe.expert_count": 4,
          "qwen3moe.expert_used_count": 2}
    other = write_gguf(tmp_path / "o.gguf", kv, [
        TensorSpec.make(f"blk.{i}.ffn_up_exps.weight", (N_EMBD, N_FF, 4), "F16") for i in range(2)])
    with TraceWriter(tmp_path / "o.bin", fingerprint(open_model(other)), {}) as w:
        w.write(0, 0, 1, np.arange(2), np.arange(2), np.array([[0, 1], [2, 3]], np.int32), None)
    capsys.readouterr()
    assert main(["diff", str(files["a"]), str(tmp_path / "o.bin")]) == 2
    err = capsys.readouterr().err
    assert "different models" in err and err.count("\n") == 1


# ---- report CLI ----

def test_report_cli_writes_html_and_png(files: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "r.html", tmp_path / "h.png"
    assert main(["report", str(files["a"]), str(files["b"]), "-m", str(files["model"]), "-o", str(out),
                 "--png", str(png), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["output"] for r in doc["rows"]] == ["html report", "png heatmap"]
    assert doc["rows"][0]["bytes"] == out.stat().st_size
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Difference: a.bin vs b.bin" in out.read_text()
    assert main(["report", str(files["a"]), "-m", str(tmp_path / "missing.gguf"), "-o", str(out)]) == 2
    assert main(["report", str(files["a"]), str(files["b"]), str(files["a"]), "-m", str(files["model"]),
                 "-o", str(out)]) == 2
    assert "one trace or two" in capsys.readouterr().err


@pytest.mark.live
@pytest.mark.slow
def test_real_capture_report(tmp_path: Path) -> None:
    """The real thing: llama.cpp runs the tiny model, the trace is joined and reported."""
    pytest.importorskip("llama_cpp")
    from gguf_experts.demo.tinymodel import make_tiny_model
    from gguf_experts.trace.live.capture import capture

    model = make_tiny_model(tmp_path / "tiny.gguf")
    capture(model, ["def f(x):\n    return x * 2\n"], tmp_path / "code.bin", n_predict=8, n_ctx=256, ignore_eos=True)
    capture(model, ["Hello, how are you today?"], tmp_path / "chat.bin", n_predict=8, n_ctx=256, ignore_eos=True)
    inp = build_report([tmp_path / "code.bin", tmp_path / "chat.bin"], model)
    written = write_report(tmp_path / "r.html", inp)
    d = blob((tmp_path / "r.html").read_text())
    assert written == [("html report", str(tmp_path / "r.html"))]
    assert d["rows"] == [0, 1, 2, 3] and d["E"] == 16
    assert sum(d["acts"]) == inp.heat.summary["selections"] > 0
    assert inp.diff is not None and 0 < inp.diff.overall <= 1


@pytest.mark.live
def test_demo_writes_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """`gguf-experts demo` writes report.html for its trace (code vs chat compared) and says where."""
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("GGUF_EXPERTS_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "demo"
    assert main(["demo", "--dir", str(d), "-n", "4", "--format", "json", "--threads", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["report"]["html report"] == str(d / "report.html")
    text = (d / "report.html").read_text()
    from gguf_experts.demo.flow import TRAINED_MODEL
    from gguf_experts.gguf.reader import open_model

    assert "Difference: code vs chat" in text and blob(text)["E"] == open_model(TRAINED_MODEL).expert_count
    assert main(["demo", "--dir", str(tmp_path / "demo2"), "-n", "2", "--threads", "2", "-f", "table"]) == 0
    assert f"html report {tmp_path / 'demo2' / 'report.html'}" in capsys.readouterr().out


def test_cli_survives_third_party_warnings() -> None:
    """A warning from another package inside a command (matplotlib's deprecations did this) is passed on
    once; re-emitting it while still recording used to loop forever."""
    import subprocess

    code = ("import warnings, sys; from gguf_experts.cli import run_reporting_warnings\n"
            "def f():\n    warnings.warn_explicit('third-party', UserWarning, 'x.py', 1, module='matplotlib')\n"
            "    return 7\nsys.exit(run_reporting_warnings(f))")
    r = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 7 and r.stderr.count("third-party") == 1
