"""REAP saliency against an independent per-row computation, chunked == whole, and checkpoint/resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gguf_experts.analysis.reap import FIELDS, ReapAccumulator
from gguf_experts.errors import InputError


def _case(seed: int, n: int = 300, L: int = 3, M: int = 10, k: int = 3):
    rng = np.random.default_rng(seed)
    layer = rng.integers(1, L, n)  # layer 0 dense: never seen
    experts = np.argsort(-rng.random((n, M)) * np.linspace(1, 4, M), axis=1)[:, :k]
    weights = rng.random((n, k)).astype(np.float32)
    norms = (rng.random((n, k)) * 5).astype(np.float32)
    return layer, experts, weights, norms


def _independent(layer, experts, weights, norms, L, M):
    """Per (layer, expert): loop over rows with Python floats."""
    out = {f: np.zeros((L, M)) for f in FIELDS}
    gates = {}
    tokens = np.zeros(L)
    for l, es, ws, ns in zip(layer.tolist(), experts.tolist(), weights.tolist(), norms.tolist()):
        tokens[l] += 1
        tot = sum(ws)
        for e, w, nrm in zip(es, ws, ns):
            out["activation_counts"][l, e] += 1
            gates.setdefault((l, e), []).append(w)
            out["ean_sum"][l, e] += nrm
            out["weighted_ean_sum"][l, e] += (w / tot) * nrm
            out["max_activations"][l, e] = max(out["max_activations"][l, e], nrm)
    for (l, e), g in gates.items():
        c = out["activation_counts"][l, e]
        out["avg_gate_weight"][l, e] = sum(g) / c
        out["ean_mean"][l, e] = out["ean_sum"][l, e] / c
        out["reap"][l, e] = out["weighted_ean_sum"][l, e] / c
        out["activation_frequency"][l, e] = c / tokens[l]
    out["never_activated"] = out["activation_counts"] == 0
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), chunk=st.integers(1, 400))
def test_reap_matches_independent_computation(seed, chunk):
    L, M = 3, 10
    layer, experts, weights, norms = _case(seed, L=L, M=M)
    acc = ReapAccumulator(L, M)
    for a in range(0, len(layer), chunk):
        s = slice(a, a + chunk)
        acc.update(layer[s], experts[s], weights[s], norms[s])
    got = acc.result()
    want = _independent(layer, experts, weights, norms, L, M)
    for f in FIELDS:
        np.testing.assert_allclose(got[f][1:], want[f][1:], rtol=1e-9, atol=1e-12, err_msg=f)


def test_reap_by_hand():
    # one layer, 2 experts, k=2; token 1: (e0 w .75 norm 2, e1 w .25 norm 4); token 2: (e1 w 1 norm 1, e0 w 3 norm 1)
    acc = ReapAccumulator(1, 3)
    acc.update(np.array([0, 0]), np.array([[0, 1], [1, 0]]), np.array([[0.75, 0.25], [1.0, 3.0]]),
               np.array([[2.0, 4.0], [1.0, 1.0]]))
    r = acc.result()
    assert r["reap"][0].tolist() == pytest.approx([(0.75 * 2 + 0.75 * 1) / 2, (0.25 * 4 + 0.25 * 1) / 2, 0])
    assert r["avg_gate_weight"][0].tolist() == pytest.approx([(0.75 + 3) / 2, (0.25 + 1) / 2, 0])
    assert r["never_activated"][0].tolist() == [False, False, True]
    plan = acc.prune_plan(1)
    assert plan.expert.tolist() == [2]


def test_save_load_resume_is_exact(tmp_path: Path):
    L, M = 3, 10
    layer, experts, weights, norms = _case(5, L=L, M=M)
    whole = ReapAccumulator(L, M)  # the same two chunks without a save in between: bit-identical sums
    whole.update(layer[:120], experts[:120], weights[:120], norms[:120])
    whole.update(layer[120:], experts[120:], weights[120:], norms[120:])
    part = ReapAccumulator(L, M)
    part.update(layer[:120], experts[:120], weights[:120], norms[:120])
    part.records = 120
    path = tmp_path / "stats.json"
    part.save(path)
    back = ReapAccumulator.load(path)
    assert back.records == 120
    back.update(layer[120:], experts[120:], weights[120:], norms[120:])
    for f in FIELDS:
        np.testing.assert_array_equal(back.result()[f], whole.result()[f], err_msg=f)
    doc = json.loads(path.read_text())
    assert doc["layers"][0]["layer"] == 1 and len(doc["layers"][0]["reap"]) == M


def test_bad_inputs(tmp_path: Path):
    acc = ReapAccumulator(2, 4)
    with pytest.raises(InputError, match="shape"):
        acc.update(np.array([0]), np.array([[1, 2]]), np.array([[0.5]]), np.array([[1.0, 1.0]]))
    with pytest.raises(InputError, match="outside"):
        acc.update(np.array([0]), np.array([[1, 7]]), np.array([[0.5, 0.5]]), np.array([[1.0, 1.0]]))
    with pytest.raises(InputError, match="non-finite"):
        acc.update(np.array([0]), np.array([[1, 2]]), np.array([[0.5, np.nan]]), np.array([[1.0, 1.0]]))
    bad = tmp_path / "x.json"
    bad.write_text("{\"format\": \"other\"}")
    with pytest.raises(InputError, match="not an expert-stats"):
        ReapAccumulator.load(bad)
    bad.write_text("{")
    with pytest.raises(InputError, match="readable"):
        ReapAccumulator.load(bad)
