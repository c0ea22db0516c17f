"""prune on generated files (no llama.cpp run): every per-expert tensor layout, shards, alignment, refusals."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CliResult
from prune_check import assert_pruned_correctly

from gguf_experts.gguf.reader import ValueType, open_model, read_header
from gguf_experts.gguf.writer import TensorSpec, write_gguf, write_split
from gguf_experts.gguf.fingerprint import fingerprint
from gguf_experts.gguf.expert_ids import mapping_of

N_EXPERT, K, EMBD, FF = 8, 2, 64, 64


def _data(rng: np.random.Generator, spec: TensorSpec) -> TensorSpec:
    spec.data = rng.integers(0, 256, spec.nbytes, dtype=np.uint8).tobytes()
    return spec


def moe_model(path: Path, arch: str = "deepseek2", n_layer: int = 3, alignment: int = 32,
              shards: int = 1, extra_kv: dict[str, Any] | None = None) -> Path:
    """Layer 0 dense; MoE layers with router (+bias), exp_probs_b, fused gate_up (NVFP4 + .scale), down
    (Q8_0, gpt-oss-style .bias), shared experts: every per-expert layout prune must cut."""
    rng = np.random.default_rng(7)
    kv: dict[str, Any] = {"general.architecture": arch, "general.name": "layout-test",
                          f"{arch}.block_count": n_layer, f"{arch}.expert_count": N_EXPERT,
                          f"{arch}.expert_used_count": K, f"{arch}.leading_dense_block_count": 1,
                          "tokenizer.ggml.tokens": [f"t{i}" for i in range(200)], **(extra_kv or {})}
    t = [TensorSpec.make("token_embd.weight", (EMBD, 50), "F32")]
    for i in range(n_layer):
        p = f"blk.{i}."
        t.append(TensorSpec.make(p + "attn_q.weight", (EMBD, EMBD), "F16"))
        if i == 0:
            t.append(TensorSpec.make(p + "ffn_up.weight", (EMBD, FF), "F32"))
            continue
        t += [TensorSpec.make(p + "ffn_gate_inp.weight", (EMBD, N_EXPERT), "F32"),
              TensorSpec.make(p + "ffn_gate_inp.bias", (N_EXPERT,), "F32"),
              TensorSpec.make(p + "exp_probs_b.bias", (N_EXPERT,), "F32"),
              TensorSpec.make(p + "ffn_gate_up_exps.weight", (EMBD, 2 * FF, N_EXPERT), "NVFP4"),
              TensorSpec.make(p + "ffn_gate_up_exps.scale", (N_EXPERT,), "F32"),
              TensorSpec.make(p + "ffn_down_exps.weight", (FF, EMBD, N_EXPERT), "Q8_0"),
              TensorSpec.make(p + "ffn_down_exps.bias", (EMBD, N_EXPERT), "F32"),
              TensorSpec.make(p + "ffn_gate_inp_shexp.weight", (EMBD,), "F32"),
              TensorSpec.make(p + "ffn_up_shexp.weight", (EMBD, FF), "Q8_0")]
    t.append(TensorSpec.make("output.weight", (EMBD, 50), "F16"))
    t = [_data(rng, s) for s in t]
    if shards > 1:
        stem = path.name.removesuffix(".gguf")
        return write_split(path.parent, stem, kv, t, shards, alignment=alignment)[0]
    return write_gguf(path, kv, t, alignment=alignment)


def drops_csv(path: Path, drops: dict[int, list[int]]) -> Path:
    path.write_text("layer,expert\n" + "".join(f"{la},{e}\n" for la, es in drops.items() for e in es))
    return path


@pytest.mark.parametrize("alignment", [32, 64])
def test_every_per_expert_layout_is_cut(tmp_path: Path, run_cli: Callable[..., CliResult], alignment: int) -> None:
    src = moe_model(tmp_path / "src.gguf", alignment=alignment)
    plan = drops_csv(tmp_path / "drop.csv", {1: [0, 5, 6], 2: [1, 2, 7]})
    r = run_cli("prune", src, "--plan", plan, "-o", tmp_path / "out.gguf")
    assert r.rc == 0, r.err
    out = tmp_path / "out.gguf"
    ids = assert_pruned_correctly(src, out)
    assert ids[1].tolist() == [1, 2, 3, 4, 7] and ids[2].tolist() == [0, 3, 4, 5, 6]
    m = open_model(out)
    assert m.expert_count == 5 and m.alignment == alignment
    shapes = {t.name: t.ne for t in m.tensors}
    assert shapes["blk.1.ffn_gate_up_exps.weight"] == (EMBD, 2 * FF, 5)
    assert shapes["blk.1.ffn_down_exps.bias"] == (EMBD, 5)
    assert shapes["blk.1.ffn_gate_up_exps.scale"] == (5,)
    assert shapes["blk.2.exp_probs_b.bias"] == (5,) and shapes["blk.2.ffn_gate_inp.bias"] == (5,)
    assert shapes["blk.1.ffn_gate_inp.weight"] == (EMBD, 5)
    assert shapes["blk.1.ffn_up_shexp.weight"] == (EMBD, FF)  # shared experts untouched
    assert m.kv["tokenizer.ggml.tokens"].load()[199] == "t199"  # big arrays copied through
    mp = mapping_of(m.kv)
    assert mp is not None and mp.source == "src.gguf" and mp.source_n_expert == N_EXPERT
    assert mp.source_fp() == fingerprint(open_model(src))
    assert read_header(out).kv_types["deepseek2.expert_count"] == ValueType.UINT32


def test_shards_in_and_split_out(tmp_path: Path, run_cli: Callable[..., CliResult]) -> None:
    first = moe_model(tmp_path / "src.gguf", shards=3, alignment=64)
    second = first.with_name(first.name.replace("00001-of", "00002-of"))
    plan = drops_csv(tmp_path / "drop.csv", {1: [3], 2: [4]})
    r = run_cli("prune", second, "--plan", plan, "-o", tmp_path / "out.gguf", "--split-max-size", "200K")
    assert r.rc == 0, r.err
    outs = sorted(tmp_path.glob("out-*-of-*.gguf"))
    assert len(outs) > 1 and not (tmp_path / "out.gguf").exists()
    for p in outs:
        h = read_header(p)
        assert h.alignment == 64 and h.get("split.count") == len(outs)
        assert sum(t.nbytes for t in h.tensors) <= 200_000 or len(h.tensors) == 1
    assert_pruned_correctly(first, outs[1])
    m = open_model(outs[0])
    assert m.expert_count == 7 and len(m.tensors) == len(open_model(first).tensors)
    assert not list(tmp_path.glob(".*.tmp"))


def _refuse(r: CliResult, *words: str) -> None:
    assert r.rc == 2, r.out + r.err
    line = r.err.strip()
    assert "\n" not in line and "Traceback" not in r.err, r.err
    for w in words:
        assert w in line, line


def test_refusals(tmp_path: Path, run_cli: Callable[..., CliResult]) -> None:
    src = moe_model(tmp_path / "src.gguf")
    out = tmp_path / "out.gguf"
    _refuse(run_cli("prune", src, "--plan", drops_csv(tmp_path / "a.csv", {1: [0], 2: [0, 1]}), "-o", out),
            "different numbers of experts per layer", "layer 1: 1", "layer 2: 2", "same number")
    _refuse(run_cli("prune", src, "--plan", drops_csv(tmp_path / "b.csv", {1: range(7), 2: range(7)}), "-o", out),
            "fewer than expert_used_count 2", "keep at least 2")
    _refuse(run_cli("prune", src, "--plan", drops_csv(tmp_path / "c.csv", {5: [0]}), "-o", out),
            "layer 5 is not a MoE layer")
    _refuse(run_cli("prune", src, "--plan", drops_csv(tmp_path / "d.csv", {1: [8], 2: [0]}), "-o", out),
            "expert 8 does not exist")
    other = moe_model(tmp_path / "other.gguf", n_layer=4)
    stats = {"format": "gguf-experts expert_stats", "n_layer": 3, "n_expert": N_EXPERT,
             "meta": {"fingerprint": fingerprint(open_model(other)).to_dict()},
             "layers": [{"layer": la, "activation_counts": [1] * N_EXPERT, "reap": list(range(N_EXPERT))}
                        for la in (1, 2)]}
    (tmp_path / "s.json").write_text(json.dumps(stats))
    _refuse(run_cli("prune", src, "--plan", tmp_path / "s.json", "--keep", "4", "-o", out),
            "another model", "fingerprint")
    _refuse(run_cli("prune", src, "--plan", drops_csv(tmp_path / "e.csv", {1: [0], 2: [0]}), "-o", src),
            "never written")
    _refuse(run_cli("prune", src, "-o", out), "--plan")
    from gguf_experts.trace.writer import TraceWriter

    for name, model in (("other.bin", other), ("own.bin", src)):
        with TraceWriter(tmp_path / name, fingerprint(open_model(model)), {}) as w:
            w.write(0, 0, 1, np.arange(4), np.zeros(4, np.int32), np.tile(np.arange(K, dtype=np.int32), (4, 1)), None)
    _refuse(run_cli("prune", src, "--by", "frequency", "--trace", tmp_path / "other.bin", "--keep", "4", "-o", out),
            "was not captured from")
    _refuse(run_cli("prune", src, "--by", "reap", "--trace", tmp_path / "own.bin", "--keep", "4", "-o", out),
            "no REAP scores", "gguf-experts profile")
    _refuse(run_cli("prune", src, "--by", "frequency", "--trace", tmp_path / "own.bin", "--keep", "4", "-o", out),
            "no data for MoE layer 2")
    assert not out.exists()


def test_llama_expert_profile_json_and_dry_run(tmp_path: Path, run_cli: Callable[..., CliResult]) -> None:
    src = moe_model(tmp_path / "src.gguf")
    reap = {str(la): {"total_tokens": 100, "activation_counts": [10] * N_EXPERT,
                      "activation_frequency": [0.1] * N_EXPERT, "avg_gate_weight": [0.2] * N_EXPERT,
                      "ean_mean": [1.0] * N_EXPERT, "reap": [float((e * 3 + la) % N_EXPERT) for e in range(N_EXPERT)],
                      "never_activated": 0} for la in (1, 2)}
    (tmp_path / "reap.json").write_text(json.dumps(reap))
    r = run_cli("prune", src, "--plan", tmp_path / "reap.json", "--keep-fraction", "0.5", "--dry-run",
                "--format", "json")
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    assert doc["experts_after"] == 4 and doc["model_bytes_after"] < doc["model_bytes_before"]
    for row in doc["layers"]:
        la = row["layer"]
        best = sorted(range(N_EXPERT), key=lambda e: -reap[str(la)]["reap"][e])[:4]
        assert row["kept_ids"] == " ".join(map(str, sorted(best)))
    assert not list(tmp_path.glob("*.gguf"))[1:]  # nothing written


def test_group_limited_routing(tmp_path: Path, run_cli: Callable[..., CliResult]) -> None:
    groups = {"deepseek2.expert_group_count": 2, "deepseek2.expert_group_used_count": 1}
    src = moe_model(tmp_path / "src.gguf", extra_kv=groups)
    _refuse(run_cli("prune", src, "--plan", drops_csv(tmp_path / "a.csv", {1: [0, 1], 2: [0, 1]}), "-o",
                    tmp_path / "o.gguf"), "same number of experts kept in every group")
    r = run_cli("prune", src, "--plan", drops_csv(tmp_path / "b.csv", {1: [0, 7], 2: [3, 4]}), "-o",
                tmp_path / "o.gguf")
    assert r.rc == 0, r.err
    assert "group selection" in r.err  # the warning that selection can still change
    assert_pruned_correctly(src, tmp_path / "o.gguf")


def test_progress_bar_in_a_terminal(tmp_path: Path) -> None:
    """Run in a real pty (stderr a TTY): the progress bar is drawn and the command succeeds."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    src = moe_model(tmp_path / "src.gguf")
    plan = drops_csv(tmp_path / "drop.csv", {1: [0], 2: [1]})
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    try:
        p = subprocess.run([sys.executable, "-m", "gguf_experts", "prune", str(src), "--plan", str(plan), "-o",
                            str(tmp_path / "out.gguf"), "-f", "table"],  # stdout is a pipe: ask for the table
                           check=False, stdin=slave, stdout=subprocess.PIPE, stderr=slave, timeout=120)
        os.close(slave)
        slave = -1
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child side is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert p.returncode == 0, seen.decode(errors="replace")
    assert b"prune" in seen and b"100%" in seen, seen
    assert b"wrote" in p.stdout
    assert_pruned_correctly(src, tmp_path / "out.gguf")


def test_legacy_per_expert_tensors_renumbered(tmp_path: Path, run_cli: Callable[..., CliResult]) -> None:
    """Old Mixtral files hold one 2-D tensor per expert (blk.L.ffn_gate.E.weight): dropped ones go, kept ones
    are renumbered to their place among the kept, bytes unchanged."""
    import ggml_ref

    rng = np.random.default_rng(3)
    kv = {"general.architecture": "llama", "general.name": "legacy", "llama.block_count": 1,
          "llama.expert_count": 4, "llama.expert_used_count": 2}
    t = [TensorSpec.make("token_embd.weight", (EMBD, 50), "F32"),
         TensorSpec.make("blk.0.ffn_gate_inp.weight", (EMBD, 4), "F32")]
    for e in range(4):
        t += [TensorSpec.make(f"blk.0.{f}.{e}.weight", (EMBD, FF) if f != "ffn_down" else (FF, EMBD), "Q8_0")
              for f in ("ffn_gate", "ffn_down", "ffn_up")]
    src = write_gguf(tmp_path / "src.gguf", kv, [_data(rng, s) for s in t])
    r = run_cli("prune", src, "--plan", drops_csv(tmp_path / "d.csv", {0: [1]}), "-o", tmp_path / "out.gguf")
    assert r.rc == 0, r.err
    out = open_model(tmp_path / "out.gguf")
    ggml_ref.assert_matches_ggml(out.shards[0])
    names = [x.name for x in out.tensors]
    assert "blk.0.ffn_up.3.weight" not in names and out.expert_count == 3
    s = open_model(src)
    src_by = {x.name: x for x in s.tensors}
    for new, old in ((0, 0), (1, 2), (2, 3)):
        for f in ("ffn_gate", "ffn_down", "ffn_up"):
            a = src_by[f"blk.0.{f}.{old}.weight"]
            b = next(x for x in out.tensors if x.name == f"blk.0.{f}.{new}.weight")
            assert Path(b.file).read_bytes()[b.offset:b.offset + b.nbytes] == \
                Path(a.file).read_bytes()[a.offset:a.offset + a.nbytes]


def test_prune_a_pruned_model_keeps_original_ids(tmp_path: Path, run_cli: Callable[..., CliResult]) -> None:
    src = moe_model(tmp_path / "src.gguf")
    assert run_cli("prune", src, "--plan", drops_csv(tmp_path / "a.csv", {1: [0, 1], 2: [6, 7]}), "-o",
                   tmp_path / "p1.gguf").rc == 0
    # p1's experts 0..5 are the source's 2..7 (layer 1) and 0..5 (layer 2); drop p1's 0 and 5
    r = run_cli("prune", tmp_path / "p1.gguf", "--plan", drops_csv(tmp_path / "b.csv", {1: [0, 5], 2: [0, 5]}),
                "-o", tmp_path / "p2.gguf")
    assert r.rc == 0, r.err
    m = mapping_of(open_model(tmp_path / "p2.gguf").kv)
    assert m is not None and m.source == "src.gguf" and m.source_n_expert == N_EXPERT
    assert m.original_ids[1].tolist() == [3, 4, 5, 6] and m.original_ids[2].tolist() == [1, 2, 3, 4]
    assert m.source_fp() == fingerprint(open_model(src))
    assert_pruned_correctly(src, tmp_path / "p2.gguf")  # slices compared with the first source through the mapping


@pytest.mark.parametrize(("arch", "extra", "warned"), [
    ("qwen3moe", {}, False), ("llama", {}, False), ("gpt-oss", {}, False), ("qwen2moe", {}, True),
    ("deepseek2", {"deepseek2.expert_gating_func": 2, "deepseek2.expert_weights_norm": True}, False),
    ("deepseek2", {"deepseek2.expert_gating_func": 1}, True),
    ("deepseek2", {"deepseek2.expert_gating_func": 2, "deepseek2.expert_weights_norm": True,
                   "deepseek2.expert_group_count": 2, "deepseek2.expert_group_used_count": 1}, True),
    ("mixtral-like-unknown", {}, True)])
def test_routing_semantics_stated(tmp_path: Path, run_cli: Callable[..., CliResult], arch: str,
                                  extra: dict[str, Any], warned: bool) -> None:
    src = moe_model(tmp_path / "src.gguf", arch=arch, extra_kv=extra)
    r = run_cli("prune", src, "--plan", drops_csv(tmp_path / "a.csv", {1: [0, 7], 2: [0, 7]}), "-o",
                tmp_path / "o.gguf")
    assert r.rc == 0, r.err
    assert ("warning:" in r.err) == warned, r.err
    routing = open_model(tmp_path / "o.gguf").kv["gguf_experts.prune.routing"]
    assert routing.startswith(arch)
    if not warned:
        assert "same experts with the same gate weights" in routing or "unchanged" in routing


def test_big_endian_source(tmp_path: Path, run_cli: Callable[..., CliResult]) -> None:
    rng = np.random.default_rng(1)
    kv = {"general.architecture": "qwen3moe", "qwen3moe.block_count": 1, "qwen3moe.expert_count": 4,
          "qwen3moe.expert_used_count": 2, "tokenizer.ggml.scores": np.arange(100, dtype=np.float32)}
    t = [_data(rng, TensorSpec.make("blk.0.ffn_gate_inp.weight", (EMBD, 4), "F32")),
         _data(rng, TensorSpec.make("blk.0.ffn_up_exps.weight", (EMBD, FF, 4), "Q8_0"))]
    src = write_gguf(tmp_path / "be.gguf", kv, t, byteorder=">")
    assert run_cli("prune", src, "--plan", drops_csv(tmp_path / "a.csv", {0: [2]}), "-o", tmp_path / "o.gguf").rc == 0
    h = read_header(tmp_path / "o.gguf")
    assert h.byteorder == ">" and h.kv["qwen3moe.expert_count"] == 3
    assert list(h.kv["tokenizer.ggml.scores"].load()[:3]) == [0.0, 1.0, 2.0]
    assert h.kv["gguf_experts.prune.original_ids.0"] == [0, 1, 3]
    up = next(x for x in h.tensors if x.name == "blk.0.ffn_up_exps.weight")
    slab = up.nbytes // 3
    raw = (tmp_path / "o.gguf").read_bytes()[up.offset:up.offset + up.nbytes]
    src_raw = t[1].data
    assert raw == src_raw[:2 * slab] + src_raw[3 * slab:4 * slab]  # type: ignore[index]


def test_report_of_a_pruned_models_trace_in_a_browser(tmp_path: Path, run_cli: Callable[..., CliResult]) -> None:
    """report --model PRUNED: heat in original ids, the strip maps each slot of a tensor to its original expert."""
    from chromium_cdp import render_page

    from gguf_experts.reporters.screenshot import find_chromium

    if find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    from test_report import tiny_model
    from test_report_browser import PROBE

    from gguf_experts.report import build_report, write_report
    from gguf_experts.trace.writer import TraceWriter

    src = tiny_model(tmp_path / "m.gguf")
    r = run_cli("prune", src, "--plan", drops_csv(tmp_path / "d.csv", {1: [0, 3], 2: [2, 5]}), "-o",
                tmp_path / "p.gguf")
    assert r.rc == 0, r.err
    pruned = tmp_path / "p.gguf"
    rng = np.random.default_rng(0)
    with TraceWriter(tmp_path / "t.bin", fingerprint(open_model(pruned)), {}) as w:  # a trace of the pruned model
        for layer in (1, 2):
            e = np.argsort(rng.random((30, 6)), axis=1)[:, :2].astype(np.int32)
            w.write(0, 0, layer, np.arange(30), np.zeros(30, np.int32), e, None)
    inp = build_report([tmp_path / "t.bin"], pruned)
    ex = inp.heat.experts
    assert set(ex[ex["activations"] > 0]["expert"][ex["layer"] == 1]) == {1, 2, 4, 5, 6, 7}  # original ids
    write_report(tmp_path / "r.html", inp)
    res = render_page(tmp_path / "r.html", probe=PROBE, width=1280, height=900, screenshot=False)
    assert res.rendered and res.errors == [], res.errors
    tip = res.probe["heatTip"]  # layer 1, expert 5 (kept, slot 3 of the pruned tensors)
    assert tip.startswith("layer 1  expert 5") and "blk.1.ffn_down_exps.weight[3]" in tip, tip


def test_write_failure_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A write that fails midway (here: a file size limit, as a full disk would) gives exit 2, one line on
    stderr, no temp file and no output."""
    import subprocess
    import sys

    src = moe_model(tmp_path / "src.gguf")
    plan = drops_csv(tmp_path / "drop.csv", {1: [0], 2: [1]})
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
            "from gguf_experts.cli import main; sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, "prune", str(src), "--plan", str(plan), "-o",
                        str(tmp_path / "out.gguf")], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2, p.stderr
    lines = [x for x in p.stderr.splitlines() if "warning" not in x]
    assert len(lines) == 1 and "writing failed" in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["drop.csv", "src.gguf"]
