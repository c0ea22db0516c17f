#!/usr/bin/env bash
# Prepare, on a machine with network, what scripts/gpu_big.sh (issue 11) needs on a GPU machine without one:
#   .gpu/llama.cpp  the llama.cpp that the installed llama-cpp-python vendors, stripped of what a CUDA build of
#                   libllama + llama-bench does not use (~28 MB)
#   .gpu/site       the Python parts of llama_cpp (no libraries: gpu_big.sh links its own CUDA build in), gguf,
#                   diskcache (~2 MB)
# .gpu/ is ignored through .git/info/exclude (never committed). Carry ".gpu" (or, with PREBUILT, ".gpu/site" and
# the saved build) in the device call.
set -euo pipefail
PY=${PY:-python3}
VER=${LLAMA_CPP_PYTHON_VERSION:-$($PY -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')}
EXCLUDE=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file
mkdir -p "$(dirname "$EXCLUDE")"
grep -qx '/.gpu/' "$EXCLUDE" 2>/dev/null || echo '/.gpu/' >>"$EXCLUDE"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PY -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$tmp"
$PY -m pip download -q --no-deps --only-binary :all: gguf diskcache -d "$tmp/whl"
tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
rm -rf .gpu/llama.cpp .gpu/site && mkdir -p .gpu/site
cp -r "$tmp"/llama_cpp_python-*/vendor/llama.cpp .gpu/llama.cpp
cp -r "$tmp"/llama_cpp_python-*/llama_cpp .gpu/site/llama_cpp
rm -rf .gpu/site/llama_cpp/lib
(cd .gpu/llama.cpp && rm -rf models docs media tests examples benches conversion gguf-py pocs app ui .github .devops \
  skills tools/ui && cd ggml/src && rm -rf ggml-opencl ggml-sycl ggml-vulkan ggml-hexagon ggml-metal ggml-et \
  ggml-webgpu ggml-openvino ggml-cann ggml-virtgpu ggml-zdnn ggml-zendnn ggml-musa ggml-hip)
for w in "$tmp"/whl/*.whl; do (cd .gpu/site && python3 -m zipfile -e "$w" .); done
du -sh .gpu/llama.cpp .gpu/site
