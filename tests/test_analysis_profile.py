"""profile on the real llama.cpp: REAP from the command equals an independent numpy computation over the
raw per-record observations (selected experts, applied gates, ffn_moe_down norms), and a run stopped by
--limit then resumed gives the same statistics as one uninterrupted run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.live

RECORDS = [
    {"prompt": "def quicksort(xs):", "response": " return sorted(xs)"},
    {"text": "Once upon a time there was a tiny model."},
    {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from gguf_experts.cli import main

    d = tmp_path_factory.mktemp("profile")
    model = d / "tiny.gguf"
    assert main(["make-model", str(model), "--quant", "Q8_0", "-f", "json"]) == 0
    data = d / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n\n"
                    + "\n".join(json.dumps(r) for r in RECORDS[2:]) + "\n")
    return model, data


class _Raw:
    def __init__(self) -> None:
        self.rows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    def write(self, seq, phase, layer, pos, tokens, experts, weights=None, down_norms=None):
        self.rows.append((layer, np.array(experts), np.array(weights), np.array(down_norms)))


def _independent(model: Path) -> dict[int, dict[str, np.ndarray]]:
    """Observe the same texts through TracedLlama and compute REAP per (layer, expert) with plain loops."""
    from gguf_experts.trace.live.prompts import jsonl_text
    from gguf_experts.trace.live.llama import TracedLlama
    from gguf_experts.gguf.fingerprint import model_fingerprint

    fp = model_fingerprint(model)
    raw = _Raw()
    with TracedLlama(model, raw, fp, weights=True, observe_down_norms=True, n_threads=1) as llm:
        for r in RECORDS:
            llm.new_sequence()
            llm.eval(llm.tokenize(jsonl_text(r, "test")), 0, logits="all")
    sums: dict[tuple[int, int], list[float]] = {}
    for layer, ex, w, nrm in raw.rows:
        assert ex.shape == w.shape == nrm.shape and np.isfinite(nrm).all() and (nrm > 0).all()
        for erow, wrow, nrow in zip(ex.tolist(), w.tolist(), nrm.tolist()):
            tot = sum(wrow)
            for e, g, n in zip(erow, wrow, nrow):
                s = sums.setdefault((layer, e), [0, 0.0, 0.0, 0.0])
                s[0] += 1
                s[1] += n
                s[2] += g / tot * n
                s[3] = max(s[3], n)
    return {key: {"count": v[0], "ean_sum": v[1], "reap": v[2] / v[0], "max": v[3]} for key, v in sums.items()}


@pytest.fixture(scope="module", params=["random", "trained"])
def reap_model(request, setup) -> Path:
    """The random Q8_0 model, and the bundled trained one (F16, routing and expert outputs that training shaped:
    REAP's ranking on real skew)."""
    from gguf_experts.demo.flow import TRAINED_MODEL

    return setup[0] if request.param == "random" else TRAINED_MODEL


def test_profile_matches_independent_reap_and_resumes(setup, reap_model, tmp_path, run_cli):
    model, data = reap_model, setup[1]
    whole = tmp_path / "whole.json"
    r = run_cli("profile", model, "--jsonl", data, "-o", whole, "--no-progress", "-t", "1", "-f", "csv")
    assert r.rc == 0, r.err
    doc = json.loads(whole.read_text())
    assert doc["records"] == 4
    want = _independent(model)
    for lay in doc["layers"]:
        l = lay["layer"]
        for e in range(len(lay["reap"])):
            w = want.get((l, e))
            if w is None:
                assert lay["activation_counts"][e] == 0 and e in lay["never_activated"]
                continue
            assert lay["activation_counts"][e] == w["count"]
            assert lay["ean_sum"][e] == pytest.approx(w["ean_sum"], rel=1e-9)
            assert lay["reap"][e] == pytest.approx(w["reap"], rel=1e-9)
            assert lay["max_activations"][e] == pytest.approx(w["max"], rel=1e-9)
    # stop after 2 records (checkpoint every record), then resume: the same sums, nothing counted twice
    part = tmp_path / "part.json"
    assert run_cli("profile", model, "--jsonl", data, "-o", part, "--limit", "2", "--save-every", "1",
                   "--no-progress", "-t", "1").rc == 0
    assert json.loads(part.read_text())["records"] == 2
    r = run_cli("profile", model, "--jsonl", data, "-o", part, "--resume", "--prune-plan", "2", "-f", "csv",
                "--no-progress", "-t", "1")
    assert r.rc == 0, r.err
    resumed = json.loads(part.read_text())
    assert resumed["records"] == 4
    for a, b in zip(resumed["layers"], doc["layers"]):
        assert a["activation_counts"] == b["activation_counts"]
        assert a["reap"] == pytest.approx(b["reap"], rel=1e-12)
    lines = r.out.strip().splitlines()
    assert lines[0].startswith("layer,expert,") and len(lines) == 1 + 2 * len(doc["layers"])


def test_profile_refuses_bad_input(setup, tmp_path, run_cli):
    model, data = setup
    out = tmp_path / "s.json"
    out.write_text("{}")
    r = run_cli("profile", model, "--jsonl", data, "-o", out, "--no-progress", "-t", "1")
    assert r.rc == 2 and "--resume" in r.err and r.err.count("\n") == 1
    r = run_cli("profile", model, "--jsonl", data, "-o", out, "--resume", "--no-progress", "-t", "1")
    assert r.rc == 2 and "not an expert-stats file" in r.err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    r = run_cli("profile", model, "--jsonl", bad, "-o", tmp_path / "n.json", "--no-progress", "-t", "1")
    assert r.rc == 2 and "bad.jsonl:2" in r.err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    r = run_cli("profile", model, "--jsonl", empty, "-o", tmp_path / "e.json", "--no-progress", "-t", "1")
    assert r.rc == 2 and "no records" in r.err and not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("fmt", ["json", "table"])
def test_profile_report_formats(setup, tmp_path, run_cli, fmt):
    model, data = setup
    out = tmp_path / "s.json"
    r = run_cli("profile", model, "--jsonl", data, "-o", out, "--limit", "1", "--no-progress", "-t", "1", "-f", fmt)
    assert r.rc == 0, r.err
    layers = json.loads(out.read_text())["layers"]
    if fmt == "json":
        doc = json.loads(r.out)
        assert doc["records"] == 1 and len(doc["rows"]) == len(layers) * 6  # 3 lowest + 3 highest per layer
        reap = {(ly["layer"], e): v for ly in layers for e, v in enumerate(ly["reap"])}
        for row in doc["rows"]:  # one expert per row, with its own REAP from the stats file
            assert row["reap"] == pytest.approx(reap[(row["layer"], row["expert"])])
        lo = [r_ for r_ in doc["rows"] if r_["layer"] == layers[0]["layer"] and r_["end"] == "lowest"]
        assert [r_["rank"] for r_ in lo] == [1, 2, 3] and lo[0]["reap"] == pytest.approx(min(layers[0]["reap"]))
    else:
        assert "lowest and highest REAP" in r.out
        header = next(ln for ln in r.out.splitlines() if "expert" in ln and "reap" in ln)
        assert header.split() == ["layer", "end", "rank", "expert", "reap", "activation_counts"]
