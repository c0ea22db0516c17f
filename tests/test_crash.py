"""A death by signal is named as one (issue 16): `run` on a program that dies by SIGILL, and the preflight
child that keeps an in-process llama.cpp from taking Python down with it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_experts.crash import describe_signal
from gguf_experts.trace.live import preflight

SIGILL_C = r"""
#include <signal.h>
int main(void) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ volatile("ud2");  /* the instruction a CPU without the feature sees: an illegal one */
#endif
    raise(SIGILL);
    return 0;
}
"""


@pytest.fixture(scope="module")
def sigill_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.fail("no C compiler: install gcc (the `run` tracer needs one too)")
    d = tmp_path_factory.mktemp("sigill")
    (d / "die.c").write_text(SIGILL_C)
    subprocess.run([cc, "-O0", "-o", str(d / "die-by-sigill"), str(d / "die.c")], check=True, timeout=120)
    return d / "die-by-sigill"


@pytest.mark.live  # compiles C, runs the preload tracer
def test_run_names_sigill_and_what_to_do(sigill_program: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{sigill_program.parent}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run([sys.executable, "-m", "gguf_experts", "run", "-o", str(tmp_path / "t.bin"), "--",
                        sigill_program.name], capture_output=True, text=True, env=env, cwd="/")
    assert r.returncode == 128 + 4, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("gguf-experts:")]
    assert len(lines) == 1, r.stderr
    msg = lines[0]
    assert "die-by-sigill was killed by SIGILL" in msg and "illegal instruction" in msg
    assert "gguf_experts.native_build" in msg and "no trace written" in msg
    assert "decoded no Mixture-of-Experts" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "t.bin").exists()


def test_preflight_child_dying_by_sigill_is_an_error_not_a_crash() -> None:
    cmd = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
    with pytest.raises(preflight.LlamaCrashError) as e:
        preflight.check_child(cmd)
    assert "killed by SIGILL" in str(e.value) and "native_build install" in str(e.value)


def test_preflight_ignores_plain_failures() -> None:
    preflight.check_child([sys.executable, "-c", "raise SystemExit(3)"])  # the real run reports those


def test_other_signals_are_named_plainly() -> None:
    assert describe_signal(15, "llama-server") == "llama-server was killed by SIGTERM"
    assert "out-of-memory" in describe_signal(9, "llama-server")


@pytest.mark.live
def test_preflight_passes_on_this_host_and_is_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed llama.cpp runs a quantized model on this CPU (on an AMX host, only a build without ggml's
    AMX path does), and the result is kept per build."""
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("GGUF_EXPERTS_CACHE", str(tmp_path))
    monkeypatch.delenv(preflight.ENV_SKIP, raising=False)
    preflight.ensure_runs()
    marks = list((tmp_path / "preflight").glob("*.ok"))
    assert len(marks) == 1 and not list((tmp_path / "preflight").glob("*.gguf"))
