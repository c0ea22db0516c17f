#!/usr/bin/env bash
# Build llama.cpp's own programs (llama-server, llama-cli, llama-imatrix, llama-bench, llama-perplexity) from the
# llama.cpp that the installed llama-cpp-python vendors, as shared libraries (BUILD_SHARED_LIBS=ON, llama.cpp's Linux
# default), into a cache keyed by that version. They are real peers and oracles for the tests (`run`
# traces an unchanged llama-server; llama-imatrix counts routing), so they must be the same llama.cpp.
#
#     bash scripts/build_llama_tools.sh            # prints the bin directory on its last line
#
# Flags: the same as the llama-cpp-python wheel's (gguf_experts/native_build.py): -march=native without ggml's AMX
# path, which dies by SIGILL on some AMX hosts (llama.cpp #28756). Cache:
# ${GGUF_EXPERTS_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/gguf-experts/llama.cpp-<version>-<hash of the flags>}; a second
# run finds the binaries and returns at once. About 10 minutes on 2 cores the first time. No network beyond
# the package registry (pip download of the sdist; pip's cache keeps it); the web UI is not fetched.
set -euo pipefail
PY=${PY:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
NB="$PY $HERE/gguf_experts/native_build.py"
# the installed llama-cpp-python's version (the tools must be its llama.cpp), else the one native_build installs
VERSION=${LLAMA_CPP_PYTHON_VERSION:-$($PY -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null \
  || $NB version)}
KEY=$($NB key "$VERSION")
ROOT=${GGUF_EXPERTS_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/gguf-experts/llama.cpp-$KEY}
eval "NATIVE_ARGS=($($NB cmake-args))"
TARGETS=${TARGETS:-llama-server llama-cli llama-imatrix llama-bench llama-perplexity}
BIN=$ROOT/build/bin
have_all() { for t in $TARGETS; do [ -x "$BIN/$t" ] || return 1; done; }
if have_all; then echo "$BIN"; exit 0; fi
mkdir -p "$ROOT"
exec 9>"$ROOT/.lock"
flock 9  # two builds at once (tests in parallel, CI and a session) wait for one another
if have_all; then echo "$BIN"; exit 0; fi
SRC=$ROOT/src
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  tmp=$(mktemp -d)
  $PY -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp" >&2
  tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  rm -rf "$SRC"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$SRC"
  rm -rf "$tmp"
fi
jobs=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
{
  cmake -S "$SRC" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON "${NATIVE_ARGS[@]}"
  # shellcheck disable=SC2086
  cmake --build "$ROOT/build" -j "$jobs" --target $TARGETS
} >"$ROOT/build.log" 2>&1 || { tail -30 "$ROOT/build.log" >&2; echo "build failed; log: $ROOT/build.log" >&2; exit 1; }
have_all || { echo "build finished without all of: $TARGETS (log: $ROOT/build.log)" >&2; exit 1; }
echo "$BIN"
