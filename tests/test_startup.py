"""Start-up: the CLI imports only the command it runs, and ``dump`` writes CSV and JSON without pandas or
numpy (their imports were most of its run time), byte for byte what the pandas DataFrame (layout.byte_map,
the library's API) writes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_experts.cli import command_modules, main
from gguf_experts.gguf.reader import open_model
from gguf_experts.gguf.writer import TensorSpec, write_gguf
from gguf_experts.gguf.layout import byte_map
from gguf_experts.reporters.tabular import frame_records, frame_to_csv
from shapes import SHAPES

# Runs one CLI call in a fresh interpreter and prints the gguf_experts command modules and whether pandas
# got imported: sys.modules of this test process already holds everything.
_PROBE = ("import json, sys; from gguf_experts.cli import main; rc = main(sys.argv[1:]); "
          "print(json.dumps(['pandas' in sys.modules or 'numpy' in sys.modules, rc, "
          "sorted(m for m in sys.modules if m.startswith('gguf_experts.commands.'))]), file=sys.stderr)")


def probe(*argv: object) -> tuple[bool, list[str], int]:
    """(pandas or numpy imported, the command modules imported, exit code) of one CLI call."""
    r = subprocess.run([sys.executable, "-c", _PROBE, *map(str, argv)], capture_output=True, text=True,
                       timeout=120, check=False)
    heavy, rc, mods = json.loads(r.stderr.strip().splitlines()[-1])
    return heavy, mods, rc


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_dump_imports_no_pandas_numpy_or_other_commands(small_moe, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"map.{fmt}"
    heavy, mods, rc = probe("dump", small_moe(), "--split-experts", "--format", fmt, "-o", out)
    assert rc == 0 and out.stat().st_size > 0
    assert not heavy
    assert mods == ["gguf_experts.commands.dump"]


def test_every_command_module_is_named_by_its_file() -> None:
    import importlib

    names = command_modules()
    assert {"dump", "check-overlaps", "convert", "join-trace", "make-model", "cache-sim"} <= set(names)
    for name, module in names.items():
        mod = importlib.import_module(module)
        assert mod.NAME == name, f"{module}: NAME {mod.NAME!r}, but the CLI runs it as {name!r} (its file name)"


def test_overview_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in command_modules():
        assert f"    {name}" in out
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2 and "invalid choice: 'no-such-command'" in capsys.readouterr().err


def _tricky_model(tmp_path: Path) -> Path:
    """Tensor names that need CSV quoting (comma, quote) next to ordinary and per-expert ones."""
    ts = [TensorSpec.make("token_embd.weight", (64, 10), "F16"),
          TensorSpec.make('odd,name "quoted"', (32,), "F32"),
          TensorSpec.make("blk.0.ffn_up_exps.weight", (64, 32, 4), "Q8_0"),
          TensorSpec.make("blk.0.ffn_up_exps.bias", (32, 4), "F32")]
    kv = {"general.architecture": "qwen3moe", "qwen3moe.block_count": 1, "qwen3moe.expert_count": 4,
          "qwen3moe.expert_used_count": 2}
    return write_gguf(tmp_path / "tricky.gguf", kv, ts)


@pytest.mark.parametrize("split", [False, True])
def test_dump_csv_and_json_equal_the_dataframe(tmp_path: Path, run_cli, split: bool) -> None:
    paths = [_tricky_model(tmp_path), SHAPES["gpt-oss-20b"]().write(tmp_path)]
    for p in paths:
        df = byte_map(open_model(p), split_experts=split)
        argv = ["dump", p] + (["--split-experts"] if split else [])
        r = run_cli(*argv)
        assert r.rc == 0 and r.out == frame_to_csv(df)
        doc = json.loads(run_cli(*argv, "--format", "json").out)
        rows = frame_records(df)
        assert len(doc["tensors"]) == len(rows) > 0
        for t, row in zip(doc["tensors"], rows):
            assert (t["name"], t["base_name"], t["expert_id"], t["layer"], t["component"], t["type"],
                    t["shape"], t["file"], t["offset_start"], t["size_bytes"]) == \
                (row["name"], row["base_name"], row["expert_id"], row["layer"], row["component"],
                 row["ggml_type"], [row["ne0"], row["ne1"], row["ne2"], row["ne3"]], row["file"],
                 row["offset"], row["size"])
    assert '"odd,name ""quoted"""' in run_cli("dump", paths[0]).out
