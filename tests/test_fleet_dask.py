"""Fleets on Dask (issue 22 part 3): every fleet command (stats, join-trace, cache-sim, pins, diff, report) gives
byte for byte the single process's output when its work runs on a real Dask cluster of 2 worker processes
(--scheduler, and --workers starting one), on several traces: two real captures of a tiny model, a routed
(vLLM-layout) array of one of them, and two larger written traces cut into many parts; a damaged trace keeps
its single-process counts and warning; bad --workers/--scheduler and a missing dask are one line and exit 2;
the single-process path never imports dask."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gguf_experts.demo import tinymodel
from gguf_experts.fleet_dask import trace_parts
from gguf_experts.gguf.fingerprint import fingerprint
from gguf_experts.gguf.reader import open_model
from gguf_experts.trace.reader import iter_trace_chunks, read_trace
from gguf_experts.trace.writer import TraceWriter

PART = "4K"  # parts of a few records: every written trace is cut into dozens of them


def write_trace(path: Path, model: Path, seed: int, n_seq: int, measured: bool) -> Path:
    """A capture-shaped trace of the model: per sequence a prefill record per layer, then decode records (one
    token per layer), ``measured``: a measurement record after each decode token (as version-2 captures)."""
    fp = fingerprint(open_model(model))
    L, M, K = fp.n_layer, fp.n_expert, fp.n_expert_used
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.full(M, 0.5))

    def pick(rows: int, n: int) -> np.ndarray:
        keys = rng.random((rows, n, M)) ** (1 / (skew * M))  # weighted draw without replacement per token
        return np.argsort(-keys, axis=2)[:, :, :K].astype(np.int32)
    with TraceWriter(path, fp, {"synthetic": True}) as w:
        for s in range(n_seq):
            n = 3 + (s * 5 + seed) % 9
            w.write_many(np.full(L, s), np.zeros(L, int), np.arange(L), np.tile(np.arange(n), (L, 1)),
                         np.tile(np.arange(n), (L, 1)), pick(L, n))
            for t in range(12 + s % 7):
                w.write_many(np.full(L, s), np.ones(L, int), np.arange(L), np.full((L, 1), n + t),
                             np.full((L, 1), t), pick(L, 1))
                if measured:
                    w.write_measurement(s, 1, 1, 4096 * t, t, 1000 * t)
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gguf_experts.cli import main

    d = tmp_path_factory.mktemp("dask_fleet")
    model = tinymodel.make_tiny_model(d / "tiny.gguf", seed=4)
    (d / "a.txt").write_text("def add(a, b):\n    return a + b\nOnce upon a time\n")
    (d / "b.txt").write_text("Q: 12 * 7? A: 84\nThe quick brown fox jumps\nhello\n")
    srv = d / "servers"
    srv.mkdir()
    for name, prompts in (("c1", "a.txt"), ("c2", "b.txt")):  # real llama.cpp captures
        assert main(["capture", str(model), "--prompts", str(d / prompts), "-n", "6", "--ignore-eos", "-t", "2",
                     "-o", str(srv / f"{name}.bin"), "--no-progress"]) == 0
    write_trace(srv / "w1.bin", model, 1, 40, measured=False)
    write_trace(srv / "w2.bin", model, 2, 30, measured=True)
    assert main(["convert", str(srv / "c2.bin"), str(d / "c2.npz")]) == 0
    return {"model": model, "dir": d, "glob": srv / "*.bin", "c1": srv / "c1.bin", "c2": srv / "c2.bin",
            "w1": srv / "w1.bin", "w2": srv / "w2.bin", "npz": d / "c2.npz"}


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    """A real LocalCluster of 2 worker processes (1 thread, 1 GiB each) and a client to watch its scheduler."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="1GiB",
                      dashboard_address=":0") as c, Client(c) as client:
        yield c.scheduler_address, client


def tasks_done(client) -> int:  # type: ignore[no-untyped-def]
    """Tasks the scheduler has seen finish so far (every prefix)."""
    return sum(client.run_on_scheduler(lambda dask_scheduler: [p.state_counts["memory"] for p in
                                                               dask_scheduler.task_prefixes.values()]))


def test_trace_parts_cover_the_trace_at_record_boundaries(fleet):
    for name in ("w1", "w2", "c1"):
        path = str(fleet[name])
        whole = read_trace(path)
        for part_bytes in (500, 4096, 30000):
            parts = trace_parts(path, part_bytes)
            assert parts[0][0] == whole.header.size and parts[-1][1] == os.path.getsize(path)
            assert all(a < b == c for (a, b), (c, _) in zip(parts, parts[1:] + [(parts[-1][1], 0)]))
            got = [c for a, b in parts for c in iter_trace_chunks(path, start=a, stop=b)]
            for col in ("seq", "layer", "pos", "phase"):
                assert np.array_equal(np.concatenate([getattr(c, col) for c in got]), getattr(whole, col)), col
            assert np.array_equal(np.concatenate([c.experts for c in got]), whole.experts)
        assert len(trace_parts(path, 4096)) >= os.path.getsize(path) // 8192 >= 1


def test_stats_parts_merge_to_the_whole_trace(fleet, tmp_path):
    """stats over parts: in-order sequences cut by part boundaries are joined and summarised once (the merge
    is used, not the whole-trace fallback); interleaved sequences make the merge decline (counted whole)."""
    from gguf_experts.analysis.stats import StatsAccumulator, sequence_frame
    from gguf_experts.fleet_dask import merge_stats_parts, stats_part

    mixed = tmp_path / "mixed.bin"
    whole = read_trace(fleet["w1"])
    order = np.argsort(whole.seq % 2, kind="stable")  # sequences 0, 2, 4, ... then 1, 3, ...: ids go down
    fp = whole.header.fingerprint
    with TraceWriter(mixed, fp) as w:
        for i in order[::7].tolist():  # a sample of single-row records
            w.write_many(whole.seq[i:i + 1], whole.phase[i:i + 1], whole.layer[i:i + 1], whole.pos[i:i + 1, None],
                         whole.token[i:i + 1, None], whole.experts[i:i + 1, None])
    for path, ordered in ((fleet["w1"], True), (fleet["w2"], True), (mixed, False)):
        one = StatsAccumulator(fp.n_layer, fp.n_expert)
        for c in iter_trace_chunks(path):
            one.update(c.layer, c.experts, c.phase, c.seq)
        parts = [stats_part(str(path), a, b, fp.n_layer, fp.n_expert) for a, b in trace_parts(str(path), 2048)]
        merged = merge_stats_parts(parts, fp.n_layer, fp.n_expert)
        assert (merged is not None) == ordered and len(parts) > 10
        if merged is not None:
            assert np.array_equal(merged.counts, one.counts) and np.array_equal(merged.tokens, one.tokens)
            a, b = sequence_frame(merged), sequence_frame(one)
            assert a.equals(b) and len(a) > 20


def fleet_commands(f: dict[str, Path], tmp: Path) -> list[list[str]]:
    traces = [str(f["glob"])]
    m = str(f["model"])
    return [
        ["stats", *traces, "-f", "json"],
        ["stats", *traces, "--by", "sequence", "-f", "csv"],
        ["join-trace", *traces, str(f["npz"]), "-m", m, "-f", "json"],
        ["join-trace", str(f["w2"]), "-m", m, "--by", "page", "-f", "csv"],  # one trace, in parts
        ["join-trace", str(f["c1"]), str(f["w1"]), "-m", m, "--by", "tensor", "-f", "table"],
        ["cache-sim", *traces, "--policy", "lru,opt,lfu", "--capacity", "2,4,8", "-m", m, "-f", "json"],
        ["cache-sim", *traces, "--working-set", "-f", "csv"],
        ["pins", *traces, "--capacity", "4", "-f", "json"],
        ["pins", *traces, "--budget", "64K", "-m", m, "-f", "csv"],
        ["diff", f"{f['c1']},{f['w1']}", f"{f['c2']},{f['w2']}", "-f", "csv"],
        ["diff", f"{f['c1']},{f['w1']}", str(f["w2"]), "-m", m, "--by", "layer", "-f", "json"],
    ]


def test_each_command_equals_the_single_process_on_a_cluster(run_cli, fleet, cluster, tmp_path):
    address, client = cluster
    for argv in fleet_commands(fleet, tmp_path):
        one = run_cli(*argv)
        assert one.rc == 0 and len(one.out) > 200, (argv, one.err)
        before = tasks_done(client)
        many = run_cli(*argv, "--scheduler", address, "--part-size", PART)
        assert many.rc == 0, (argv, many.err)
        assert many.out == one.out, argv  # byte for byte
        assert many.err == one.err, argv
        assert tasks_done(client) - before >= 2, argv  # the work ran as tasks of the cluster


def test_report_and_pin_lists_equal(run_cli, fleet, cluster, tmp_path):
    address, _ = cluster
    m, side = fleet["model"], str(fleet["glob"])
    for tag, extra in (("one", []), ("many", ["--scheduler", address, "--part-size", PART])):
        r = run_cli("report", side, fleet["c1"], "-m", m, "-o", tmp_path / f"{tag}.html", *extra)
        assert r.rc == 0, r.err
        r = run_cli("pins", side, "--capacity", "3", "--list-csv", tmp_path / f"{tag}.csv",
                    "--pin-list", tmp_path / f"{tag}.pins", "-f", "csv", *extra)
        assert r.rc == 0, r.err
    for suffix in ("html", "csv", "pins"):
        one, many = ((tmp_path / f"{t}.{suffix}").read_bytes() for t in ("one", "many"))
        assert one == many and len(one) > 100, suffix


def test_local_cluster_of_two_workers(run_cli, fleet):
    """--workers 2 starts (and stops) a LocalCluster of two processes for the call."""
    argv = ["join-trace", str(fleet["glob"]), "-m", str(fleet["model"]), "-f", "csv"]
    one = run_cli(*argv)
    many = run_cli(*argv, "--workers", "2", "--part-size", PART)
    assert many.rc == 0 and many.out == one.out and many.err == one.err, many.err
    one = run_cli("cache-sim", str(fleet["glob"]), "-f", "csv")
    many = run_cli("cache-sim", str(fleet["glob"]), "-f", "csv", "--workers", "2")
    assert many.rc == 0 and many.out == one.out, many.err


def test_damaged_trace_counts_and_warning_as_one_process(run_cli, fleet, cluster, tmp_path):
    """A CRC mismatch in the middle: one process keeps the records before it and warns; the part that holds the
    damage warns on its worker, so its trace is counted again whole: same counts, same one warning."""
    address, _ = cluster
    raw = bytearray(fleet["w1"].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(raw))
    m = fleet["model"]
    for argv in (["join-trace", fleet["c1"], bad, "-m", m, "-f", "csv"], ["join-trace", bad, "-m", m, "-f", "json"],
                 ["stats", bad, fleet["c1"], "--by", "sequence", "-f", "csv"], ["diff", f"{bad},{fleet['c1']}",
                                                                               fleet["c2"], "-m", m, "-f", "csv"]):
        one = run_cli(*argv)
        many = run_cli(*argv, "--scheduler", address, "--part-size", PART)
        assert one.rc == 0 and "checksum mismatch" in one.err and one.err.count("\n") == 1, (argv, one.err)
        assert many.rc == 0 and many.out == one.out and many.err == one.err, argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_bad_dask_options_are_one_line_and_exit_2(run_cli, fleet, monkeypatch):
    traces = [fleet["c1"], fleet["c2"]]
    nobody = f"tcp://127.0.0.1:{_free_port()}"  # nothing listens there
    cases = {("--workers", "0"): "--workers 0", ("--workers", "-2"): "--workers -2",
             ("--scheduler", nobody): "no Dask scheduler answered",
             ("--workers", "2", "--scheduler", nobody): "exclude each other",
             ("--workers", "two"): "invalid int value"}
    for opts, says in cases.items():
        for cmd in (["stats", *traces], ["join-trace", *traces, "-m", fleet["model"]], ["cache-sim", *traces],
                    ["pins", *traces, "--capacity", "2"], ["diff", fleet["c1"], fleet["c2"]]):
            r = run_cli(*cmd, *opts)
            assert r.rc == 2 and says in r.err and r.err.count("\n") == 1 and "Traceback" not in r.err, (cmd, r.err)
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, dashboard_address=":0") as empty:  # a scheduler without workers
        r = run_cli("stats", *traces, "--scheduler", empty.scheduler_address)
    assert r.rc == 2 and "has no workers" in r.err and r.err.count("\n") == 1, r.err
    monkeypatch.setitem(sys.modules, "distributed", None)  # dask not installed: `import distributed` fails
    r = run_cli("join-trace", *traces, "-m", fleet["model"], "--workers", "2")
    assert r.rc == 2 and "gguf-experts[dask]" in r.err and r.err.count("\n") == 1, r.err


def test_single_process_path_imports_no_dask(fleet):
    code = ("import sys\nimport gguf_experts.cli as cli\n"
            "bad = lambda: sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))\n"
            "assert not bad(), bad()\n"
            f"assert cli.main(['stats', {str(fleet['c1'])!r}, {str(fleet['c2'])!r}, '-f', 'csv', '-o', "
            f"{str(fleet['dir'] / 'nodask.csv')!r}]) == 0\n"
            f"assert cli.main(['join-trace', {str(fleet['glob'])!r}, '-m', {str(fleet['model'])!r}, '-f', 'csv', "
            f"'-o', {str(fleet['dir'] / 'nodask2.csv')!r}]) == 0\n"
            "assert not bad(), bad()\nprint('clean')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "clean", r.stderr
