"""The long commands as a person runs them: in a real terminal (a pseudo-terminal from Python's ``pty``).

pytest's stderr is not a terminal, so a command that crashes only when its progress bar is drawn passes
every in-process test (0.1.0's ``capture`` did exactly that: ``tqdm(total=None)`` has no truth value).
Here stdin, stdout and stderr are a pty, the progress bar is drawn, and Ctrl-C is typed into the
terminal (the line discipline turns ^C into SIGINT for the foreground process group).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import select
import signal
import struct
import sys
import termios
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [live] extra) is not installed")

from gguf_experts.demo import tinymodel
from gguf_experts.trace.format import PHASE_DECODE
from gguf_experts.trace.reader import read_trace

pytestmark = [pytest.mark.live, pytest.mark.slow]


@dataclass
class TtyRun:
    rc: int
    out: str  # everything the terminal showed (stdout and stderr together, as a person sees it)


def run_in_pty(argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 180,
               ctrl_c_when: Callable[[str], bool] | None = None) -> TtyRun:
    """Run ``python -m gguf_experts ARGV`` with a pty as its controlling terminal (80x24); type ^C into it
    once ``ctrl_c_when(screen so far)`` holds."""
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is stdin/stdout/stderr and the controlling terminal
        try:
            os.chdir(cwd)
            os.execvpe(sys.executable, [sys.executable, "-m", "gguf_experts", *argv],
                       {**os.environ, "COLUMNS": "80", "LINES": "24", **(env or {})})
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    buf = bytearray()
    sent = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if ctrl_c_when is not None and not sent and ctrl_c_when(buf.decode("utf-8", "replace")):
                os.write(fd, b"\x03")
                sent = True
            r, _, _ = select.select([fd], [], [], 0.05)
            if not r:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError as e:  # EIO: the child closed the terminal (exited)
                if e.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            buf += data
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"{argv[0]} did not finish in {timeout} s under a pty:\n{buf.decode(errors='replace')}")
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return TtyRun(os.waitstatus_to_exitcode(status), buf.decode("utf-8", "replace"))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.make_tiny_model(tmp_path_factory.mktemp("tty") / "m.gguf", seed=3)


def no_crash(res: TtyRun) -> None:
    assert "Traceback" not in res.out and "Error" not in res.out.replace("gguf-experts: error", ""), res.out


def test_capture_prompt_draws_a_progress_bar(tmp_path: Path, model: Path) -> None:
    out = tmp_path / "t.bin"
    res = run_in_pty(["capture", str(model), "--prompt", "Once upon a time", "-n", "6", "--ignore-eos",
                      "-t", "2", "-o", str(out)], tmp_path)
    no_crash(res)
    assert res.rc == 0, res.out
    assert "capture" in res.out and "tok" in res.out  # the bar was drawn on the terminal
    assert "wrote" in res.out and str(out) in res.out  # a table for a person, not CSV
    assert (read_trace(out).phase == PHASE_DECODE).any()


def test_capture_prompts_file_and_weights(tmp_path: Path, model: Path) -> None:
    pf = tmp_path / "p.txt"
    pf.write_text("first prompt\nsecond prompt\n")
    out = tmp_path / "t.bin"
    res = run_in_pty(["capture", str(model), "--prompts", str(pf), "-n", "3", "--ignore-eos", "--weights",
                      "-t", "2", "-o", str(out)], tmp_path)
    no_crash(res)
    assert res.rc == 0 and "2 sequences" in res.out, res.out
    tr = read_trace(out)
    assert tr.weights is not None and sorted(set(tr.seq.tolist())) == [0, 1]


def test_capture_jsonl(tmp_path: Path, model: Path) -> None:
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"prompt": "Say hi. ", "response": "Hi!"}) + "\n"
                  + json.dumps({"text": "plain text"}) + "\n")
    out = tmp_path / "t.bin"
    res = run_in_pty(["capture", str(model), "--jsonl", str(jl), "-t", "2", "-o", str(out)], tmp_path)
    no_crash(res)
    assert res.rc == 0 and "2 sequences" in res.out, res.out


def test_capture_ctrl_c_leaves_a_complete_trace(tmp_path: Path, model: Path) -> None:
    out = tmp_path / "t.bin"

    def long_enough(_: str) -> bool:
        return out.exists() and out.stat().st_size > 20000

    res = run_in_pty(["capture", str(model), "-p", "go", "-n", "200000", "-c", "200100", "--ignore-eos",
                      "-t", "1", "-o", str(out)], tmp_path, ctrl_c_when=long_enough, timeout=60)
    no_crash(res)
    assert res.rc == 130, res.out
    assert "interrupted" in res.out
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torn record would warn (TraceRecoveryWarning)
        tr = read_trace(out)
    assert len(tr) > 100 and (tr.phase == PHASE_DECODE).sum() % tr.header.fingerprint.n_layer == 0


def test_profile(tmp_path: Path, model: Path) -> None:
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"prompt": f"Question {i}? ", "response": "An answer."}) + "\n"
                          for i in range(4)))
    out = tmp_path / "s.json"
    res = run_in_pty(["profile", str(model), "--jsonl", str(jl), "-t", "2", "-o", str(out)], tmp_path)
    no_crash(res)
    assert res.rc == 0, res.out
    assert "profile" in res.out and "rec" in res.out  # the bar
    assert json.loads(out.read_text())["records"] == 4


def test_demo(tmp_path: Path) -> None:
    res = run_in_pty(["demo", "-n", "2", "-t", "2"], tmp_path, env={"GGUF_EXPERTS_CACHE": str(tmp_path / "c")},
                     timeout=300)
    no_crash(res)
    assert res.rc == 0, res.out
    assert "hottest experts" in res.out  # the table, since the terminal is a person
    assert (tmp_path / "gguf-experts-demo" / "demo.bin").is_file()
    assert (tmp_path / "gguf-experts-demo" / "report.html").is_file()


def test_piped_runs_stay_quiet(tmp_path: Path, model: Path) -> None:
    """The same run with stdout and stderr piped: no progress bar, no escape codes; the summary is CSV."""
    import subprocess

    out = tmp_path / "t.bin"
    r = subprocess.run([sys.executable, "-m", "gguf_experts", "capture", str(model), "-p", "Once upon a time",
                        "-n", "4", "--ignore-eos", "-t", "2", "-o", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("trace,model,sequences,tokens") and "\r" not in r.stdout + r.stderr
