#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh needs on a GPU machine without network, on a machine with network:
# .gpu/llama_cpp_python (the llama-cpp-python sdist, stripped of what a CUDA build of the library does not
# use: ~217 MB -> ~24 MB) and .gpu/whl (wheels of gguf and diskcache, which llama_cpp imports).
# .gpu/ is ignored through .git/info/exclude (never .gitignore, never committed); delete it when done.
#     bash scripts/gpu_prepare.sh [llama_cpp_python-0.3.36.tar.gz]   # default: pip download it
set -euo pipefail
VER=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
DEST=.gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >>.git/info/exclude; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tgz=${1:-}
if [ -z "$tgz" ]; then
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$tmp"
    tgz=$(ls "$tmp"/llama_cpp_python-*.tar.gz)
fi
tar xzf "$tgz" -C "$tmp"
src=$(ls -d "$tmp"/llama_cpp_python-*/)
(
    cd "$src"
    rm -rf .git docs docker examples tests
    cd vendor/llama.cpp
    # not built with LLAMA_BUILD_{TESTS,EXAMPLES,TOOLS,SERVER}=OFF and LLAVA_BUILD=OFF; models/ holds vocab files
    rm -rf models docs media .github .devops benches tests examples pocs tools gguf-py conversion app ui
    cd ggml/src  # backends other than CPU and CUDA (each added only when its GGML_<NAME> option is on)
    rm -rf ggml-opencl ggml-sycl ggml-vulkan ggml-hexagon ggml-metal ggml-et ggml-webgpu ggml-openvino \
        ggml-cann ggml-virtgpu ggml-zdnn ggml-zendnn ggml-musa ggml-hip
)
# libllama needs no "common" library; llama-cpp-python forces it on, which costs build time only
sed -i 's/set(LLAMA_BUILD_COMMON ON CACHE BOOL "Build llama.cpp common library" FORCE)/set(LLAMA_BUILD_COMMON OFF CACHE BOOL "Build llama.cpp common library" FORCE)/' \
    "$src/CMakeLists.txt"
# Export only the C API (ggml_*) from libggml-cuda. Tried against a crash in llama_model::print_info on the
# H100 machine (2026-11-23); alone it did not fix it: the fix is gpu_check.sh's -Wl,--exclude-libs,ALL (static
# libstdc++ in every library + RTLD_GLOBAL loading). Harmless, kept because that combination was verified.
cat >>"$src/vendor/llama.cpp/ggml/src/ggml-cuda/CMakeLists.txt" <<'CM'
if (TARGET ggml-cuda)  # gguf-experts GPU check: export the C API only
    file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/ggml-cuda.map "{ global: ggml_*; local: *; };\n")
    target_link_options(ggml-cuda PRIVATE "-Wl,--version-script=${CMAKE_CURRENT_BINARY_DIR}/ggml-cuda.map")
endif()
CM
rm -rf "$DEST/llama_cpp_python" "$DEST/whl"
mkdir -p "$DEST"
mv "$src" "$DEST/llama_cpp_python"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$DEST/whl" "gguf==0.19.0" "diskcache==5.6.3"
du -sh "$DEST"/*
