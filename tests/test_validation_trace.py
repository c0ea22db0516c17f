"""Bad trace headers and records: refused at once (exit 2), memory bounded by the bytes really present."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from gguf_experts.errors import TraceFormatError
from gguf_experts.gguf.fingerprint import ModelFingerprint
from gguf_experts.trace.writer import TraceWriter
from gguf_experts.trace.reader import read_trace
from gguf_experts.trace.format import MAGIC, REC_MARKER, RECORD_FIXED, encode_header, record_length
from test_join import make_trace, tiny_model

GOOD = {"architecture": "qwen3moe", "n_layer": 3, "n_expert": 8, "n_expert_used": 2,
        "tensor_digest": "t" * 32, "type_digest": "q" * 32}


def header_bytes(fp: dict) -> bytes:
    """A header whose CRC is valid whatever the fingerprint holds (as a damaged writer would leave it)."""
    body = json.dumps({"format": "gguf-experts trace", "fingerprint": fp, "meta": {}}).encode()
    body += b" " * ((-(16 + len(body) + 4)) % 8)
    head = MAGIC + struct.pack("<II", 1, len(body)) + body
    return head + struct.pack("<I", zlib.crc32(head))


BAD = {"n_expert_used -1": {"n_expert_used": -1}, "n_expert 2^31": {"n_expert": 2**31},
       "n_expert 1e7": {"n_expert": 10**7}, "n_expert 1e7 float": {"n_expert": 1e7},
       "n_layer 1e9": {"n_layer": 10**9}, "k 1e9": {"n_expert_used": 10**9}, "k > n_expert": {"n_expert_used": 9},
       "n_layer 0": {"n_layer": 0}, "n_layer string": {"n_layer": "3"}, "n_layer bool": {"n_layer": True},
       "architecture int": {"architecture": 5}, "missing digest": {"tensor_digest": None}}


def bad_trace(tmp_path: Path, change: dict) -> Path:
    fp = {**GOOD, **change}
    fp = {k: v for k, v in fp.items() if v is not None}
    p = tmp_path / "bad.bin"
    # one real record after the header: the reader would go on to size arrays by the fingerprint
    rec = (RECORD_FIXED.pack(REC_MARKER, record_length(1, 2, False), 0, 0, 0, 0, 0, 1, 2)
           + struct.pack("<4i", 0, 5, 1, 2))
    p.write_bytes(header_bytes(fp) + rec + struct.pack("<I", zlib.crc32(rec)))
    return p


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_fingerprints_are_refused_at_once(tmp_path: Path, case: str, run_cli) -> None:
    p = bad_trace(tmp_path, BAD[case])
    with pytest.raises(TraceFormatError, match="fingerprint"):
        read_trace(p)
    for argv in (["stats", p], ["convert", p, tmp_path / "o.csv"], ["reuse", p], ["cache-sim", p],
                 ["diff", p, p]):
        t0 = time.perf_counter()
        r = run_cli(*argv)
        assert r.rc == 2 and r.err.count("\n") == 1 and "fingerprint" in r.err, (argv, r.err)
        assert time.perf_counter() - t0 < 5  # at once, not after sizing arrays by the claim
    assert not (tmp_path / "o.csv").exists()


def test_good_fingerprint_header_reads(tmp_path: Path) -> None:
    """The builder above makes readable traces when the fingerprint is sound: the refusals are the values'."""
    d = read_trace(bad_trace(tmp_path, {}))
    assert len(d) == 1 and d.experts.tolist() == [[1, 2]]


def _peak_rss_mb(argv: list[str]) -> tuple[int, float, str]:
    """Run the CLI in a child process; its exit code, peak RSS (MB) and stderr."""
    code = ("import resource, sys\nfrom gguf_experts.cli import main\nrc = main(sys.argv[1:])\n"
            "sys.stderr.write(f'PEAK {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n')\nsys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    peak = [ln for ln in r.stderr.splitlines() if ln.startswith("PEAK ")]
    rest = "\n".join(ln for ln in r.stderr.splitlines() if not ln.startswith("PEAK "))
    return r.returncode, int(peak[-1].split()[1]) / 1024 if peak else -1.0, rest


def test_a_record_claiming_a_gigabyte_costs_only_the_bytes_present(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.gguf")
    t = make_trace(tmp_path / "t.bin", model, seqs=40, prompt=50, decode=60)
    fp = read_trace(t).header.fingerprint
    k = fp.n_expert_used
    n = (1 << 30) // (4 * (2 + k)) - 8  # a record of just under 1 GiB: a valid length for its n and k
    length = record_length(n, k, False)
    assert (1 << 29) < length <= 1 << 30
    with open(t, "ab") as f:  # its fixed fields are sound; the file ends 2 MB later (more than a read block)
        f.write(RECORD_FIXED.pack(REC_MARKER, length, 0, 1, 0, 0, 1, n, k) + b"\0" * (2 << 20))
    size_mb = t.stat().st_size / 2**20
    base_rc, base_mb, _ = _peak_rss_mb(["stats", str(model.with_suffix(".nope"))])  # interpreter + imports
    assert base_rc == 2
    for argv in (["stats", str(t)], ["convert", str(t), str(tmp_path / "o.csv")],
                 ["join-trace", str(t), "--model", str(model)]):
        rc, peak, err = _peak_rss_mb(argv)
        assert rc == 0 and "dropped" in err and "truncated record" in err, (argv, err)
        assert peak - base_mb < 150 + 4 * size_mb, (argv, peak, base_mb)  # not the 1 GiB the record claims


def test_writer_refuses_an_unreadable_fingerprint(tmp_path: Path) -> None:
    """What the reader refuses, the writer does not write."""
    with pytest.raises(TraceFormatError):
        TraceWriter(tmp_path / "w.bin", ModelFingerprint("qwen3moe", 3, 8, 0, "t" * 32, "q" * 32), {})
    assert not (tmp_path / "w.bin").exists()
    assert encode_header(ModelFingerprint(**GOOD), {})  # a sound one encodes

