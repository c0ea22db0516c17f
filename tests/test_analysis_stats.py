"""Activation statistics and reuse against plain Python counting on synthetic traces."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from analysis_synth import synth

from gguf_experts.analysis.cache.cache import LayerLRU
from gguf_experts.analysis.reuse import ReuseAccumulator, gap_bucket, gap_buckets
from gguf_experts.analysis.stats import (
    StatsAccumulator, expert_frame, imbalance, layer_frame, sequence_frame, stats_document,
)
from gguf_experts.errors import InputError


def _acc(d, n_layer, n_expert, chunk=41):
    acc = StatsAccumulator(n_layer, n_expert)
    for a in range(0, len(d["layer"]), chunk):
        s = slice(a, a + chunk)
        acc.update(d["layer"][s], d["experts"][s], d["phase"][s], d["seq"][s])
    return acc


def test_counts_and_shares_match_plain_counting():
    d = synth(n_layer=4, n_expert=16, k=2, skew=3.0, layers=[1, 2, 3])  # layer 0 dense: absent
    acc = _acc(d, 4, 16)
    ef = expert_frame(acc)
    assert sorted(ef["layer"].unique().tolist()) == [1, 2, 3]
    for l in (1, 2, 3):
        rows = d["experts"][d["layer"] == l]
        cnt = Counter(rows.ravel().tolist())
        sub = ef[ef.layer == l]
        assert dict(zip(sub.expert, sub.activations)) == {e: cnt.get(e, 0) for e in range(16)}
        assert (np.diff(sub.activations.to_numpy()) <= 0).all()  # sorted descending
        assert sub.share.sum() == pytest.approx(1.0)
        dec = Counter(d["experts"][(d["layer"] == l) & (d["phase"] == 1)].ravel().tolist())
        assert dict(zip(sub.expert, sub.decode)) == {e: dec.get(e, 0) for e in range(16)}
    doc = stats_document(acc, 2)
    lay1 = doc["layers"][0]
    assert lay1["layer"] == 1 and lay1["tokens"] == (d["layer"] == 1).sum()
    assert list(lay1["never_activated"]) == [e for e in range(16) if lay1["activation_counts"][e] == 0]
    assert lay1["activation_frequency"][3] == pytest.approx(lay1["activation_counts"][3] / lay1["tokens"])


def test_imbalance_measures():
    even = imbalance(np.full((1, 8), 5))
    assert even["gini"][0] == pytest.approx(0) and even["entropy"][0] == pytest.approx(1)
    assert even["max_mean"][0] == pytest.approx(1) and even["cv"][0] == pytest.approx(0)
    one = imbalance(np.array([[0, 0, 0, 12]]))
    assert one["gini"][0] == pytest.approx(0.75) and one["entropy"][0] == pytest.approx(0)
    assert one["max_mean"][0] == pytest.approx(4)
    c = np.array([[1, 2, 3, 10]], float)
    p = c / c.sum()
    assert imbalance(c)["entropy"][0] == pytest.approx(-(p * np.log(p)).sum() / np.log(4))
    # Gini by its definition: mean absolute difference over twice the mean
    g = np.abs(c[0][:, None] - c[0][None, :]).mean() / (2 * c.mean())
    assert imbalance(c)["gini"][0] == pytest.approx(g)
    assert np.isnan(imbalance(np.zeros((1, 4)))["gini"][0])


def test_layer_and_sequence_frames():
    d = synth(n_layer=2, n_expert=8, k=2, n_seq=3, prompt=4, gen=6, skew=1.0)
    acc = _acc(d, 2, 8)
    lf = layer_frame(acc)
    assert lf.tokens.tolist() == [3 * 10, 3 * 10] and lf.tokens_prefill.tolist() == [12, 12]
    sf = sequence_frame(acc)
    assert sf.seq.tolist() == [0, 1, 2] and sf.tokens_decode.tolist() == [6, 6, 6]
    assert sf.activations.tolist() == [2 * 10 * 2] * 3


def test_bad_ids_raise():
    acc = StatsAccumulator(2, 8)
    with pytest.raises(InputError, match="expert id 9"):
        acc.update(np.array([0]), np.array([[1, 9]]), np.array([1], np.uint8), np.array([0]))
    with pytest.raises(InputError, match="layer 5"):
        acc.update(np.array([5]), np.array([[1, 2]]), np.array([1], np.uint8), np.array([0]))


def test_reuse_overlap_and_gaps_match_plain():
    d = synth(n_layer=2, n_expert=10, k=3, n_seq=3, prompt=3, gen=12, skew=2.0, seed=5)
    lru = LayerLRU(2, 10, 3)
    ra = ReuseAccumulator(2, 10, 3, coactivation=True)
    for a in range(0, len(d["layer"]), 17):
        s = slice(a, a + 17)
        for sl, cd in lru.update(d["layer"][s], d["experts"][s]):
            ra.update(cd, d["seq"][s][sl], d["phase"][s][sl])
    lf = ra.layer_frame().set_index("layer")
    gf = ra.gap_frame()
    lo, _ = gap_buckets()
    for l in range(2):
        m = d["layer"] == l
        rows, sq, ph = d["experts"][m].tolist(), d["seq"][m], d["phase"][m]
        shared = [len(set(rows[t]) & set(rows[t - 1])) for t in range(1, len(rows))
                  if ph[t] == 1 and ph[t - 1] == 1 and sq[t] == sq[t - 1]]
        assert lf.loc[l, "decode_pairs"] == len(shared)
        assert lf.loc[l, "mean_overlap"] == pytest.approx(np.mean(shared) / 3)
        last: dict[int, int] = {}
        gaps = []
        for t, row in enumerate(rows):
            for e in row:
                if e in last:
                    gaps.append(t - last[e])
                last[e] = t
        hist = Counter(int(gap_bucket(np.array([g]))[0]) for g in gaps)
        sub = gf[gf.layer == l]
        got = {int(np.flatnonzero(lo == a)[0]): c for a, c in zip(sub.gap_lo, sub["count"]) if c}
        assert got == dict(hist)
        pairs = Counter((a, b) for row in rows for a in row for b in row if a < b)
        co = ra.coactivation_frame()
        cs = co[co.layer == l]
        assert dict(zip(zip(cs.expert_a, cs.expert_b), cs["count"])) == dict(pairs)


def test_gap_buckets_cover_every_gap():
    g = np.arange(1, 5000)
    b = gap_bucket(g)
    lo, hi = gap_buckets()
    assert (lo[b] <= g).all() and (g <= hi[b]).all()


def _seq_truth(seq, layer, experts, M):
    rows = {}
    for s in np.unique(seq).tolist():
        m = seq == s
        used = len(set(zip(np.repeat(layer[m], experts.shape[1]).tolist(), experts[m].ravel().tolist())))
        rows[s] = (int(m.sum() * experts.shape[1]), used)
    return rows


def test_many_sequences_in_one_chunk_counted_sparsely():
    """More (sequence x layer x expert) cells than the dense path allows; complete sequences are reduced
    to their summary row (only the last one stays open)."""
    rng = np.random.default_rng(3)
    n, L, M = 3000, 2, 2048
    seq = np.repeat(np.arange(1500), 2)
    layer = np.tile(np.arange(L), n // L)
    experts = np.argsort(rng.random((n, M)), axis=1)[:, :2]
    acc = StatsAccumulator(L, M)
    acc.update(layer, experts, np.ones(n, np.uint8), seq)
    assert list(acc.seq_counts) == [1499]
    sf = sequence_frame(acc).set_index("seq")
    truth = _seq_truth(seq, layer, experts, M)
    assert len(sf) == 1500
    for s, (act, used) in truth.items():
        assert (sf.loc[s, "activations"], sf.loc[s, "experts_used"]) == (act, used)


def test_interleaved_sequences_stay_exact():
    d = synth(n_layer=2, n_expert=8, k=2, n_seq=4, prompt=3, gen=5, seed=9)
    order = np.random.default_rng(1).permutation(len(d["seq"]))  # sequences out of order
    acc = StatsAccumulator(2, 8)
    for a in range(0, len(order), 7):
        i = order[a:a + 7]
        acc.update(d["layer"][i], d["experts"][i], d["phase"][i], d["seq"][i])
    sf = sequence_frame(acc).set_index("seq")
    for s, (act, used) in _seq_truth(d["seq"], d["layer"], d["experts"], 8).items():
        assert (sf.loc[s, "activations"], sf.loc[s, "experts_used"]) == (act, used)
    assert sf.tokens_decode.tolist() == [5] * 4 and sf.tokens_prefill.tolist() == [3] * 4
