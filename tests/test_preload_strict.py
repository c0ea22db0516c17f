"""The C tracer built strictly (issue 17): no warning under -Wall -Wextra -Werror; an ASan+UBSan build traces
llama-cli under `gguf-experts run` with the same rows as the normal build; its copy of ggml's structs matches
the real headers; rows it cannot record for want of memory are counted, not lost in silence."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gguf_experts.demo import tinymodel
from gguf_experts.trace.preload.run import CFLAGS, PRELOAD_DIR, preload_sources
from gguf_experts.trace.reader import read_trace

from run_support import capture_requests, compare, rows_of, sequence_tokens

pytestmark = pytest.mark.live  # compiles C, runs llama.cpp's programs
ROOT = Path(__file__).resolve().parent.parent
GGE = [sys.executable, "-m", "gguf_experts"]
CC = os.environ.get("CC", "cc")
STRICT = ("-Wall", "-Wextra", "-Werror")
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g")
PROMPT = "Once upon a time, a small robot"


@pytest.fixture(scope="module")
def llama_bin() -> Path:
    """llama.cpp's own programs, built from the llama.cpp llama-cpp-python vendors (cached per version)."""
    r = subprocess.run(["bash", str(ROOT / "scripts" / "build_llama_tools.sh")], capture_output=True, text=True,
                       timeout=3600)
    assert r.returncode == 0, f"scripts/build_llama_tools.sh failed: {r.stderr[-2000:]}"
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.make_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf", seed=3)


def compile_preload(out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CC, *CFLAGS, *flags, "-o", str(out), *map(str, preload_sources()), "-ldl", "-lpthread"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("opt", ["-O0", "-O2"])
def test_the_tracer_builds_without_a_warning(tmp_path: Path, opt: str) -> None:
    """-Wall -Wextra -Werror at both optimisation levels (some warnings, e.g. maybe-uninitialized, need -O2)."""
    r = compile_preload(tmp_path / "strict.so", *STRICT, opt)
    assert r.returncode == 0, r.stderr


# -- the copied ggml / llama declarations against the real headers ------------------------------------------------
#: (our type in ggexp.h, the real type, its fields): every field ggexp.h copies
STRUCTS = [
    ("struct gt", "struct ggml_tensor", ["type", "buffer", "ne", "nb", "op", "op_params", "flags", "src", "view_src",
                                         "view_offs", "data", "name", "extra", "padding"]),
    ("llama_batch", "struct llama_batch", ["n_tokens", "token", "embd", "pos", "n_seq_id", "seq_id", "logits"]),
    ("struct gguf_init_params", "struct gguf_init_params", ["no_alloc", "ctx"]),
]
#: (our macro, the real constant)
CONSTANTS = [("GGML_TYPE_F32", "GGML_TYPE_F32"), ("GGML_TYPE_I32", "GGML_TYPE_I32"),
             ("FLAG_OUTPUT", "GGML_TENSOR_FLAG_OUTPUT")]


def layout_program(ours: bool) -> str:
    """A C program printing `name value` for the size, every field's offset and size, and the constants."""
    head = '#include "ggexp.h"\n' if ours else '#include "ggml.h"\n#include "gguf.h"\n#include "llama.h"\n'
    lines = [head, "#include <stdio.h>\n#include <stddef.h>\nint main(void) {"]
    for mine, real, fields in STRUCTS:
        t, key = (mine if ours else real), real.replace(" ", "_")
        lines.append(f'    printf("%s.sizeof %zu\\n", "{key}", sizeof({t}));')
        for f in fields:
            lines.append(f'    printf("{key}.{f} %zu %zu\\n", offsetof({t}, {f}), sizeof((({t} *)0)->{f}));')
    for mine, real in CONSTANTS:
        lines.append(f'    printf("{real} %d\\n", (int)({mine if ours else real}));')
    lines.append("    return 0;\n}\n")
    return "\n".join(lines)


def run_layout(tmp_path: Path, ours: bool, includes: list[Path]) -> dict[str, str]:
    src = tmp_path / ("ours.c" if ours else "real.c")
    src.write_text(layout_program(ours))
    exe = tmp_path / src.stem
    r = subprocess.run([CC, "-std=gnu11", *[f"-I{d}" for d in includes], "-o", str(exe), str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def header_dirs(llama_bin: Path) -> list[list[Path]]:
    """The include directories of the llama.cpp the tests run: the vendored sources the tools were built from
    (scripts/build_llama_tools.sh), and the headers the llama-cpp-python wheel installed (sys.prefix/include)."""
    src = llama_bin.parent.parent / "src"
    dirs = [[src / "ggml" / "include", src / "include"]]
    wheel = Path(sys.prefix) / "include"
    if (wheel / "ggml.h").is_file() and (wheel / "llama.h").is_file():
        dirs.append([wheel])
    return dirs


def test_the_copied_ggml_structs_match_the_installed_headers(tmp_path: Path, llama_bin: Path) -> None:
    ours = run_layout(tmp_path, True, [PRELOAD_DIR])
    assert len(ours) == sum(1 + len(f) for *_, f in STRUCTS) + len(CONSTANTS)
    for includes in header_dirs(llama_bin):
        assert (includes[0] / "ggml.h").is_file(), includes
        real = run_layout(tmp_path, False, includes)
        assert ours == real, {k: (ours[k], real.get(k)) for k in ours if ours[k] != real.get(k)}


# -- the sanitized build under `gguf-experts run` ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def asan_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("asan") / "libggexp_asan.so"
    r = compile_preload(out, *STRICT, "-O1", *SANITIZE)
    assert r.returncode == 0, r.stderr
    needed = subprocess.run(["readelf", "-d", str(out)], capture_output=True, text=True, check=True).stdout
    assert "libasan" in needed and "libubsan" in needed, needed
    return out


def asan_env(lib: Path) -> dict[str, str]:
    """libasan must come first in LD_PRELOAD (before the program's own libraries); `run` appends the tracer
    after it. Leak checking is off: the programs (and Python) keep memory until exit by design."""
    libasan = subprocess.run([CC, "-print-file-name=libasan.so"], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert os.path.isabs(libasan), f"{CC} knows no libasan.so"
    return {**os.environ, "LD_PRELOAD": libasan, "GGUF_EXPERTS_PRELOAD": str(lib),
            "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86",
            "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=87"}


def run_cli(tmp_path: Path, llama_bin: Path, model: Path, mode: str, env: dict[str, str] | None, name: str,
            n: int = 8) -> tuple[subprocess.CompletedProcess[str], Path]:
    trace = tmp_path / f"{name}.bin"
    r = subprocess.run([*GGE, "run", "--mode", mode, "-o", str(trace), "--", str(llama_bin / "llama-cli"),
                        "-m", str(model), "-p", PROMPT, "-n", str(n), "-st", "-t", "2", "--temp", "0", "--seed", "1"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=540, env=env)
    return r, trace


@pytest.mark.parametrize("mode", ["callback", "keepalive"])
def test_sanitized_tracer_traces_llama_cli_as_the_normal_one(tmp_path: Path, llama_bin: Path, model: Path,
                                                             asan_lib: Path, mode: str) -> None:
    """ASan+UBSan abort on the first error (exit 86/87 and a report on stderr); the sanitized trace equals the
    normal build's, row for row, and the in-process capture of the same tokens."""
    r, trace = run_cli(tmp_path, llama_bin, model, mode, asan_env(asan_lib), "asan")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-4000:]
    ref_r, ref_trace = run_cli(tmp_path, llama_bin, model, mode, None, "ref")
    assert ref_r.returncode == 0, ref_r.stderr[-3000:]
    d, ref = read_trace(trace), read_trace(ref_trace)
    assert len(d) > 0 and len(d) == len(ref)
    for col in ("seq", "phase", "pos", "token", "layer", "experts"):
        assert np.array_equal(getattr(d, col), getattr(ref, col)), col
    toks, n_prompt, first = sequence_tokens(d)[0]
    (cap,) = capture_requests(model, [(toks, n_prompt, first)])
    res = compare(rows_of(d, 0), cap)
    assert not res["missing"] and not res["differ"], res


def test_the_sanitizer_is_really_on(tmp_path: Path, asan_lib: Path) -> None:
    """The build above would catch a bug: the same flags on a one-line overflow abort with ASan's report."""
    src = tmp_path / "bug.c"
    src.write_text("#include <stdlib.h>\nint main(int c, char **v) { (void)v; int *p = malloc(4 * sizeof *p); "
                   "int r = p[c + 3]; free(p); return r; }\n")
    exe = tmp_path / "bug"
    subprocess.run([CC, *SANITIZE, "-o", str(exe), str(src)], check=True, capture_output=True, timeout=120)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "ASAN_OPTIONS": "exitcode=86"})
    assert r.returncode == 86 and "heap-buffer-overflow" in r.stderr, r.stderr


# -- out of memory: counted and reported -------------------------------------------------------------------------------
def test_rows_lost_to_an_allocation_failure_are_counted(tmp_path: Path, llama_bin: Path, model: Path) -> None:
    """GGUF_EXPERTS_TEST_NOMEM=records makes the record buffer fail to grow (as malloc failing would): every
    row is then lost, and the count at exit (stderr) and in the finalized header equals the rows a normal run
    records."""
    ref_r, ref_trace = run_cli(tmp_path, llama_bin, model, "keepalive", None, "ref")
    assert ref_r.returncode == 0, ref_r.stderr[-3000:]
    ref = read_trace(ref_trace)
    assert ref.header.meta["dropped_rows"] == 0
    r, trace = run_cli(tmp_path, llama_bin, model, "keepalive", {**os.environ, "GGUF_EXPERTS_TEST_NOMEM": "records"},
                       "nomem")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"out of memory: {len(ref)} rows (token x layer) were not recorded" in r.stderr, r.stderr[-3000:]
    d = read_trace(trace)
    assert len(d) == 0 and d.header.meta["dropped_rows"] == len(ref)
