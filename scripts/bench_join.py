#!/usr/bin/env python
"""Benchmark join-trace's counting pass: expert selections per second and peak memory, ours vs a naive peer.

Generates synthetic traces in a temp dir (vectorised writer): a prefill-shaped one (many tokens per record)
and a decode-shaped one (one token per record: many small records), then measures, each in its own
subprocess so that peak RSS (ru_maxrss) belongs to that measurement alone:
  ours: gguf_experts.heat.count_chunks over iter_trace_chunks (streaming, vectorised, CRC-checked);
  peer: a plain per-record Python reader (struct header, zlib.crc32, np.frombuffer, bincount per record),
        timed on a prefix of the same file (--peer-selections) because it is slow; rates are per selection.
With --measured the traces carry a measurement record after every ubatch (N_LAYER records), as version-2
captures do: compare the rate with a run without it.
Usage: bench_join.py [--selections 100000000] [--shape both|prefill|decode] [--weights] [--measured] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from gguf_experts.gguf.fingerprint import ModelFingerprint
from gguf_experts.trace.format import MEAS_LEN, RECORD_FIXED, record_length
from gguf_experts.trace.reader import read_trace_header
from gguf_experts.trace.writer import TraceWriter, encode_measurement, encode_records

N_LAYER, N_EXPERT, K = 48, 128, 8


def fingerprint() -> ModelFingerprint:
    return ModelFingerprint("qwen3moe", N_LAYER, N_EXPERT, K, "b" * 32, "b" * 32)


def generate(path: Path, selections: int, tokens_per_record: int, seed: int = 0, weights: bool = False,
             measured: bool = False) -> int:
    """A capture-shaped trace of about ``selections`` expert ids; returns the exact number written. ``measured``:
    a measurement record after every ubatch (N_LAYER records), with varying counters."""
    rng = np.random.default_rng(seed)
    n = tokens_per_record
    records = max(1, selections // (n * K))
    batch = max(1, (1 << 22) // (n * K))  # about 4 M selections per vectorised write
    if measured:  # whole ubatches only
        records = max(N_LAYER, records // N_LAYER * N_LAYER)
        batch = max(N_LAYER, batch // N_LAYER * N_LAYER)
    probs = rng.dirichlet(np.full(N_EXPERT, 0.3))  # skewed routing, like real models
    with TraceWriter(path, fingerprint(), {"synthetic": True}) as w:
        for s in range(0, records, batch):
            m = min(batch, records - s)
            idx = np.arange(s, s + m)
            layer = idx % N_LAYER
            step = idx // N_LAYER
            pos = (step[:, None] * n + np.arange(n)) % 4096
            experts = rng.choice(N_EXPERT, size=(m, n, K), p=probs).astype(np.int32)
            gate = rng.random((m, n, K), dtype=np.float32) if weights else None
            if not measured:
                w.write_many(step // 64, np.full(m, 0 if n > 1 else 1), layer, pos, pos % 50000, experts, gate)
                continue
            phase = 0 if n > 1 else 1
            raw = np.frombuffer(encode_records(step // 64, np.full(m, phase), layer, pos, pos % 50000, experts, gate),
                                np.uint8).reshape(m // N_LAYER, -1)
            counters = rng.integers(0, 1 << 24, m // N_LAYER)
            meas = b"".join(encode_measurement(int(u) // 64, phase, n, int(r), int(r) // 4096, int(r))
                            for u, r in zip(step[::N_LAYER], counters))
            meas_rows = np.frombuffer(meas, np.uint8).reshape(m // N_LAYER, -1)
            w._put(np.concatenate([raw, meas_rows], axis=1).tobytes())
    return records * n * K


def measure_ours(path: str, max_rows: int) -> dict:
    from gguf_experts.heat import count_chunks
    from gguf_experts.trace.reader import iter_trace_chunks

    fp = read_trace_header(path).fingerprint
    t = time.perf_counter()
    counts = count_chunks(iter_trace_chunks(path, max_rows=max_rows, weights=False), fp)
    dt = time.perf_counter() - t
    return {"seconds": dt, "selections": int(counts.activations.sum()), "records": counts.records,
            "checksum": int((counts.activations * np.arange(counts.activations.size).reshape(
                counts.activations.shape)).sum() % 1_000_003)}


def measure_peer(path: str, limit: int) -> dict:
    """What a straightforward reader does: one Python iteration per record."""
    hdr = read_trace_header(path)
    counts = np.zeros(N_LAYER * N_EXPERT, np.int64)
    done = records = 0
    t = time.perf_counter()
    with open(path, "rb") as f:
        f.seek(hdr.size)
        while done < limit:
            head = f.read(RECORD_FIXED.size)
            if len(head) < RECORD_FIXED.size:
                break
            if head[:4] == b"GEXM":  # a measurement record: a straightforward reader checks and skips it
                rest = f.read(MEAS_LEN - RECORD_FIXED.size)
                if zlib.crc32(rest[:-4], zlib.crc32(head)) != struct.unpack_from("<I", rest, len(rest) - 4)[0]:
                    break
                continue
            _m, length, _seq, _ph, flags, _r, layer, n, k = RECORD_FIXED.unpack(head)
            body = f.read(length - RECORD_FIXED.size)
            (crc,) = struct.unpack_from("<I", body, len(body) - 4)
            if crc != zlib.crc32(body[:-4], zlib.crc32(head)):
                break
            words = np.frombuffer(body, "<i4", count=(length - RECORD_FIXED.size - 4) // 4)
            e0 = 2 * n
            counts += np.bincount(words[e0:e0 + n * k] + layer * N_EXPERT, minlength=counts.size)
            done += n * k
            records += 1
    return {"seconds": time.perf_counter() - t, "selections": done, "records": records}


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork+exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    res = measure_ours(args.trace, args.max_rows) if args.measure == "ours" else measure_peer(args.trace, args.limit)
    res["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(res))


def run_child(what: str, trace: Path, extra: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", what, "--trace", str(trace), *extra],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_rss() -> float:
    """RSS of a child that imports everything and does nothing: subtracted to show the working set."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import numpy, pandas, gguf_experts.heat, bench_join;"
            "print(bench_join.peak_rss_mib())")
    return float(subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], check=True,
                                capture_output=True, text=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--selections", type=int, default=100_000_000, help="expert selections per trace")
    ap.add_argument("--shape", choices=("both", "prefill", "decode"), default="both")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="tokens per record of the prefill trace")
    ap.add_argument("--peer-selections", type=int, default=2_000_000, help="prefix the slow peer is timed on")
    ap.add_argument("--weights", action="store_true", help="records carry gate weights too")
    ap.add_argument("--measured", action="store_true", help="a measurement record after every ubatch (version 2)")
    ap.add_argument("--max-rows", type=int, default=None, help="rows per chunk (default: the reader's)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each (the best is reported)")
    ap.add_argument("--keep", type=Path, default=None, help="write the traces here and keep them")
    ap.add_argument("--measure", choices=("ours", "peer"), help=argparse.SUPPRESS)
    ap.add_argument("--trace", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        from gguf_experts.trace.reader import DEFAULT_MAX_ROWS

        args.max_rows = args.max_rows or DEFAULT_MAX_ROWS
        child(args)
        return
    shapes = {"prefill": args.prefill_tokens, "decode": 1}
    if args.shape != "both":
        shapes = {args.shape: shapes[args.shape]}
    extra = ["--max-rows", str(args.max_rows)] if args.max_rows else []
    base = baseline_rss()
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs; "
          f"baseline RSS after imports {base:.0f} MiB")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for shape, n in shapes.items():
            path = Path(args.keep or tmp) / f"{shape}.bin"
            t = time.perf_counter()
            total = generate(path, args.selections, n, weights=args.weights, measured=args.measured)
            gen = time.perf_counter() - t
            size = path.stat().st_size
            print(f"\n{shape}: {total:,} selections, {total // (n * K):,} records of {n} token(s) "
                  f"({record_length(n, K, args.weights)} B each), file {size / 2**20:.0f} MiB, "
                  f"generated in {gen:.1f} s")
            runs = [run_child("ours", path, extra) for _ in range(args.repeat)]
            ours = min(runs, key=lambda r: r["seconds"])
            assert ours["selections"] == total, (ours, total)
            peers = [run_child("peer", path, ["--limit", str(args.peer_selections)]) for _ in range(args.repeat)]
            peer = min(peers, key=lambda r: r["seconds"])
            r_ours = ours["selections"] / ours["seconds"]
            r_peer = peer["selections"] / peer["seconds"]
            print(f"  ours: {r_ours / 1e6:8.1f} M selections/s ({ours['seconds']:.2f} s), "
                  f"peak RSS {ours['peak_rss_mib']:.0f} MiB (+{ours['peak_rss_mib'] - base:.0f} over imports)")
            print(f"  peer: {r_peer / 1e6:8.1f} M selections/s (per-record Python reader, first "
                  f"{peer['selections']:,} selections), peak RSS {peer['peak_rss_mib']:.0f} MiB")
            print(f"  ours / peer: {r_ours / r_peer:.1f}x")
            if args.keep is None:
                path.unlink()


if __name__ == "__main__":
    main()
