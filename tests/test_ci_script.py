""".ci/run, read as text: it runs the README's test command verbatim, every `&&` chain is checked (set -e does
not stop at a failed command before the last of a chain), skips are failures, exit 5 is handled."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CI = (ROOT / ".ci" / "run").read_text()


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^Tests:\n\n    (.+)$", text, re.M)
    assert m, "README's set-up has no 'Tests:' command"
    return m.group(1)


def code_lines() -> list[str]:
    return [line.strip() for line in CI.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_the_readme_test_command_runs_verbatim() -> None:
    cmd = readme_test_command()
    assert "pytest -q" in cmd and "native_build.py install" in cmd
    assert any(cmd in line for line in code_lines()), cmd


def test_every_and_chain_is_checked() -> None:
    """A chain runs in a subshell whose status is tested: `if ! ( ... ); then` or `( ... ) || rc=$?`."""
    chains = [line for line in code_lines() if "&&" in line]
    assert chains
    for line in chains:
        assert re.fullmatch(r"if ! \(.*\); then", line) or re.fullmatch(r"\(.*\) \|\| rc=\$\?", line), line


def test_strict_mode_skips_fail_and_exit_5_is_a_failure() -> None:
    lines = code_lines()
    assert "set -euo pipefail" in lines
    assert "export GGUF_EXPERTS_REQUIRE_ALL=1" in lines
    assert any(re.search(r'"\$rc" -eq 5.*fail', line) for line in lines)
    assert "|| echo" not in CI  # no failure turned into a message
