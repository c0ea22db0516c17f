"""Bad model metadata and bad prompt inputs: one line and exit 2, never a traceback or an abort (134),
and a prompt too long for the context refused before it is tokenised. Each case builds its own input from a
real generated model (llama.cpp runs it) or a file written here."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gguf_experts.demo import tinymodel
from gguf_experts.gguf.reader import ValueType
from gguf_experts.gguf.metadata import LLAMA_MAX_EXPERTS, LLAMA_MAX_LAYERS
from gguf_mutate import DROP, rewrite, set_u32_in_place, u32

A = "qwen3moe"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.make_tiny_model(tmp_path_factory.mktemp("m") / "tiny.gguf", seed=3)


def capture_cli(model: Path, out: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """capture in a child process: an abort inside llama.cpp would show as exit 134, not kill the suite."""
    return subprocess.run([sys.executable, "-m", "gguf_experts.cli", "capture", str(model), *extra, "-o", str(out),
                           "--no-progress", "-t", "1", "-c", "256"], capture_output=True, text=True, timeout=timeout)


# (name, how to damage the model, what the one line says)
ONE_U32 = [("used > count", f"{A}.expert_used_count", 17, "exceeds"),
           ("used 0", f"{A}.expert_used_count", 0, "expert_used_count is 0"),
           ("block_count 0", f"{A}.block_count", 0, f"[1, {LLAMA_MAX_LAYERS}]"),
           ("block_count > max", f"{A}.block_count", LLAMA_MAX_LAYERS + 1, "LLAMA_MAX_LAYERS"),
           ("expert_count > max", f"{A}.expert_count", LLAMA_MAX_EXPERTS + 1, "LLAMA_MAX_EXPERTS"),
           ("expert_count 2^32-1", f"{A}.expert_count", 2**32 - 1, "LLAMA_MAX_EXPERTS"),
           ("fewer layers than tensors", f"{A}.block_count", 3, "is in layer 3")]
RETYPED = [("NaN float", {f"{A}.expert_count": (ValueType.FLOAT32, math.nan)}, "is a f32"),
           ("string", {f"{A}.expert_used_count": (ValueType.STRING, "4")}, "is a string"),
           ("array", {f"{A}.block_count": (ValueType.ARRAY, (ValueType.UINT32, [4, 4]))}, "is a array"),
           ("per-layer top-k", {f"{A}.expert_used_count": (ValueType.ARRAY, (ValueType.UINT32, [4] * 4))},
            "per-layer array"),
           ("u64", {f"{A}.expert_count": (ValueType.UINT64, 16)}, "is a u64"),
           ("i32 negative", {f"{A}.block_count": (ValueType.INT32, -1)}, "is a i32"),
           ("architecture int", {"general.architecture": (ValueType.UINT32, 7)}, "not a string"),
           ("groups >= experts", {f"{A}.expert_group_count": u32(16)}, "expert_group_count"),
           ("nextn > layers", {f"{A}.nextn_predict_layers": u32(5)}, "nextn_predict_layers"),
           ("used missing", {f"{A}.expert_used_count": DROP}, "expert_used_count is 0 or missing")]


def damaged(model: Path, tmp: Path) -> list[tuple[str, Path, str]]:
    out = [(name, set_u32_in_place(model, tmp / f"u{i}.gguf", key, v), msg)
           for i, (name, key, v, msg) in enumerate(ONE_U32)]
    out += [(name, rewrite(model, tmp / f"r{i}.gguf", ch), msg) for i, (name, ch, msg) in enumerate(RETYPED)]
    out.append(("duplicate key", rewrite(model, tmp / "dup.gguf", extra=[(f"{A}.expert_count", ValueType.UINT32, 16)]),
                "appears twice"))
    return out


@pytest.mark.live  # runs llama.cpp
def test_bad_metadata_is_refused_by_every_command(model: Path, tmp_path: Path, run_cli) -> None:
    trace = tmp_path / "t.bin"
    assert run_cli("capture", model, "-p", "hello", "-n", "2", "-o", trace, "--no-progress", "-t", "1").rc == 0
    assert run_cli("dump", rewrite(model, tmp_path / "same.gguf")).rc == 0  # the rewrite itself is sound
    for name, bad, msg in damaged(model, tmp_path):
        for argv in (["dump", bad], ["dump", bad, "--split-experts"], ["check-overlaps", bad],
                     ["join-trace", trace, "--model", bad], ["convert", tmp_path / "log.csv", tmp_path / "x.bin",
                                                             "--model", bad]):
            if argv[0] == "convert" and not (tmp_path / "log.csv").exists():
                assert run_cli("convert", trace, tmp_path / "log.csv").rc == 0
            r = run_cli(*argv)
            assert r.rc == 2 and r.err.count("\n") == 1 and msg in r.err, (name, argv, r.err)
            assert "Traceback" not in r.err


@pytest.mark.parametrize("case", [c[0] for c in ONE_U32[:3]] + ["NaN float", "per-layer top-k", "duplicate key"])
def test_capture_never_hands_llama_cpp_a_file_it_aborts_on(model: Path, tmp_path: Path, case: str) -> None:
    name, bad, msg = next(c for c in damaged(model, tmp_path) if c[0] == case)
    r = capture_cli(bad, tmp_path / "t.bin", "-p", "hello", "-n", "2")
    assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, (case, r.returncode, r.stderr[-500:])
    assert not (tmp_path / "t.bin").exists()


def test_profile_refuses_bad_metadata_too(model: Path, tmp_path: Path, run_cli) -> None:
    bad = set_u32_in_place(model, tmp_path / "b.gguf", f"{A}.expert_used_count", 17)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    r = run_cli("profile", bad, "--jsonl", data, "-o", tmp_path / "s.json", "--no-progress")
    assert r.rc == 2 and "exceeds" in r.err and r.err.count("\n") == 1


JSONL_CASES = {
    "bad utf-8": (b'{"prompt": "caf\xe9"}\n', "line 2: byte 0xE9 is not UTF-8"),
    "binary": (b"GGEXTRC\x00\x01\x00\x00\x00" + bytes(range(256)), "binary file"),
    "nested": (b"[" * 100_000 + b"\n", "nested more than"),
    "5001 digits": (b'{"prompt": "a", "n": ' + b"9" * 5001 + b"}\n", "5001 digits"),
    "lone surrogate": (b'{"prompt": "a\\ud800b"}\n', "lone surrogate"),
    "duplicate key": (b'{"prompt": "a", "prompt": "b"}\n', "duplicate key"),
    "not an object": (b'[1, 2]\n', "expected a JSON object"),
    "syntax": (b'{"prompt": }\n', "in.jsonl:2: line 1, column 12"),
}


@pytest.mark.parametrize("case", sorted(JSONL_CASES))
def test_bad_jsonl_is_one_line(model: Path, tmp_path: Path, case: str, run_cli) -> None:
    raw, msg = JSONL_CASES[case]
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"prompt": "fine"}\n' + raw)
    for argv in (["capture", model, "--jsonl", p, "-o", tmp_path / "t.bin", "--no-progress"],
                 ["capture", model, "--prompts", p, "-o", tmp_path / "t.bin", "--no-progress"],
                 ["profile", model, "--jsonl", p, "-o", tmp_path / "s.json", "--no-progress"]):
        if argv[2] == "--prompts" and case not in ("bad utf-8", "binary"):
            continue  # any UTF-8 line is a prompt
        t0 = time.perf_counter()
        r = run_cli(*argv)
        assert r.rc == 2 and r.err.count("\n") == 1 and msg in r.err, (argv[2], r.err)
        assert str(p) in r.err and time.perf_counter() - t0 < 20
        assert not (tmp_path / "t.bin").exists() and not (tmp_path / "s.json").exists()


def test_lone_surrogate_in_a_prompt_argument(model: Path, tmp_path: Path, run_cli) -> None:
    r = run_cli("capture", model, "-p", "a\udc80b", "-o", tmp_path / "t.bin", "--no-progress")
    assert r.rc == 2 and "lone surrogate" in r.err and r.err.count("\n") == 1


@pytest.mark.live  # runs llama.cpp
def test_a_trace_given_as_resume_is_one_line(model: Path, tmp_path: Path, run_cli) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    trace = tmp_path / "t.bin"
    assert run_cli("capture", model, "-p", "hello", "-n", "1", "-o", trace, "--no-progress").rc == 0
    before = trace.read_bytes()
    r = run_cli("profile", model, "--jsonl", data, "-o", trace, "--resume", "--no-progress")
    assert r.rc == 2 and "binary file" in r.err and "--resume" in r.err and r.err.count("\n") == 1
    assert trace.read_bytes() == before
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"format": "gguf-experts expert-stats", "n_layer": 10**9, "n_expert": 4, "state": {}}))
    r = run_cli("profile", model, "--jsonl", data, "-o", bad, "--resume", "--no-progress")
    assert r.rc == 2 and r.err.count("\n") == 1 and "Traceback" not in r.err


@pytest.mark.live  # runs llama.cpp
def test_a_prompt_that_cannot_fit_is_refused_before_tokenising(model: Path, tmp_path: Path, run_cli) -> None:
    """4 MB on one line: refused from its length in bytes (the tiny vocabulary's longest piece is 1 byte, so
    it needs >= 4M tokens), in well under the seconds llama_tokenize would take."""
    p = tmp_path / "big.txt"
    p.write_text("short prompt\n" + "word " * 800_000 + "\n")
    t0 = time.perf_counter()
    r = run_cli("capture", model, "--prompts", p, "-c", "256", "-o", tmp_path / "t.bin", "--no-progress")
    took = time.perf_counter() - t0
    assert r.rc == 2 and "prompt 1: 4000000 bytes need at least" in r.err and r.err.count("\n") == 1, r.err
    assert took < 10 and not (tmp_path / "t.bin").exists()
    # a prompt inside the byte bound is tokenised and judged by its tokens, as before (240 bytes, but each
    # space is "\u2581", three byte tokens in this vocabulary: 480 tokens)
    p.write_text("x " * 120 + "\n")
    r = run_cli("capture", model, "--prompts", p, "-c", "256", "-o", tmp_path / "t.bin", "--no-progress")
    assert r.rc == 2 and "tokens do not fit" in r.err
    # profile cuts a long record to the context instead of refusing it, also without tokenising all of it
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "word " * 800_000}) + "\n")
    t0 = time.perf_counter()
    r = run_cli("profile", model, "--jsonl", data, "-c", "64", "-o", tmp_path / "s.json", "--no-progress", "-f", "json")
    assert r.rc == 0 and time.perf_counter() - t0 < 30, r.err
    assert json.loads((tmp_path / "s.json").read_text())["meta"]["truncated_records"] == 1


@pytest.mark.live  # runs llama.cpp
def test_a_key_llama_cpp_checks_itself_gives_its_reason(model: Path, tmp_path: Path) -> None:
    """embedding_length is not ours to range-check (0 is a sound u32); llama.cpp refuses the shapes, and the
    one line carries its reason, not a metadata dump line that happens to contain 'unknown'."""
    bad = set_u32_in_place(model, tmp_path / "e0.gguf", f"{A}.embedding_length", 0)
    r = capture_cli(bad, tmp_path / "t.bin", "-p", "hello", "-n", "1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "error loading model" in r.stderr and "has wrong shape" in r.stderr and "kv " not in r.stderr


def test_the_library_driver_checks_the_metadata_too(model: Path, tmp_path: Path) -> None:
    """TracedLlama takes a fingerprint from its caller (the `run` tool computes its own): it still refuses a
    file llama.cpp would abort on (it did: exit 134) before llama.cpp sees it."""
    bad = set_u32_in_place(model, tmp_path / "u17.gguf", f"{A}.expert_used_count", 17)
    code = ("import sys\nfrom gguf_experts.errors import GGUFExpertsError\n"
            "from gguf_experts.gguf.fingerprint import ModelFingerprint\n"
            "from gguf_experts.trace.live.llama import MemorySink, TracedLlama\n"
            "try:\n    TracedLlama(sys.argv[1], MemorySink(), ModelFingerprint('qwen3moe', 4, 16, 4, 'x', 'y'))\n"
            "except GGUFExpertsError as e:\n    print(e)\n    sys.exit(2)\n")
    r = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "exceeds" in r.stdout, (r.returncode, r.stderr[-300:])
