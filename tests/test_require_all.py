"""The skip guard (tests/require_all.py): under GGUF_EXPERTS_REQUIRE_ALL=1 every skip fails, at collection too,
except a test marked platform_skip with a reason. Runs a real pytest on a small test tree in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

TESTS = {
    "test_collect_skip.py": "import pytest\npytest.importorskip('no_such_module_for_gguf_experts')\n"
                            "def test_never() -> None:\n    pass\n",
    "test_mixed.py": (
        "import pytest\n"
        "def test_passes() -> None:\n    assert True\n"
        "def test_skips_in_body() -> None:\n    pytest.skip('llama-server is not built')\n"
        "@pytest.mark.skipif(True, reason='chromium is not installed')\n"
        "def test_skipif_mark() -> None:\n    pass\n"
        "@pytest.mark.platform_skip('x86-64 only: the flags are x86 flags')\n"
        "def test_platform() -> None:\n    pytest.skip('not x86-64')\n"
        "@pytest.mark.xfail(reason='known', strict=True)\n"
        "def test_xfail() -> None:\n    assert False\n"),
}


def run_tree(tmp_path: Path, require: str | None, only: str | None = None) -> tuple[int, dict[str, str]]:
    for name, text in TESTS.items():
        if only in (None, name):
            (tmp_path / name).write_text(text)
    report = tmp_path / "outcomes.json"
    (tmp_path / "conftest.py").write_text(
        "import json\nout = {}\n"
        "def pytest_runtest_logreport(report):\n"
        "    if report.when == 'call' or report.outcome != 'passed':\n        out[report.nodeid] = report.outcome\n"
        "def pytest_collectreport(report):\n"
        "    if report.outcome != 'passed':\n        out[report.nodeid] = report.outcome\n"
        f"def pytest_sessionfinish(session):\n    open({str(report)!r}, 'w').write(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "GGUF_EXPERTS_REQUIRE_ALL"}
    if require is not None:
        env["GGUF_EXPERTS_REQUIRE_ALL"] = require
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "require_all", "-p", "no:cacheprovider",
                        "-p", "no:timeout", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    return r.returncode, json.loads(report.read_text())


def test_without_the_variable_skips_stay_skips(tmp_path: Path) -> None:
    rc, out = run_tree(tmp_path, None)
    assert rc == 0, out
    assert out == {"test_collect_skip.py": "skipped", "test_mixed.py::test_skips_in_body": "skipped",
                   "test_mixed.py::test_skipif_mark": "skipped", "test_mixed.py::test_platform": "skipped",
                   "test_mixed.py::test_passes": "passed", "test_mixed.py::test_xfail": "skipped"}


@pytest.mark.parametrize("value", ["1", "yes"])
def test_with_the_variable_every_skip_fails_but_platform_skips(tmp_path: Path, value: str) -> None:
    rc, out = run_tree(tmp_path, value, only="test_mixed.py")
    assert rc == 1, out
    assert out == {"test_mixed.py::test_skips_in_body": "failed",
                   "test_mixed.py::test_skipif_mark": "failed", "test_mixed.py::test_platform": "skipped",
                   "test_mixed.py::test_passes": "passed", "test_mixed.py::test_xfail": "skipped"}


def test_with_the_variable_a_module_level_importorskip_fails_collection(tmp_path: Path) -> None:
    """pytest then stops before running anything (exit 2, "error during collection"): CI is red."""
    rc, out = run_tree(tmp_path, "1", only="test_collect_skip.py")
    assert rc == 2 and out == {"test_collect_skip.py": "failed"}, (rc, out)


def test_zero_turns_it_off(tmp_path: Path) -> None:
    rc, _ = run_tree(tmp_path, "0")
    assert rc == 0


def test_a_platform_skip_without_a_reason_is_refused(tmp_path: Path) -> None:
    (tmp_path / "test_bare.py").write_text("import pytest\n@pytest.mark.platform_skip\n"
                                           "def test_x() -> None:\n    pytest.skip('no reason given')\n")
    env = {**os.environ, "GGUF_EXPERTS_REQUIRE_ALL": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "require_all", "-p", "no:cacheprovider",
                        "-p", "no:timeout", str(tmp_path / "test_bare.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "needs a stated reason" in r.stdout + r.stderr, r.stdout
