"""Where outputs go (gguf_experts.atomic, the one mechanism): devices and FIFOs are written into, symlinks are
followed, bad directories are named, failed or killed writes leave no temp file, inputs and models are never
replaced, and a report's files appear together or not at all. Each case builds its own input."""
from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from waits import read_until

from gguf_experts.gguf.reader import open_model
from gguf_experts.gguf.fingerprint import fingerprint
from gguf_experts.trace.writer import TraceWriter

from conftest import sparse_moe_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def gx(*argv: object, **kw: object) -> subprocess.CompletedProcess[str]:
    """The CLI as a separate process (for what in-process calls cannot show: limits, signals, users)."""
    kw.setdefault("cwd", "/")  # not the checkout: the installed package, whatever the test runner's directory
    return subprocess.run([sys.executable, "-m", "gguf_experts", *map(str, argv)], capture_output=True, text=True,
                          timeout=120, **kw)  # type: ignore[call-overload]


def temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return sparse_moe_model(tmp_path / "m.gguf")


@pytest.fixture
def trace(tmp_path: Path, model: Path) -> Path:
    p = tmp_path / "t.bin"
    with TraceWriter(p, fingerprint(open_model(model))) as w:
        for pos in range(6):
            w.write(0, 1, 1, np.array([pos]), np.array([40 + pos]), np.array([[pos % 8, (pos + 3) % 8]]))
    return p


def test_fifo_is_written_into_not_replaced(tmp_path: Path, model: Path, run_cli) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    r = run_cli("dump", model, "-o", fifo)
    reader.join(timeout=30)
    assert r.rc == 0, r.err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still a FIFO, not a regular file
    assert got and got[0].decode().startswith("name,base_name,expert_id") and "blk.1.ffn_down_exps" in got[0].decode()
    assert temps(tmp_path) == []


def test_terminal_device_is_written_into(tmp_path: Path, model: Path, run_cli) -> None:
    """A character device as -o (like /dev/stdout at a terminal): a pty's slave end."""
    master, slave = os.openpty()
    try:
        dev = os.ttyname(slave)
        before = os.stat(dev)
        r = run_cli("dump", model, "--format", "json", "-o", dev)
        assert r.rc == 0, r.err
        after = os.stat(dev)
        assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev  # the same device, not a file
        data = b""
        while b'"tensors"' not in data:
            data += os.read(master, 65536)
        assert data.lstrip().startswith(b"{")
    finally:
        os.close(master)
        os.close(slave)


def test_symlink_target_is_replaced_in_its_directory(tmp_path: Path, model: Path, run_cli) -> None:
    real_dir, link_dir = tmp_path / "real", tmp_path / "links"
    real_dir.mkdir()
    link_dir.mkdir()
    target = real_dir / "map.csv"
    target.write_text("old\n")
    link = link_dir / "map.csv"
    link.symlink_to(target)
    r = run_cli("dump", model, "-o", link)
    assert r.rc == 0, r.err
    assert link.is_symlink() and os.readlink(link) == str(target)  # the link stays a link
    assert target.read_text().startswith("name,base_name")  # its target got the output
    assert temps(real_dir) == [] and temps(link_dir) == []
    dangling = link_dir / "new.csv"
    dangling.symlink_to(real_dir / "new.csv")
    assert run_cli("dump", model, "-o", dangling).rc == 0
    assert dangling.is_symlink() and (real_dir / "new.csv").read_text().startswith("name,")


def test_missing_directory_is_named(tmp_path: Path, model: Path, run_cli) -> None:
    out = tmp_path / "no" / "such" / "map.csv"
    r = run_cli("dump", model, "-o", out)
    assert r.rc == 2 and r.err.count("\n") == 1
    assert f"directory {tmp_path / 'no' / 'such'} does not exist" in r.err and ".tmp" not in r.err
    r = run_cli("dump", model, "-o", tmp_path)
    assert r.rc == 2 and "is a directory" in r.err


def test_read_only_directory_is_named(model: Path) -> None:
    """Run as an unprivileged user (root writes anywhere), in a directory that user cannot write."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gx-ro-") as d:
        base = Path(d)
        base.chmod(0o755)
        ro = base / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        m = shutil.copy(model, base / "m.gguf")
        os.chmod(m, 0o644)
        argv = [sys.executable, "-m", "gguf_experts", "dump", str(m), "-o", str(ro / "map.csv")]
        kw: dict = {}
        if os.geteuid() == 0:  # as nobody, with a system python of our version (root's may be unreadable)
            import numpy

            def drop() -> None:
                os.setgid(65534)
                os.setuid(65534)
            site = str(Path(numpy.__file__).resolve().parent.parent)
            kw = {"preexec_fn": drop, "cwd": "/",
                  "env": {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{site}", "HOME": "/"}}
            argv[0] = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin") or ""
            if not argv[0]:
                pytest.skip("no system python of this version to run as an unprivileged user")
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)
        assert r.returncode == 2, r.stderr
        assert f"the directory {ro} is not writable" in r.stderr and "Traceback" not in r.stderr
        assert list(ro.iterdir()) == []


def test_failed_write_leaves_no_temp_and_the_old_file(tmp_path: Path, model: Path) -> None:
    """The file-size limit makes the write itself fail (EFBIG) half way, as a full disk would."""
    out = tmp_path / "map.csv"
    out.write_text("previous output\n")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
    r = gx("dump", model, "--split-experts", "-o", out, preexec_fn=limit)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "nothing was replaced" in r.stderr
    assert out.read_text() == "previous output\n" and temps(tmp_path) == []


def test_kill_9_leftover_is_cleaned_live_writer_kept(tmp_path: Path, model: Path) -> None:
    out = tmp_path / "map.csv"
    code = ("import sys, time\nfrom gguf_experts.atomic import atomic_write\n"
            "with atomic_write(sys.argv[1]) as fh:\n    fh.write('partial'); fh.flush(); print('ready', flush=True)\n"
            "    time.sleep(120)\n")
    writers = [subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, cwd="/")
               for _ in range(2)]
    try:
        for w in writers:
            assert w.stdout is not None
            read_until(w.stdout.fileno(), lambda out: b"ready\n" in out, timeout=60)
        assert len(temps(tmp_path)) == 2
        writers[0].kill()  # kill -9: no cleanup runs in that process
        writers[0].wait(timeout=60)
        assert len(temps(tmp_path)) == 2
        r = gx("dump", model, "-o", out)
        assert r.returncode == 0, r.stderr
        left = temps(tmp_path)
        assert left == [t for t in left if f".gx{writers[1].pid}-" in t] and len(left) == 1  # the live one stays
        assert out.read_text().startswith("name,base_name")
    finally:
        for w in writers:
            w.kill()
            w.wait(timeout=60)


def test_outputs_never_replace_a_model(tmp_path: Path, model: Path, trace: Path, run_cli) -> None:
    before = model.read_bytes()
    r = run_cli("dump", model, "-o", model)
    assert r.rc == 2 and "is a GGUF model" in r.err
    r = run_cli("stats", trace, "-o", model)
    assert r.rc == 2 and "is a GGUF model" in r.err
    r = run_cli("capture", model, "-p", "hi", "-o", model)
    assert r.rc == 2 and "is a GGUF model" in r.err
    assert model.read_bytes() == before


def test_convert_refuses_its_input_and_a_contradicting_extension(tmp_path: Path, model: Path, trace: Path,
                                                                 run_cli) -> None:
    log = tmp_path / "log.csv"
    assert run_cli("convert", trace, log).rc == 0
    text = log.read_text()
    r = run_cli("convert", log, log, "--model", model)
    assert r.rc == 2 and "is the input" in r.err and log.read_text() == text
    r = run_cli("convert", trace, trace)
    assert r.rc == 2 and "is the input" in r.err
    r = run_cli("convert", log, tmp_path / "back.csv", "--model", model)
    assert r.rc == 2 and "name it .bin" in r.err and not (tmp_path / "back.csv").exists()
    r = run_cli("convert", trace, tmp_path / "log.json")  # a .json name for a CSV log
    assert r.rc == 2 and "name it .csv" in r.err and not (tmp_path / "log.json").exists()
    r = run_cli("convert", trace, tmp_path / "log.csv", "--to", "mblt")
    assert r.rc == 2 and "name it .mblt" in r.err and log.read_text() == text
    assert run_cli("convert", log, tmp_path / "back.bin", "--model", model).rc == 0


@pytest.mark.parametrize("bad", ["missing-dir", "directory", "same-as-html"])
def test_report_png_bad_leaves_no_html(tmp_path: Path, model: Path, trace: Path, run_cli, bad: str) -> None:
    pytest.importorskip("matplotlib")
    html = tmp_path / "r.html"
    png = {"missing-dir": tmp_path / "nope" / "h.png", "directory": tmp_path, "same-as-html": html}[bad]
    r = run_cli("report", trace, "-m", model, "-o", html, "--png", png, "--no-opt")
    assert r.rc == 2 and r.err.count("\n") == 1, r.err
    assert not html.exists() and temps(tmp_path) == []


def test_report_failing_late_leaves_nothing(tmp_path: Path, model: Path, trace: Path) -> None:
    """The screenshot fails after the HTML and the PNG were rendered (a browser that exits 1): neither of
    them appears, and no temp file stays."""
    pytest.importorskip("matplotlib")
    html = tmp_path / "r.html"
    r = gx("report", trace, "-m", model, "-o", html, "--png", tmp_path / "h.png", "--screenshot",
           tmp_path / "s.png", "--no-opt", env={**os.environ, "GGUF_EXPERTS_CHROMIUM": "/bin/false"})
    assert r.returncode == 2 and "chromium wrote no screenshot" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "t.bin"]


def test_files_written_are_announced(tmp_path: Path, model: Path, trace: Path, run_cli) -> None:
    r = run_cli("dump", model, "-o", tmp_path / "m.csv")
    assert r.rc == 0 and r.out == "" and r.err == f"wrote {tmp_path / 'm.csv'} (csv)\n"
    r = run_cli("stats", trace, "-o", tmp_path / "s.json")
    assert r.rc == 0 and r.err == f"wrote {tmp_path / 's.json'} (json)\n"
    assert (tmp_path / "s.json").read_text().lstrip().startswith("{")  # -o FILE.json: JSON by the rule
    r = run_cli("reuse", trace, "--coactivation", tmp_path / "pairs.csv", "-o", tmp_path / "r.csv")
    assert r.rc == 0 and f"wrote {tmp_path / 'pairs.csv'}" in r.err and f"wrote {tmp_path / 'r.csv'}" in r.err
