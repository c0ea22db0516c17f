"""prune through the real llama.cpp: pruning never-selected experts leaves routing and logits unchanged;
a REAP-pruned model loads, generates and never selects a removed expert; analyses speak original ids."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import CliResult
from prune_check import assert_pruned_correctly

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [live] extra) is not installed")

from gguf_experts.demo import tinymodel
from gguf_experts.gguf.reader import open_model
from gguf_experts.heat import join
from gguf_experts.gguf.expert_ids import mapping_of
from gguf_experts.trace.reader import read_trace
from gguf_experts.trace.live.capture import Recorder

pytestmark = pytest.mark.live
PROMPTS_A = ["Hi cat.", "x = 1"]  # short: every layer leaves experts unselected
CASES = [("qwen3moe", "F32"), ("qwen3moe", "Q8_0"), ("qwen3moe", "MXFP4_MOE"),
         ("gpt-oss", "F32"), ("gpt-oss", "Q8_0"), ("gpt-oss", "MXFP4_MOE")]


def run_prompts(model: Path, trace: Path) -> list[np.ndarray]:
    """Capture PROMPTS_A (every row an output, so every layer sees every token) and return the logits."""
    out = []
    with Recorder(trace) as rec:
        llm = rec.llama(model, n_ctx=128, n_threads=2)
        for text in PROMPTS_A:
            toks = llm.tokenize(text)
            llm.new_sequence()
            llm.eval(toks, logits="all")
            p = llm.lc.llama_get_logits(llm._ctx)
            out.append(np.ctypeslib.as_array(p, shape=(len(toks), llm.n_vocab)).copy())
    return out


@pytest.mark.parametrize(("arch", "quant"), CASES)
def test_never_used_prune_keeps_routing_and_logits(tmp_path: Path, run_cli: Callable[..., CliResult], arch: str,
                                                   quant: str) -> None:
    src = tinymodel.make_tiny_model(tmp_path / "src.gguf", arch=arch, n_expert=32, seed=3, quant=quant)
    logits_a = run_prompts(src, tmp_path / "a.bin")
    r = run_cli("prune", src, "--by", "never-used", "--trace", tmp_path / "a.bin", "-o", tmp_path / "p.gguf")
    assert r.rc == 0, r.err
    pruned = tmp_path / "p.gguf"
    ids = assert_pruned_correctly(src, pruned)
    assert open_model(pruned).expert_count < 32
    logits_b = run_prompts(pruned, tmp_path / "b.bin")  # llama.cpp loads and runs it
    ta, tb = read_trace(tmp_path / "a.bin"), read_trace(tmp_path / "b.bin")
    assert len(ta) == len(tb) and len(ta) > 0
    np.testing.assert_array_equal(ta.layer, tb.layer)
    np.testing.assert_array_equal(ta.pos, tb.pos)
    lut = mapping_of(open_model(pruned).kv).lut(ta.header.fingerprint.n_layer)  # type: ignore[union-attr]
    assert tb.experts.max() < open_model(pruned).expert_count
    np.testing.assert_array_equal(lut[tb.layer[:, None], tb.experts], ta.experts)  # every row, top-k order
    for a, b in zip(logits_a, logits_b):
        # float tolerance: the router matmul and softmax run over fewer experts (other sums, same maths)
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * float(np.abs(a).max()))
        np.testing.assert_array_equal(b.argmax(axis=1), a.argmax(axis=1))
    # analyses of the pruned model's trace speak in original ids: the same heat as the original's trace
    ha, hb, hb_src = join(tmp_path / "a.bin", src), join(tmp_path / "b.bin", pruned), join(tmp_path / "b.bin", src)
    np.testing.assert_array_equal(hb.experts["activations"], ha.experts["activations"])
    np.testing.assert_array_equal(hb_src.experts["activations"], ha.experts["activations"])
    kept = {(la, int(e)) for la, es in ids.items() for e in es}
    ex = hb.experts
    dropped_rows = ex[[(int(la), int(e)) not in kept for la, e in zip(ex["layer"], ex["expert"])]]
    assert (dropped_rows["bytes_per_activation"] == 0).all() and (dropped_rows["activations"] == 0).all()
    sa, sb = (run_cli("stats", tmp_path / t, "--format", "csv") for t in ("a.bin", "b.bin"))
    assert sa.rc == sb.rc == 0 and sa.out == sb.out
    d = run_cli("diff", tmp_path / "a.bin", tmp_path / "b.bin", "--format", "json")
    assert d.rc == 0, d.err
    assert json.loads(d.out)["overall_js_divergence"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("arch", ["qwen3moe", "gpt-oss"])
def test_reap_half_runs_and_never_selects_removed(tmp_path: Path, run_cli: Callable[..., CliResult],
                                                  arch: str) -> None:
    src = tinymodel.make_tiny_model(tmp_path / "src.gguf", arch=arch, seed=5)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": "ok then, " * 3}) + "\n"
                            for p in ("def f(x): return x", "Tell me a story about a fox.", "2+2=4", "Bonjour")))
    r = run_cli("profile", src, "--jsonl", data, "-o", tmp_path / "stats.json", "--no-progress")
    assert r.rc == 0, r.err
    r = run_cli("prune", src, "--plan", tmp_path / "stats.json", "--keep-fraction", "0.5", "-o", tmp_path / "p.gguf")
    assert r.rc == 0, r.err
    pruned = tmp_path / "p.gguf"
    ids = assert_pruned_correctly(src, pruned)
    stats = json.loads((tmp_path / "stats.json").read_text())
    for entry in stats["layers"]:  # the kept ones are the highest-REAP experts
        reap = np.asarray(entry["reap"])
        kept = ids[entry["layer"]]
        assert len(kept) == 8 and reap[kept].min() >= np.sort(reap)[::-1][7]
    r = run_cli("capture", pruned, "--prompt", "Once upon a time", "-n", "24", "-o", tmp_path / "b.bin")
    assert r.rc == 0, r.err
    tb = read_trace(tmp_path / "b.bin")
    assert ((tb.phase == 1) & (tb.layer == 0)).sum() == 24  # it generated 24 tokens
    assert tb.experts.max() < 8
    assert tb.header.meta["prune"]["source"] == "src.gguf"
    for layer, kept in ids.items():
        removed = np.setdiff1d(np.arange(16), kept)
        lut = np.asarray(kept)
        assert not np.isin(lut[tb.experts[tb.layer == layer]], removed).any()
    heat = join(tmp_path / "b.bin", pruned).experts  # original ids: only kept ones are ever active
    active = heat[heat["activations"] > 0]
    assert all(int(e) in set(ids[int(la)].tolist()) for la, e in zip(active["layer"], active["expert"]))


def test_split_output_loads_in_llama_cpp(tmp_path: Path, run_cli: Callable[..., CliResult]) -> None:
    src = tinymodel.make_tiny_model(tmp_path / "src.gguf", arch="gpt-oss", seed=2, quant="Q8_0")
    (tmp_path / "drop.csv").write_text("".join(f"{la},{e}\n" for la in range(4) for e in (la, la + 5)))
    r = run_cli("prune", src, "--plan", tmp_path / "drop.csv", "-o", tmp_path / "p.gguf", "--split-max-size", "150K")
    assert r.rc == 0, r.err
    shards = sorted(tmp_path.glob("p-*-of-*.gguf"))
    assert len(shards) >= 3
    assert_pruned_correctly(src, shards[-1])
    r = run_cli("capture", shards[0], "--prompt", "Hello", "-n", "4", "-o", tmp_path / "b.bin")  # llama.cpp loads it
    assert r.rc == 0, r.err
    tb = read_trace(tmp_path / "b.bin")
    assert tb.experts.max() < 14 and ((tb.phase == 1) & (tb.layer == 0)).sum() == 4


def test_dry_run_numbers_from_the_trace(tmp_path: Path, run_cli: Callable[..., CliResult]) -> None:
    """--dry-run --by frequency --keep 8: the shares it prints equal a direct count over the trace's rows."""
    src = tinymodel.make_tiny_model(tmp_path / "src.gguf", arch="qwen3moe", seed=4)
    r = run_cli("capture", src, "--prompt", "The quick brown fox jumps over the lazy dog. def f(x): return x",
                "-n", "16", "-o", tmp_path / "a.bin")
    assert r.rc == 0, r.err
    r = run_cli("prune", src, "--by", "frequency", "--trace", tmp_path / "a.bin", "--keep", "8", "--dry-run",
                "--format", "json")
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    assert not list(tmp_path.glob("*.gguf"))[1:]  # nothing written
    ta = read_trace(tmp_path / "a.bin")
    counts = np.zeros((4, 16), np.int64)
    np.add.at(counts, (np.repeat(ta.layer, 4), ta.experts.ravel()), 1)
    dropped = np.zeros((4, 16), bool)
    hits = 0
    changed_tokens: set[tuple[int, int]] = set()
    for row in doc["layers"]:
        la = row["layer"]
        kept = [int(x) for x in row["kept_ids"].split()]
        # the 8 most selected (ties: lower id)
        order = sorted(range(16), key=lambda e: (-counts[la, e], e))
        assert sorted(order[:8]) == kept
        dropped[la] = ~np.isin(np.arange(16), kept)
        sel = ta.layer == la
        hit = dropped[la][ta.experts[sel]]
        assert row["dropped_selection_share"] == pytest.approx(hit.sum() / hit.size)
        assert row["changed_token_share"] == pytest.approx(hit.any(axis=1).mean())
        hits += int(hit.sum())
        changed_tokens |= {(int(s), int(p)) for s, p in zip(ta.seq[sel][hit.any(axis=1)], ta.pos[sel][hit.any(axis=1)])}
    assert doc["dropped_selection_share"] == pytest.approx(hits / ta.experts.size)
    n_tok = int((ta.layer == 0).sum())
    assert doc["changed_token_share"] == pytest.approx(len(changed_tokens) / n_tok)
    assert 0 < doc["dropped_selection_share"] < 1
    assert doc["model_bytes_after"] < doc["model_bytes_before"] and doc["experts_after"] == 8


def _llama_tools() -> Path:
    """llama.cpp's own programs, from scripts/build_llama_tools.sh (it returns at once when they are cached under
    their version-and-flags key, and builds them otherwise). A computed cache path went stale when the key
    gained the flags' hash, and the test skipped in silence: ask the script."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(["bash", str(root / "scripts" / "build_llama_tools.sh")], capture_output=True, text=True,
                       env={**__import__("os").environ, "PY": sys.executable}, timeout=3600)
    assert r.returncode == 0, f"scripts/build_llama_tools.sh failed: {r.stderr[-2000:]}"
    return Path(r.stdout.strip().splitlines()[-1])


def test_llama_bench_runs_the_pruned_model(tmp_path: Path, run_cli: Callable[..., CliResult]) -> None:
    """llama.cpp's own llama-bench loads and runs the pruned gpt-oss, and counts exactly its tensors' elements."""
    import math
    import subprocess

    tools = _llama_tools()
    src = tinymodel.make_tiny_model(tmp_path / "src.gguf", arch="gpt-oss", seed=6, quant="MXFP4_MOE")
    (tmp_path / "drop.csv").write_text("".join(f"{la},{e}\n" for la in range(4) for e in range(0, 16, 2)))
    assert run_cli("prune", src, "--plan", tmp_path / "drop.csv", "-o", tmp_path / "p.gguf").rc == 0
    p = subprocess.run([str(tools / "llama-bench"), "-m", str(tmp_path / "p.gguf"), "-p", "16", "-n", "8", "-t", "2",
                        "-r", "1", "-o", "json"], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    runs = json.loads(p.stdout)
    assert {(r["n_prompt"], r["n_gen"]) for r in runs} == {(16, 0), (0, 8)} and all(r["avg_ts"] > 0 for r in runs)
    out = open_model(tmp_path / "p.gguf")
    assert out.expert_count == 8
    assert runs[0]["model_n_params"] == sum(math.prod(t.ne) for t in out.tensors)
    assert runs[0]["model_n_params"] < sum(math.prod(t.ne) for t in open_model(src).tensors)
