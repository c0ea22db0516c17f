"""The llama.cpp build flags (issue 16): AMX off exactly where the compiler would turn it on, nothing else."""
from __future__ import annotations

import platform
from pathlib import Path

import pytest

from gguf_experts import native_build

X86 = "x86-64 flags: the AMX options exist only for x86-64 targets"
# Non-x86 is the one allowed skip (platform_skip: CI may run elsewhere); a missing C compiler is not: the tests
# then fail, as they must (GGUF_EXPERTS_REQUIRE_ALL). live: they run the system C compiler.
pytestmark = [pytest.mark.live, pytest.mark.platform_skip(X86),
              pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason=X86)]


def test_no_flags_for_a_cpu_without_amx() -> None:
    """On a host without AMX the build is the stock native one: no flag added."""
    assert native_build.amx_off_flags(march="x86-64-v4") == []
    assert native_build.amx_off_flags(march="skylake-avx512") == []


def test_amx_features_turned_off_for_an_amx_cpu() -> None:
    flags = native_build.amx_off_flags(march="sapphirerapids")
    assert {"-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"} <= set(flags)
    assert all(f.startswith("-mno-amx-") for f in flags)


def test_the_flags_silence_ggml_amx_guard() -> None:
    """ggml compiles its AMX matmul under `__AMX_INT8__ && __AVX512VNNI__`: with our flags the first is gone,
    the AVX-512 features stay."""
    import subprocess

    flags = native_build.amx_off_flags(march="sapphirerapids")
    out = subprocess.run(["cc", "-march=sapphirerapids", *flags, "-dM", "-E", "-x", "c", "-"], input="",
                         capture_output=True, text=True, check=True).stdout
    assert "__AMX_INT8__" not in out and "__AVX512VNNI__" in out and "__AVX512F__" in out


def test_cmake_args_and_key_follow_the_flags() -> None:
    args = native_build.cmake_args()
    assert args[0] == "-DGGML_NATIVE=ON"
    assert len(args) == (3 if native_build.amx_off_flags() and not native_build.amx_wanted() else 1)
    assert native_build.build_key().startswith(native_build.LLAMA_CPP_PYTHON_VERSION + "-")
    assert native_build.build_key("0.3.35") != native_build.build_key()


def test_amx_kept_until_a_crash_is_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision: native (AMX where the CPU has it) until the probe saw it die on this host; then without AMX,
    under another key (wheelhouse and tools directory), so neither build is mistaken for the other."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("GGUF_EXPERTS_AMX", raising=False)
    off = native_build.amx_off_flags()
    assert native_build.amx_wanted() and native_build.cmake_args() == ["-DGGML_NATIVE=ON"]
    key = native_build.build_key()
    marker = native_build.amx_crash_marker()
    marker.parent.mkdir(parents=True)
    marker.write_text("signal 4\n")
    assert not native_build.amx_wanted()
    assert (native_build.build_key() != key) == bool(off)
    assert native_build.cmake_args() == ["-DGGML_NATIVE=ON", *([f"-DCMAKE_C_FLAGS={' '.join(off)}",
                                                                 f"-DCMAKE_CXX_FLAGS={' '.join(off)}"] if off else [])]
    monkeypatch.setenv("GGUF_EXPERTS_AMX", "1")
    assert native_build.amx_wanted() and native_build.build_key() == key
    monkeypatch.setenv("GGUF_EXPERTS_AMX", "0")
    assert not native_build.amx_wanted()


@pytest.mark.live
def test_the_probe_runs_the_installed_llama_cpp() -> None:
    """The install's probe (a tiny Q8_0 model in a child, from this source tree) finds the installed build
    running on this CPU: no signal."""
    pytest.importorskip("llama_cpp")
    assert native_build.probe_signal() is None
