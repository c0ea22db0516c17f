"""Options do what --help says, one rule picks the default output format, tables say why a cell is empty, and
the report labels every number with its trace. Each case builds its own input."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gguf_experts.gguf.reader import open_model
from gguf_experts.gguf.fingerprint import fingerprint
from gguf_experts.trace.writer import TraceWriter

from conftest import sparse_moe_model  # noqa: E402


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return sparse_moe_model(tmp_path / "m.gguf")


def write_trace(path: Path, model: Path, decode: bool, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with TraceWriter(path, fingerprint(open_model(model))) as w:
        for pos in range(8):
            for layer in (1, 2):
                e = rng.choice(8, 2, replace=False)
                w.write(0, int(decode and pos > 2), layer, np.array([pos]), np.array([40 + pos]), e[None, :])
    return path


@pytest.fixture
def prefill_only(tmp_path: Path, model: Path) -> Path:
    return write_trace(tmp_path / "p.bin", model, decode=False)


@pytest.mark.parametrize("argv", [
    ["stats", "T", "--top", "-1"], ["diff", "T", "T", "--top", "0"], ["join-trace", "T", "-m", "M", "--page-size", "0"],
    ["capture", "M", "-p", "x", "-n", "-1", "-o", "o.bin"], ["capture", "M", "-p", "x", "-c", "4", "-o", "o.bin"],
    ["capture", "M", "-p", "x", "-t", "0", "-o", "o.bin"], ["capture", "M", "-p", "x", "-ngl", "-2", "-o", "o.bin"],
    ["profile", "M", "--jsonl", "j", "-o", "s.json", "--prune-plan", "-1"],
    ["profile", "M", "--jsonl", "j", "-o", "s.json", "--limit", "-3"],
    ["profile", "M", "--jsonl", "j", "-o", "s.json", "--save-every", "0"], ["demo", "-n", "-1"],
    ["stats", "T", "--top", "many"],
])
def test_negative_counts_are_one_line_exit_2(argv: list[str], tmp_path: Path, model: Path, prefill_only: Path,
                                              run_cli) -> None:
    r = run_cli(*[{"T": prefill_only, "M": model}.get(a, a) for a in argv])
    assert r.rc == 2 and r.err.count("\n") == 1 and r.out == "", r.err
    assert r.err.startswith(f"gguf-experts {argv[0]}: error: argument ")
    assert f"see gguf-experts {argv[0]} --help" in r.err
    assert not (tmp_path / "o.bin").exists()


@pytest.mark.parametrize("argv,what", [
    (["--layers", "-1"], "n_layer (--layers) -1 must be from 1 to 512"), (["--seed", "-1"], "seed (--seed) -1"),
    (["--ff", "0"], "n_ff_exp (--ff) 0 must be at least 1"), (["--embd", "0"], "n_embd (--embd) 0 must be at least 1"),
    (["--experts", "100000"], "n_expert (--experts) 100000 must be from 1 to 1024"),
    (["--experts", "1024", "--embd", "1024", "--ff", "1024"], "over the 4.00 GiB limit; pass --max-size 49G"),
    (["--experts", "64", "--embd", "256", "--max-size", "1M"], "over the 1.00 MiB limit"),
])
def test_make_model_bounds_and_size_limit(argv: list[str], what: str, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "x.gguf"
    r = run_cli("make-model", out, *argv)
    assert r.rc == 2 and r.err.count("\n") == 1 and what in r.err, r.err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_default_format_follows_one_rule(tmp_path: Path, prefill_only: Path) -> None:
    """Piped: CSV; at a terminal: a table (tests/test_terminal.py runs the long commands in a pty);
    -o FILE: CSV, FILE.json: JSON; --format wins."""
    def gx(*argv: object) -> str:
        r = subprocess.run([sys.executable, "-m", "gguf_experts", *map(str, argv)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout
    piped = gx("stats", prefill_only)
    assert pd.read_csv(io.StringIO(piped)).columns[:3].tolist() == ["layer", "expert", "activations"]
    assert gx("stats", prefill_only, "-f", "table").startswith(f"{prefill_only}: qwen3moe")
    assert gx("stats", prefill_only, "-o", tmp_path / "s.csv") == ""
    assert (tmp_path / "s.csv").read_text().startswith("layer,expert,activations")
    gx("stats", prefill_only, "-o", tmp_path / "s.json")
    assert "layers" in json.loads((tmp_path / "s.json").read_text())
    gx("stats", prefill_only, "-o", tmp_path / "t.txt", "-f", "table")
    assert (tmp_path / "t.txt").read_text().startswith(f"{prefill_only}: qwen3moe")
    master, slave = os.openpty()  # stdout a terminal: the table
    try:
        r = subprocess.run([sys.executable, "-m", "gguf_experts", "stats", str(prefill_only)], stdout=slave,
                           stderr=subprocess.PIPE, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert os.read(master, 65536).decode().startswith(f"{prefill_only}: qwen3moe")
    finally:
        os.close(master)
        os.close(slave)


def test_every_command_takes_format_through_one_helper() -> None:
    from gguf_experts.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():  # type: ignore[union-attr]
        if name == "run":  # stdout belongs to the traced program; run reports on stderr only
            assert not any(a.dest == "format" for a in p._actions)
            continue
        fmt = next((a for a in p._actions if a.dest == "format"), None)
        assert fmt is not None and fmt.default is None and "at a terminal" in (fmt.help or ""), name


def test_tables_say_why_a_value_is_missing(prefill_only: Path, run_cli) -> None:
    r = run_cli("reuse", prefill_only, "-f", "table")
    assert r.rc == 0 and "<NA>" not in r.out and "NaN" not in r.out and "nan" not in r.out
    assert "\n- = no value: mean_overlap needs two consecutive decode tokens" in r.out
    r = run_cli("cache-sim", prefill_only, "-f", "table")
    assert "<NA>" not in r.out and "bytes_fetched needs --model" in r.out
    r = run_cli("stats", prefill_only, "--by", "layer", "-f", "table")
    assert "<NA>" not in r.out and "NaN" not in r.out and "no decode tokens" in r.out
    csv = run_cli("reuse", prefill_only, "-f", "csv").out  # CSV leaves the cell empty, JSON writes null
    assert pd.read_csv(io.StringIO(csv))["mean_overlap"].isna().all()
    doc = json.loads(run_cli("reuse", prefill_only, "-f", "json").out)
    assert all(r_["mean_overlap"] is None for r_ in doc["layers"])


def test_tables_round_numbers(prefill_only: Path, run_cli) -> None:
    r = run_cli("stats", prefill_only, "--by", "layer", "-f", "table")
    for cell in r.out.split():
        if "." in cell and cell.replace(".", "").isdigit():
            assert len(cell.split(".")[1]) <= 4, cell


def test_csv_expert_log_is_read_or_hinted(tmp_path: Path, prefill_only: Path, model: Path, run_cli) -> None:
    """The analysis commands read a CSV expert log given --model (it does not say k); the trace reader itself
    names convert when handed one."""
    from gguf_experts.errors import TraceFormatError
    from gguf_experts.trace.reader import read_trace

    log = tmp_path / "log.csv"
    assert run_cli("convert", prefill_only, log).rc == 0
    a = json.loads(run_cli("stats", prefill_only, "-f", "json").out)
    b = run_cli("stats", log, "-m", model, "-f", "json")
    assert b.rc == 0 and [ly["activation_counts"] for ly in json.loads(b.out)["layers"]] == \
        [ly["activation_counts"] for ly in a["layers"]]
    r = run_cli("stats", log)
    assert r.rc == 2 and r.err.count("\n") == 1 and "--model" in r.err
    with pytest.raises(TraceFormatError, match="is a CSV expert log, not a trace; convert it first"):
        read_trace(log)


def test_report_labels_both_traces_and_png_draws_both(tmp_path: Path, model: Path, run_cli) -> None:
    mpimg = pytest.importorskip("matplotlib.image")
    from gguf_experts.report import build_report
    from gguf_experts.reporters.html import render_html

    a = write_trace(tmp_path / "a.bin", model, decode=True, seed=1)
    b = write_trace(tmp_path / "b.bin", model, decode=True, seed=2)
    text = render_html(build_report([a, b], model))
    for label in ("a.bin", "b.bin"):  # a block of cards and tables under each trace's own name
        assert f'<p class="vtag">{label}</p><div class="cards">' in text
    assert text.count('class="view" data-view="0"') == text.count('class="view" data-view="1"') >= 5
    blob = json.loads(text.split('id="report-data">')[1].split("</script>")[0])
    assert [v["label"] for v in blob["views"]] == ["a.bin", "b.bin"]
    assert blob["views"][0]["acts"] != blob["views"][1]["acts"]
    png = tmp_path / "h.png"
    r = run_cli("report", a, b, "-m", model, "-o", tmp_path / "r.html", "--png", png, "--no-opt", "-f", "table")
    assert r.rc == 0 and f"wrote {png}" in r.out
    from gguf_experts.reporters.png import write_heat_pngs
    from gguf_experts.heat import join

    views = build_report([a, b], model).views()
    infos = write_heat_pngs(str(tmp_path / "h2.png"), views)
    assert len(infos) == 2 and infos[0].bottom < infos[1].top  # two panels, one above the other
    img = mpimg.imread(str(tmp_path / "h2.png"))
    shares = [join(p, model).experts.set_index(["layer", "expert"])["share"] for p in (a, b)]
    for info, share in zip(infos, shares):  # each panel shows its own trace: never-used cells are grey
        for (layer, e), s in share.items():
            x, y = info.cell_center(int(layer) - 1, int(e))
            grey = np.allclose(img[y, x, :3], [217 / 255] * 3, atol=0.02)
            assert grey == (s == 0), (layer, e, s)


@pytest.mark.live
def test_eog_stop_is_said(tmp_path: Path, run_cli) -> None:
    """A model whose greedy token is always end-of-generation (final norm zeroed: all logits 0, argmax 0;
    eos set to token 0): -n 16 stops at once, and capture says so."""
    pytest.importorskip("llama_cpp")
    from gguf_experts.demo import tinymodel

    p = tinymodel.make_tiny_model(tmp_path / "eog.gguf", seed=5)
    data = bytearray(p.read_bytes())
    key = b"tokenizer.ggml.eos_token_id"
    i = data.index(key) + len(key)
    assert struct.unpack_from("<II", data, i) == (4, 2)  # u32, eos = 2
    struct.pack_into("<I", data, i + 4, 0)
    t = next(t for t in open_model(p).tensors if t.name == "output_norm.weight")
    data[t.offset:t.offset + t.nbytes] = bytes(t.nbytes)
    p.write_bytes(bytes(data))
    r = run_cli("capture", p, "-p", "hello there", "-n", "16", "-o", tmp_path / "t.bin", "-f", "json", "-t", "2")
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    assert doc["decode_tokens"] == 0 and doc["stopped_at_eog"] == 1
    assert r.err == ("gguf-experts: warning: 1 of 1 sequences stopped at an end-of-generation token before -n 16 "
                     "tokens (0 decode tokens in all); pass --ignore-eos to generate all of them\n")
    proc = subprocess.run([sys.executable, "-m", "gguf_experts", "capture", str(p), "-p", "hello there", "-n", "16",
                           "-o", str(tmp_path / "v.bin")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == r.err  # that one line, and nothing at exit (ResourceWarning)
    r = run_cli("capture", p, "-p", "hello there", "-n", "3", "--ignore-eos", "-o", tmp_path / "u.bin", "-f", "json")
    assert json.loads(r.out)["decode_tokens"] == 3 and r.err == ""


@pytest.mark.live
def test_make_model_reports_the_types_it_wrote(tmp_path: Path, run_cli) -> None:
    pytest.importorskip("llama_cpp")
    out = tmp_path / "q.gguf"
    r = run_cli("make-model", out, "--quant", "Q4_K_M", "-f", "json")
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    real: dict[str, int] = {}
    for t in open_model(out).tensors:
        if "_exps." in t.name:
            real[t.type.name] = real.get(t.type.name, 0) + 1
    assert doc["expert_types"] == ", ".join(f"{k} x{v}" for k, v in sorted(real.items(), key=lambda kv: -kv[1]))
    assert "Q4_K" not in real and "asks llama.cpp for Q4_K (blocks of 256 values)" in doc["note"]
    r = run_cli("make-model", tmp_path / "e.gguf", "--quant", "Q4_K_M", "--embd", "256", "--ff", "256",
                "--experts", "4", "--top-k", "2", "--layers", "1", "-f", "json")
    doc = json.loads(r.out)
    assert "Q4_K" in doc["expert_types"] or "Q6_K" in doc["expert_types"]


@pytest.mark.live
def test_tokenize_accepts_bytes(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from gguf_experts.demo import tinymodel
    from gguf_experts.trace.live.llama import MemorySink, TracedLlama
    from gguf_experts.gguf.fingerprint import model_fingerprint

    p = tinymodel.make_tiny_model(tmp_path / "m.gguf")
    with TracedLlama(p, MemorySink(), model_fingerprint(p), n_ctx=64, n_threads=1) as llm:
        text = "héllo wörld"
        assert llm.tokenize(text.encode("utf-8")) == llm.tokenize(text) and len(llm.tokenize(text)) > 2
        assert llm.generate(text.encode("utf-8"), 0) == [] and llm.n_past == len(llm.tokenize(text))


def test_command_order_is_unique() -> None:
    """cli lists commands by ORDER; two commands with one ORDER would be listed by import accident."""
    from gguf_experts.cli import _commands

    orders = [getattr(m, "ORDER", 100) for m in _commands([])]
    assert len(orders) == len(set(orders)), orders
