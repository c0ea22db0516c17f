"""Build llama.cpp for the CPU it runs on, and never one that dies on it (stdlib only: it runs before the install).

Why: on Intel hosts under a hypervisor that list ``amx_tile amx_int8`` (the kind our CI runs on), llama.cpp built
with ``-march=native`` dies by SIGILL (``tilezero`` in ggml-cpu's AMX matmul, llama.cpp #28756) on the first
quantized matmul. Where AMX works it is worth having: on a 16-core AMX host, leaving it out cost 10-17% of prompt
and 10-14% of decode speed (scripts/bench_amx.sh). So on a CPU with AMX we build natively, run a tiny Q8_0 model
in a child process, and if that dies by a signal we remember it for this host and build again with ``-mno-amx-*``
(ggml compiles its AMX path only under ``__AMX_INT8__``; AVX2, AVX-512, VNNI... stay as the host has them). On a
host without AMX there is nothing to decide: the stock native build, flag for flag.

pip's wheel cache is keyed by the sdist's URL, not by CMAKE_ARGS, so a natively built wheel already in the cache
would be reused silently. We therefore build into our own wheelhouse whose directory name is a hash of the flags
(and compiler, Python, llama-cpp-python version), and install from there.

    python3 gguf_experts/native_build.py install        # build (once per flag set), probe, install into this Python
    python3 gguf_experts/native_build.py cmake-args     # the flags decided for this host (build_llama_tools.sh)
    python3 gguf_experts/native_build.py key            # the wheelhouse / tools cache key

``GGUF_EXPERTS_AMX=0`` builds without AMX without probing; ``=1`` keeps it even after a crash was remembered.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
"""The llama-cpp-python release we build and test against (its vendored llama.cpp is our oracle)."""

_AMX_MACRO = re.compile(r"#define __(AMX_[A-Z0-9_]+)__ 1")


def _compiler() -> str:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"


def amx_off_flags(compiler: str | None = None, march: str = "native") -> list[str]:
    """``-mno-amx-*`` for every AMX feature that ``-march=MARCH`` turns on (empty on hosts without AMX)."""
    cc = compiler or _compiler()
    try:
        out = subprocess.run([cc, f"-march={march}", "-dM", "-E", "-x", "c", "-"], input="", capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []  # not an x86 gcc/clang: nothing we know to turn off
    feats = sorted(m.group(1).lower().replace("_", "-") for m in _AMX_MACRO.finditer(out))
    return [f"-mno-{f}" for f in feats]


def _host_id() -> str:
    """This CPU as the kernel shows it (model, flags) and the kernel: what an AMX crash depends on."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").split("\n\n")[0]
    except OSError:
        info = ""
    keep = [ln for ln in info.splitlines() if ln.split(":")[0].strip() in ("vendor_id", "model name", "flags")]
    return hashlib.sha256("\n".join([*keep, os.uname().release]).encode()).hexdigest()[:12]


def amx_crash_marker() -> Path:
    return cache_root() / "wheels" / f"amx-sigill-{_host_id()}"


def amx_wanted(compiler: str | None = None) -> bool:
    """Keep ggml's AMX path: the compiler would turn it on here and it is not known to crash on this host."""
    env = os.environ.get("GGUF_EXPERTS_AMX")
    if env in ("0", "1"):
        return env == "1"
    return not amx_crash_marker().exists()


def cmake_args(compiler: str | None = None, amx: bool | None = None) -> list[str]:
    """CMake arguments of the build decided for this host (the same for the wheel and llama.cpp's own tools):
    native, without AMX where it crashed (or ``amx=False``)."""
    args = ["-DGGML_NATIVE=ON"]
    if amx if amx is not None else amx_wanted(compiler):
        return args
    off = " ".join(amx_off_flags(compiler))
    if off:
        args += [f"-DCMAKE_C_FLAGS={off}", f"-DCMAKE_CXX_FLAGS={off}"]
    return args


def _compiler_id(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return cc


def build_key(version: str = LLAMA_CPP_PYTHON_VERSION, amx: bool | None = None) -> str:
    """Names a build: llama-cpp-python version + a hash of the flags, compiler and Python that made it."""
    cc = _compiler()
    py = f"py{sys.version_info[0]}.{sys.version_info[1]}"
    ident = "\n".join([version, *cmake_args(cc, amx), _compiler_id(cc), py, os.uname().machine])
    return f"{version}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gguf-experts"


def wheelhouse(version: str = LLAMA_CPP_PYTHON_VERSION, amx: bool | None = None) -> Path:
    return cache_root() / "wheels" / f"llama-cpp-python-{build_key(version, amx)}"


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", shlex.join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env)


def build_wheel(version: str = LLAMA_CPP_PYTHON_VERSION, amx: bool | None = None) -> Path:
    """The wheel for this flag set, built from the sdist the first time (~10 min on 2 cores), then found."""
    house = wheelhouse(version, amx)
    found = sorted(house.glob("llama_cpp_python-*.whl"))
    if found:
        return found[-1]
    tmp = house.with_name(house.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    env = dict(os.environ, CMAKE_ARGS=" ".join(shlex.quote(a) for a in cmake_args(amx=amx)))
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    # --no-cache-dir: never take (or leave) a wheel in pip's URL-keyed cache; ours is keyed by the flags.
    _pip("wheel", "-q", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python", "-w", str(tmp),
         f"llama-cpp-python=={version}", env=env)
    tmp.rename(house) if not house.exists() else shutil.rmtree(tmp, ignore_errors=True)
    return sorted(house.glob("llama_cpp_python-*.whl"))[-1]


def installed_matches(wheel: Path) -> bool:
    """Whether this Python's llama_cpp holds exactly the wheel's shared libraries (byte for byte)."""
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return False
    root = Path(spec.origin).parent.parent
    with zipfile.ZipFile(wheel) as z:
        libs = [n for n in z.namelist() if n.startswith("llama_cpp/") and ".so" in n]
        for name in libs:
            f = root / name
            if not f.is_file() or f.stat().st_size != z.getinfo(name).file_size:
                return False
            if hashlib.sha256(f.read_bytes()).digest() != hashlib.sha256(z.read(name)).digest():
                return False
    return bool(libs)


def _install_wheel(wheel: Path) -> None:
    if not installed_matches(wheel):
        _pip("install", "-q", "--force-reinstall", "--no-deps", str(wheel))
        _pip("install", "-q", str(wheel))  # its own dependencies (numpy, jinja2, ...), nothing rebuilt


def probe_signal() -> int | None:
    """The signal that kills the installed llama.cpp running a tiny Q8_0 model in a child process, or None.

    The child is gguf-experts' own preflight child, run from this source tree (the package is not installed
    yet): it writes the model with gguf-py (installed here first, a core dependency anyway), quantizes it with
    llama.cpp and decodes a few tokens."""
    import tempfile

    _pip("install", "-q", "gguf>=0.17", "numpy>=1.24")
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
                   GGUF_EXPERTS_NO_PREFLIGHT="1", GGUF_EXPERTS_PREFLIGHT_CHILD="1")
        res = subprocess.run([sys.executable, "-m", "gguf_experts.trace.live.preflight_child", f"{d}/probe.gguf"],
                             env=env, capture_output=True, text=True, timeout=900)
    return -res.returncode if res.returncode < 0 else None


def install(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Install the build decided for this host; on an AMX CPU, probe the AMX build and fall back if it dies."""
    with_amx = bool(amx_off_flags()) and amx_wanted()
    wheel = build_wheel(version, amx=with_amx)
    _install_wheel(wheel)
    if not with_amx or os.environ.get("GGUF_EXPERTS_AMX") == "1":
        return wheel
    sig = probe_signal()
    if sig is None:
        return wheel
    print(f"native_build: llama.cpp built with AMX died by signal {sig} on this host (llama.cpp #28756); "
          "building it without ggml's AMX path", file=sys.stderr, flush=True)
    marker = amx_crash_marker()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"signal {sig}\n")
    wheel = build_wheel(version, amx=False)
    _install_wheel(wheel)
    return wheel


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    what = args[0] if args else "install"
    if what == "install":
        try:
            print(f"llama-cpp-python installed from {install()}", file=sys.stderr)
        except subprocess.CalledProcessError as e:
            cmd = " ".join(map(str, e.cmd[2:5])) if isinstance(e.cmd, list) else str(e.cmd)
            print(f"native_build: `{cmd} ...` failed (exit {e.returncode}); its messages are above", file=sys.stderr)
            return 1
    elif what == "cmake-args":
        print(shlex.join(cmake_args()))
    elif what == "key":
        print(build_key(args[1] if len(args) > 1 else LLAMA_CPP_PYTHON_VERSION))
    elif what == "version":
        print(LLAMA_CPP_PYTHON_VERSION)
    elif what == "wheelhouse":
        print(wheelhouse())
    else:
        print(f"native_build: unknown action {what!r}; use install, cmake-args, key, version or wheelhouse",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
