"""Shared, generic fixtures: run the CLI in-process, and write a small MoE GGUF of any type mix."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ggml_ref
import pytest

from gguf_experts.cli import main
from gguf_experts.gguf.reader import read_header
from gguf_experts.gguf.writer import TensorSpec, write_gguf

#: every skip is a failure under GGUF_EXPERTS_REQUIRE_ALL=1 (.ci/run), unless marked platform_skip
pytest_plugins = ["require_all"]


@dataclass
class CliResult:
    rc: int
    out: str
    err: str


def sparse_moe_model(path: Path, n_layer: int = 3, n_expert: int = 8, k: int = 2, n_embd: int = 64,
                     n_ff: int = 32, down_type: str = "Q8_0", name: str = "tiny-test") -> Path:
    """A sparse qwen3moe-shaped GGUF: layer 0 dense, the others MoE (F16 gate/up, down_type down: slices of
    two sizes)."""
    kv = {"general.architecture": "qwen3moe", "general.name": name, "qwen3moe.block_count": n_layer,
          "qwen3moe.expert_count": n_expert, "qwen3moe.expert_used_count": k}
    t = [TensorSpec.make("token_embd.weight", (n_embd, 100), "F32")]
    for layer in range(n_layer):
        t.append(TensorSpec.make(f"blk.{layer}.attn_q.weight", (n_embd, n_embd), "F32"))
        if layer == 0:
            t.append(TensorSpec.make("blk.0.ffn_up.weight", (n_embd, n_ff), "F32"))
            continue
        t.append(TensorSpec.make(f"blk.{layer}.ffn_gate_inp.weight", (n_embd, n_expert), "F32"))
        t.append(TensorSpec.make(f"blk.{layer}.ffn_gate_exps.weight", (n_embd, n_ff, n_expert), "F16"))
        t.append(TensorSpec.make(f"blk.{layer}.ffn_up_exps.weight", (n_embd, n_ff, n_expert), "F16"))
        t.append(TensorSpec.make(f"blk.{layer}.ffn_down_exps.weight", (n_ff, n_embd, n_expert), down_type))
    return write_gguf(path, kv, t)


@pytest.fixture(scope="session")
def llama_bin() -> Path:
    """llama.cpp's own programs (llama-server, llama-cli, llama-imatrix, llama-bench), built by
    scripts/build_llama_tools.sh from the llama.cpp that llama-cpp-python vendors, with the same flags as its
    wheel; the script waits for a build under way and returns at once when the binaries exist."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_llama_tools.sh"
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={**os.environ, "PY": sys.executable},
                       timeout=3600)
    if r.returncode != 0:
        pytest.fail(f"scripts/build_llama_tools.sh failed: {r.stderr[-2000:]}")
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Call gguf_experts.cli.main([...]) in-process and return its exit code, stdout and stderr (a bad option
    exits through argparse's SystemExit, as the console script does: its code is the exit code)."""
    def run(*argv: Any) -> CliResult:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        cap = capsys.readouterr()
        return CliResult(rc, cap.out, cap.err)
    return run


def small_moe_tensors(n_layer: int = 2, n_expert: int = 4, n_embd: int = 64, n_ff: int = 32,
                      exp_type: str = "Q8_0", down_type: str = "Q8_0") -> list[TensorSpec]:
    """A qwen3moe-like tensor list: token_embd, per layer attention + router + gate/up/down experts."""
    t = [TensorSpec.make("token_embd.weight", (n_embd, 50), "F32")]
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [TensorSpec.make(p + "attn_norm.weight", (n_embd,), "F32"),
              TensorSpec.make(p + "attn_q.weight", (n_embd, n_embd), "F16"),
              TensorSpec.make(p + "ffn_gate_inp.weight", (n_embd, n_expert), "F32"),
              TensorSpec.make(p + "ffn_gate_exps.weight", (n_embd, n_ff, n_expert), exp_type),
              TensorSpec.make(p + "ffn_up_exps.weight", (n_embd, n_ff, n_expert), exp_type),
              TensorSpec.make(p + "ffn_down_exps.weight", (n_ff, n_embd, n_expert), down_type)]
    t += [TensorSpec.make("output_norm.weight", (n_embd,), "F32"),
          TensorSpec.make("output.weight", (n_embd, 50), "F16")]
    return t


def small_moe_kv(n_layer: int = 2, n_expert: int = 4, k: int = 2, arch: str = "qwen3moe") -> dict[str, Any]:
    return {"general.architecture": arch, "general.name": "small-moe", f"{arch}.block_count": n_layer,
            f"{arch}.expert_count": n_expert, f"{arch}.expert_used_count": k,
            f"{arch}.expert_feed_forward_length": 32}


@pytest.fixture
def small_moe(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write a small MoE GGUF (sparse data) into tmp_path; keyword args go to write_gguf.
    Little-endian files are also read by libggml (where llama_cpp is installed) and must agree with us."""
    def make(name: str = "small.gguf", n_layer: int = 2, n_expert: int = 4, **kw: Any) -> Path:
        p = write_gguf(tmp_path / name, small_moe_kv(n_layer, n_expert), small_moe_tensors(n_layer, n_expert), **kw)
        if kw.get("byteorder", "<") == "<" and ggml_ref.installed():
            ggml_ref.assert_matches_ggml(read_header(p))
        return p
    return make
