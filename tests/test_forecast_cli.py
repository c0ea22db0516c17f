"""`gguf-experts forecast` and the paging library: outputs, bad input, measured columns, chunked replay."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from gguf_experts.errors import InputError
from gguf_experts.gguf.fingerprint import fingerprint
from gguf_experts.gguf.reader import open_model
from gguf_experts.paging.disk import DiskModel, device_read_ahead_kb
from gguf_experts.paging.forecast import forecast, simulate
from gguf_experts.paging.model import PAGE, page_layout, ram_model
from gguf_experts.trace.format import TraceData, TraceHeader
from gguf_experts.trace.writer import TraceWriter

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 27 MB qwen3moe (4 blocks x 16 experts, slices of 139 KB) from make_big_model.py."""
    out = tmp_path_factory.mktemp("fc") / "m.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_big_model.py"), str(out), "--layers", "4",
                    "--experts", "16", "--top-k", "4", "--embd", "512", "--ff", "256", "--heads", "8",
                    "--heads-kv", "2", "--head-dim", "64"], check=True, capture_output=True)
    return out


def make_trace(model_path: Path, n_prefill: int = 40, n_decode: int = 30, seed: int = 3) -> TraceData:
    m = open_model(model_path)
    L, E, k = m.block_count, m.expert_count, m.expert_used_count
    rng = np.random.default_rng(seed)
    ubs = [(0, s, min(16, n_prefill - s)) for s in range(0, n_prefill, 16)] + [(1, n_prefill + i, 1)
                                                                               for i in range(n_decode)]
    phase = np.concatenate([np.full(n * L, ph, np.uint8) for ph, _, n in ubs])
    pos = np.concatenate([np.tile(np.arange(p0, p0 + n), L) for _, p0, n in ubs]).astype(np.int32)
    layer = np.concatenate([np.repeat(np.arange(L), n) for _, _, n in ubs]).astype(np.int32)
    experts = np.argsort(rng.random((len(layer), E)) * (1 + np.arange(E)), axis=1)[:, :k].astype(np.int32)
    return TraceData(seq=np.zeros(len(layer), np.int32), phase=phase, pos=pos, token=(3 + pos % 250).astype(np.int32),
                     layer=layer, experts=experts, weights=None, header=TraceHeader(2, fingerprint(m), {}))


def write_trace(tr: TraceData, path: Path) -> Path:
    brk = np.flatnonzero(np.r_[True, (tr.layer[1:] != tr.layer[:-1]) | (tr.phase[1:] != tr.phase[:-1])])
    with TraceWriter(path, tr.header.fingerprint) as w:
        for a, b in zip(brk, [*brk[1:], len(tr)]):
            w.write(int(tr.seq[a]), int(tr.phase[a]), int(tr.layer[a]), tr.pos[a:b], tr.token[a:b], tr.experts[a:b])
    return path


def test_forecast_json_rows_recommendation_and_no_measurement_note(model: Path, tmp_path: Path, run_cli) -> None:
    tr = write_trace(make_trace(model), tmp_path / "t.bin")
    r = run_cli("forecast", tr, "-m", model, "--ram", "170M,400M", "-c", "512", "--format", "json")
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    rows = doc["rows"]
    assert [(x["ram"], x["advice"]) for x in rows] == [(a, m) for a in (170 << 20, 400 << 20)
                                                       for m in ("stock", "random", "prefetch")]
    assert doc["readahead_kb"] == device_read_ahead_kb(model)
    assert all(x["decode_tokens"] == 30 and x["prefill_tokens"] == 40 for x in rows)
    assert not any(k.startswith("measured_") for k in rows[0])
    assert any("no measurements" in n for n in doc["notes"])
    assert [c["ram"] for c in doc["recommended"]] == [170 << 20, 400 << 20]
    assert all(c["command"].startswith("gguf-experts run --paging ") for c in doc["recommended"])
    # the model fits at 400M (page cache > 27 MB): nothing is read after the load pass in any mode
    big = [x for x in rows if x["ram"] == 400 << 20]
    assert all(x["decode_read_per_token"] == 0 and x["decode_majflt_per_token"] == 0 for x in big)
    t = run_cli("forecast", tr, "-m", model, "--ram", "0.390625G", "-c", "512", "--format", "table")
    assert t.rc == 0 and "recommended at 400.00 MiB: gguf-experts run --paging" in t.out


def test_budget_below_weights_and_kv_is_refused_with_the_amount(model: Path, tmp_path: Path, run_cli) -> None:
    tr = write_trace(make_trace(model, 16, 2), tmp_path / "t.bin")
    rm = ram_model(open_model(model), 4096)
    r = run_cli("forecast", tr, "-m", model, "--ram", "2M", "--readahead", "128")
    assert r.rc == 2 and r.out == ""
    assert len(r.err.strip().splitlines()) == 1
    assert f"{rm.minimum / 2**30:.2f} GiB" in r.err and "non-expert weights" in r.err and "KV cache" in r.err


def test_readahead_unreadable_asks_for_the_option(model: Path, tmp_path: Path, run_cli) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm (tmpfs) here")
    copy = shm / f"gguf-experts-forecast-{tmp_path.name}.gguf"
    shutil.copyfile(model, copy)
    try:
        with pytest.raises(InputError, match="--readahead"):
            device_read_ahead_kb(copy)
        tr = write_trace(make_trace(model, 16, 2), tmp_path / "t.bin")
        r = run_cli("forecast", tr, "-m", copy, "--ram", "300M")
        assert r.rc == 2 and "--readahead" in r.err
        ok = run_cli("forecast", tr, "-m", copy, "--ram", "300M", "--readahead", "128", "--format", "csv")
        assert ok.rc == 0, ok.err
    finally:
        copy.unlink()


def test_bad_options_are_one_line(model: Path, tmp_path: Path, run_cli) -> None:
    tr = write_trace(make_trace(model, 16, 2), tmp_path / "t.bin")
    for extra, word in ((["--advice", "stock,lazy"], "lazy"), (["--readahead", "lots"], "--readahead"),
                        (["--disk-seq", "100"], "--disk-iops"), (["--ctx-size", "0"], "--ctx-size"),
                        (["--ram", "lots"], "--ram"), (["--ram", "-1G"], "--ram")):
        r = run_cli("forecast", tr, "-m", model, "--ram", "300M", *extra)
        assert r.rc == 2 and word in r.err and len(r.err.strip().splitlines()) == 1, (extra, r.err)


def test_chunk_boundaries_do_not_change_the_replay(model: Path) -> None:
    """Ubatches split across chunks (the reader's chunking) replay exactly as one chunk."""
    m = open_model(model)
    lay = page_layout(m)
    tr = make_trace(model)
    disk = DiskModel(1900, 19300, "given")
    whole = simulate([tr], lay, (12 << 20) // PAGE, "stock", 32, 32, disk).ubatches
    cuts = [0, 7, 8, 9, 70, 71, 200, len(tr)]
    parts = [tr.select(np.arange(a, b)) for a, b in zip(cuts, cuts[1:])]
    split = simulate(parts, lay, (12 << 20) // PAGE, "stock", 32, 32, disk).ubatches
    pd.testing.assert_frame_equal(whole, split)
    assert len(whole) == 3 + 30 and list(whole["n_tokens"][:3]) == [16, 16, 8]
    assert whole["read_pages"].sum() > 0  # 12 MiB of page cache for a 27 MB model: it reads


def test_measured_columns_and_compute_time(model: Path) -> None:
    tr = make_trace(model)
    meas = pd.DataFrame({"phase": [0, 0, 0, 1, 1], "n_tokens": [16, 16, 8, 1, 1],
                         "read_bytes": [10 << 20, 0, 0, 4 << 20, 0], "majflt": [5, 0, 0, 2, 0],
                         "wall_ns": [400_000_000, 160_000_000, 80_000_000, 90_000_000, 50_000_000]})
    df = forecast(tr, model, [300 << 20], ctx_size=512, measured=meas, readahead_kb=128)
    assert df.attrs["measured"]
    assert df["measured_prefill_read_per_token"].iloc[0] == pytest.approx((10 << 20) / 40)
    assert df["measured_decode_majflt_per_token"].iloc[0] == pytest.approx(1.0)
    assert df["measured_decode_tok_s"].iloc[0] == pytest.approx(2 / 0.14)
    comp = df.attrs["compute_s_per_token"]
    assert comp["prefill"] == pytest.approx(0.24 / 24) and comp["decode"] == pytest.approx(0.05)
    # the forecast tok/s includes that compute time: at most 1 / compute
    assert (df["decode_tok_s"] <= 1 / 0.05 + 1e-9).all()
    # a trace whose chunks carry an io table (trace version 2) gives the same columns without `measured`
    tr2 = make_trace(model)
    tr2.io = SimpleNamespace(**{c: meas[c].to_numpy() for c in meas.columns})  # type: ignore[attr-defined]
    df2 = forecast(tr2, model, [300 << 20], ctx_size=512, readahead_kb=128)
    assert df2["measured_decode_tok_s"].iloc[0] == pytest.approx(2 / 0.14)


def test_no_measurements_means_disk_only_ceiling(model: Path) -> None:
    df = forecast(make_trace(model), model, [170 << 20, 300 << 20], ctx_size=512, readahead_kb=128)
    assert not df.attrs["measured"] and "measured_decode_tok_s" not in df
    small = df[df["ram"] == 170 << 20]
    io = small["decode_io_s_per_token"].to_numpy()
    assert (io > 0).all()
    np.testing.assert_allclose(small["decode_tok_s"].to_numpy(), 1 / io)
    fits = df[df["ram"] == 300 << 20]
    assert fits["decode_tok_s"].isna().all()  # no reads, no compute time: unbounded (shown as '-')


def test_forecast_of_a_real_capture(model: Path, tmp_path: Path, run_cli) -> None:
    """A trace llama.cpp really wrote (ubatches of 32, then greedy decode): the replay finds its ubatches, including
    prefill ubatches where the last block's MoE ran for no row (llama.cpp computes it only for output rows)."""
    pytest.importorskip("llama_cpp")
    tr = tmp_path / "cap.bin"
    cap = run_cli("capture", model, "--prompt", "The quick brown fox jumps over the lazy dog, again and again, "
                  "until the end of the story.", "-n", "6", "--ubatch-size", "32", "-t", "2", "-o", tr,
                  "--no-progress", "--format", "json")
    assert cap.rc == 0, cap.err
    summary = json.loads(cap.out)
    summary = summary[0] if isinstance(summary, list) else summary.get("rows", [summary])[0]
    from gguf_experts.trace.reader import read_trace

    data = read_trace(tr)
    res = simulate([data], page_layout(open_model(model)), 1 << 20, "stock", 32, 32, DiskModel(1900, 19300, "x"))
    u = res.ubatches
    pre, dec = u[u["phase"] == 0], u[u["phase"] == 1]
    assert int(pre["n_tokens"].sum()) == summary["prefill_tokens"] and set(pre["n_tokens"][:-1]) == {32}
    assert len(dec) == int(dec["n_tokens"].sum()) == int((data.phase == 1).sum() // open_model(model).block_count)
    r = run_cli("forecast", tr, "-m", model, "--ram", "170M", "-c", "512", "--format", "json")
    assert r.rc == 0, r.err
    row = json.loads(r.out)["rows"][0]
    assert row["prefill_tokens"] == summary["prefill_tokens"] and row["decode_tokens"] == len(dec)


def test_trace_of_another_model_is_refused(model: Path, tmp_path: Path, run_cli) -> None:
    from conftest import sparse_moe_model

    other = sparse_moe_model(tmp_path / "other.gguf", n_layer=4, n_expert=16, k=4)
    tr = write_trace(make_trace(model, 16, 2), tmp_path / "t.bin")
    r = run_cli("forecast", tr, "-m", other, "--ram", "300M", "--readahead", "128")
    assert r.rc == 2 and len(r.err.strip().splitlines()) == 1 and "t.bin" in r.err, r.err


def test_per_ubatch_counters_for_the_harness(model: Path) -> None:
    tr = make_trace(model)
    df = forecast(tr, model, [170 << 20], advice=("stock", "prefetch"), ctx_size=512, keep_ubatches=True)
    kept = df.attrs["ubatches"]
    assert set(kept) == {(170 << 20, "stock"), (170 << 20, "prefetch")}
    u = kept[(170 << 20, "stock")]
    assert int(u["n_tokens"].sum()) == 70 and {"seq", "phase", "read_pages", "majflt", "io_s"} <= set(u.columns)
    row = df[df["advice"] == "stock"].iloc[0]
    dec = u[u["phase"] == 1]
    assert row["decode_read_per_token"] == pytest.approx(dec["read_pages"].sum() * PAGE / 30)
