"""profile --compat expert-profile (issue 22 item 4) on the real llama.cpp: the REAP statistics equal an
independent computation made the way llama-expert-profile works (prompt + "\\n" + response, the logits of the
last token only, so the last layer routes one row per record), and differ from our default exactly there."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.live

RECORDS = [
    {"prompt": "def quicksort(xs):", "response": " return sorted(xs)"},
    {"text": "Once upon a time there was a tiny model, and it routed every token it saw."},
    {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
]
#: the texts llama-expert-profile tokenises, written out by hand
TEXTS = ["def quicksort(xs):\n return sorted(xs)",
         "Once upon a time there was a tiny model, and it routed every token it saw.\n",
         "Add the numbers\n2 and 3\n5"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("llama_cpp")
    from gguf_experts.cli import main

    d = tmp_path_factory.mktemp("compat")
    model = d / "tiny.gguf"
    assert main(["make-model", str(model), "--quant", "Q8_0", "-f", "json"]) == 0
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return model, data


class _Raw:
    def __init__(self) -> None:
        self.rows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    def write(self, seq, phase, layer, pos, tokens, experts, weights=None, down_norms=None):  # type: ignore[no-untyped-def]
        self.rows.append((layer, np.array(experts), np.array(weights), np.array(down_norms)))


def _independent(model: Path, ubatch: int) -> tuple[dict[tuple[int, int], dict[str, float]], dict[int, int]]:
    """REAP per (layer, expert) with plain loops over what llama.cpp routes for the hand-written texts,
    asking for the last token's logits only (llama_batch logits flag on the last token)."""
    from gguf_experts.gguf.fingerprint import model_fingerprint
    from gguf_experts.trace.live.llama import TracedLlama

    fp = model_fingerprint(model)
    raw = _Raw()
    with TracedLlama(model, raw, fp, weights=True, observe_down_norms=True, n_threads=1, n_ubatch=ubatch) as llm:
        for t in TEXTS:
            llm.new_sequence()
            llm.eval(llm.tokenize(t), 0, logits="last")
    sums: dict[tuple[int, int], list[float]] = {}
    rows: dict[int, int] = {}
    for layer, ex, w, nrm in raw.rows:
        rows[layer] = rows.get(layer, 0) + len(ex)
        for erow, wrow, nrow in zip(ex.tolist(), w.tolist(), nrm.tolist()):
            tot = sum(wrow)
            for e, g, n in zip(erow, wrow, nrow):
                s = sums.setdefault((layer, e), [0, 0.0])
                s[0] += 1
                s[1] += g / tot * n
    return {key: {"count": v[0], "reap": v[1] / v[0]} for key, v in sums.items()}, rows


@pytest.mark.parametrize("ubatch", [512, 8])  # one ubatch per record, and several (no output rows in the first)
def test_compat_expert_profile_matches_an_independent_run(setup, tmp_path, run_cli, ubatch):
    model, data = setup
    out, ours = tmp_path / "compat.json", tmp_path / "ours.json"
    argv = ("--no-progress", "-t", "1", "--ubatch-size", str(ubatch), "-f", "csv")
    r = run_cli("profile", model, "--jsonl", data, "-o", out, "--compat", "expert-profile", *argv)
    assert r.rc == 0, r.err
    doc = json.loads(out.read_text())
    want, rows = _independent(model, ubatch)
    layers = sorted(rows)
    last = layers[-1]
    assert rows[last] == len(RECORDS)  # the last layer routes only the output row of each record
    for lay in doc["layers"]:
        l = lay["layer"]
        assert lay["tokens"] == rows[l]
        for e in range(len(lay["reap"])):
            w = want.get((l, e))
            if w is None:
                assert lay["activation_counts"][e] == 0
                continue
            assert lay["activation_counts"][e] == w["count"]
            assert lay["reap"][e] == pytest.approx(w["reap"], rel=1e-9)
    assert run_cli("profile", model, "--jsonl", data, "-o", ours, *argv).rc == 0
    d0 = {x["layer"]: x for x in json.loads(ours.read_text())["layers"]}
    d1 = {x["layer"]: x for x in doc["layers"]}
    # ours scores every token in every layer: the last layer has many more rows than records
    assert sum(d0[last]["activation_counts"]) > sum(d1[last]["activation_counts"]) == len(RECORDS) * 4
    assert doc["meta"]["compat"] == "expert-profile"


def test_compat_is_kept_on_resume(setup, tmp_path, run_cli):
    model, data = setup
    out = tmp_path / "p.json"
    assert run_cli("profile", model, "--jsonl", data, "-o", out, "--limit", "1", "--no-progress", "-t", "1").rc == 0
    r = run_cli("profile", model, "--jsonl", data, "-o", out, "--resume", "--compat", "expert-profile",
                "--no-progress", "-t", "1")
    assert r.rc == 2 and "--compat" in r.err and r.err.count("\n") == 1


def test_help_says_why_our_default_differs(run_cli):
    r = run_cli("profile", "--help")
    assert "--compat" in r.out and "last token only" in r.out.replace("\n", " ").replace("  ", " ")
