#!/usr/bin/env bash
# GPU check of live capture (issue 3): build llama-cpp-python with CUDA, capture the same prompts on the
# CPU (-ngl 0) and with every layer on the GPU (-ngl 99), compare the recorded experts row by row
# (scripts/gpu_compare.py), and measure decode tokens/s with and without the recorder on the GPU
# (scripts/bench_capture.py --n-gpu-layers 99).
#
# Run from the repository root on a machine with an NVIDIA GPU, nvcc, cmake, ninja, scikit-build-core,
# numpy, pandas, tqdm, pyyaml and requests, and no network:
#     OUT=/some/dir bash scripts/gpu_check.sh [SDIST_DIR] [WHEEL_DIR]
# SDIST_DIR: an unpacked llama-cpp-python sdist (default .gpu/llama_cpp_python); WHEEL_DIR: wheels of gguf
# and diskcache (default .gpu/whl). Both are prepared on a machine with network (docs/capture.md, GPU check).
# Knobs (environment): FA=ON|OFF (FlashAttention kernels, default OFF: a shorter build; attention takes no part in routing), CUDA_ARCH (default
# 90), BUILD_TIMEOUT (s, default 480), PY (default python3), SITE (install target, default /tmp/gpu-site),
# BUILD_ONLY=1 (stop after the build), SKIP_BUILD=1 (use the llama_cpp already importable), SAVE_BUILD=1 (put the build into $OUT/lc.tar.xz.NN),
# PREBUILT=DIR (unpack DIR/lc.tar.xz.* first, skipping the build when it imports with GPU offload), BIG_LAYERS (default 24), ROUNDS (GPU bench, default 5), CPU_BENCH=0 (skip the CPU peer).
# Results: $OUT/build.log, $OUT/results.tgz (traces as detail CSVs, comparisons, bench output); the
# console output is the summary (tee it into $OUT/log). Exit code 1 when any comparison differs.
set -euo pipefail
# BIG=1: the check at real model size instead (issue 11): scripts/gpu_big.sh, prepared by scripts/gpu_prepare_big.sh
if [ "${BIG:-0}" = 1 ]; then exec bash "$(dirname "$0")/gpu_big.sh"; fi
SDIST=${1:-.gpu/llama_cpp_python}
WHL=${2:-.gpu/whl}
OUT=${OUT:-/tmp/gpu-check-out}
PY=${PY:-python3}
SITE=${SITE:-/tmp/gpu-site}
FA=${FA:-OFF}
CUDA_ARCH=${CUDA_ARCH:-90}
W=${WORK:-/tmp/gpu-check}
REPO=$PWD
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
mkdir -p "$OUT" "$SITE" "$W/res"
T0=$(date +%s)
el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }

el "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nvcc --version | tail -1 || true
$PY --version; echo "cores: $(nproc)"

export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! $PY -c "import gguf, diskcache" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHL"/*.whl
fi
if [ -n "${PREBUILT:-}" ] && ls "$PREBUILT"/lc.tar.xz.* >/dev/null 2>&1; then  # a build saved by SAVE_BUILD=1
    cat "$PREBUILT"/lc.tar.xz.* | xz -d | tar x -C "$SITE" && el "using the saved build from $PREBUILT"
fi
if [ "${SKIP_BUILD:-0}" != 1 ] && ! $PY -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null; then
    el "building llama-cpp-python (CUDA, sm_$CUDA_ARCH, FlashAttention kernels $FA), log in $OUT/build.log"
    export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH -DGGML_CUDA_FA=$FA -DGGML_CUDA_NCCL=OFF \
-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL"
    # --exclude-libs: the device image's g++ (/opt/gcc) links libstdc++ statically into every library; with
    # llama-cpp-python's RTLD_GLOBAL loading, libllama then bound to another library's copy and crashed in
    # llama_model::print_info. Hidden copies keep each library on its own.
    export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
    if ! timeout "${BUILD_TIMEOUT:-480}" $PY -m pip install -v --no-build-isolation --no-deps --no-index \
            --target "$SITE" --upgrade "$SDIST" >"$OUT/build.log" 2>&1; then
        el "BUILD FAILED or timed out"; tail -40 "$OUT/build.log"; exit 3
    fi
    el "build done"
    if [ "${SAVE_BUILD:-0}" = 1 ]; then  # bring the build back in <= 15 MB parts (PREBUILT= reuses it)
        (cd "$SITE" && tar cf - llama_cpp) | xz -T0 -3 >/tmp/lc.tar.xz
        sz=$(stat -c%s /tmp/lc.tar.xz); el "build archive: $sz bytes"
        [ "$sz" -lt 47000000 ] && split -b 15000000 -d /tmp/lc.tar.xz "$OUT/lc.tar.xz."
    fi
fi
[ "${BUILD_ONLY:-0}" = 1 ] && exit 0
$PY - <<'EOF'
import llama_cpp
print("llama-cpp-python", llama_cpp.__version__, "GPU offload:", bool(llama_cpp.llama_supports_gpu_offload()))
EOF

LIB=$($PY -c "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))")/lib
for l in ggml-cuda ggml-base ggml-cpu llama; do
    echo "C++ std:: symbols exported by lib$l: $(nm -D --defined-only "$LIB"/lib$l.so 2>/dev/null | c++filt | grep -c ' std::' || true)"
done
ldd "$LIB/libllama.so" | grep -E "stdc|ggml" || true
[ -f "$W/tiny.gguf" ] || (cd "$W" && $PY -m gguf_experts make-model tiny.gguf >/dev/null)
if ! $PY "$REPO/scripts/gpu_diag.py" "$W/tiny.gguf" traced 99 >"$OUT/smoke.txt" 2>&1; then
    # a crash inside llama.cpp's own load (not our code): try binding every C++ symbol to the runtime
    # libstdc++ first, then keep that setting for the whole check
    tail -25 "$OUT/smoke.txt"
    export LD_PRELOAD=$( (ldd "$LIB/libllama.so"; ldconfig -p) | awk '/libstdc\+\+\.so\.6/ {for (i = 1; i <= NF; i++) if ($i ~ /^\//) {print $i; exit}}')
    el "smoke test crashed; retrying with LD_PRELOAD=$LD_PRELOAD"
    $PY "$REPO/scripts/gpu_diag.py" "$W/tiny.gguf" traced 99 >"$OUT/smoke.txt" 2>&1 || { tail -25 "$OUT/smoke.txt"; exit 4; }
fi
grep "^\[" "$OUT/smoke.txt"

cd "$W"
pack() { rm -f "$W"/res/*.bin; tar czf "$OUT/results.tgz" -C "$W" res prompts.txt 2>/dev/null || true; }
trap pack EXIT  # results come back also when a step fails or the run is cut short
ge() { $PY -m gguf_experts "$@"; }
el "models"
[ -f tiny.gguf ] || ge make-model tiny.gguf
[ -f tiny-gptoss.gguf ] || ge make-model --arch gpt-oss tiny-gptoss.gguf
BL=${BIG_LAYERS:-24}
BIG=big-${BL}x32top8x1024x256-q8_0  # the name bench_capture.py looks for in its --workdir
[ -f $BIG.gguf ] || ge make-model --layers $BL --experts 32 --top-k 8 --embd 1024 --heads 16 --ff 256 --quant Q8_0 $BIG.gguf
# one short prompt, one long one (multi-row prefill: the strided top-k view), as two sequences
{
    echo "Once upon a time"
    $PY -c "print(' '.join(f'def f{i}(x): return x * {i} + {i % 7}' for i in range(40)))"
} > prompts.txt

set +e
$PY - $BIG.gguf <<'EOF'
# evidence that -ngl 99 really offloads: llama.cpp's own load log
from gguf_experts.trace import ggml_ctypes as g
from gguf_experts.gguf.fingerprint import model_fingerprint
from gguf_experts.trace.live.llama import MemorySink, TracedLlama
import sys
p = sys.argv[1]
llm = TracedLlama(p, MemorySink(), model_fingerprint(p), n_gpu_layers=99, n_ctx=256)
print("\n".join(l for l in g._LOG.lines if "offload" in l or "buffer size" in l))
llm.close()
EOF
[ $? = 0 ] || echo "(loading with -ngl 99 failed: see above)"

set -e
fail=0
for m in tiny tiny-gptoss $BIG; do
    for mode in ids weights; do
        flags=(); [ $mode = weights ] && flags=(--weights)
        for ngl in 0 99; do
            tag=$m-$mode-ngl$ngl
            if ge capture $m.gguf --prompts prompts.txt -n 48 --ignore-eos -t 8 -ngl $ngl "${flags[@]}" --no-progress \
                    -o res/$tag.bin -f csv >res/$tag-summary.csv 2>res/$tag-stderr.txt; then
                echo "$tag: $(tail -1 res/$tag-summary.csv)"
                ge convert res/$tag.bin res/$tag.csv --detail >/dev/null
            else
                echo "$tag: CAPTURE FAILED"; cat res/$tag-stderr.txt; fail=1
            fi
        done
        [ -f res/$m-$mode-ngl0.csv ] && [ -f res/$m-$mode-ngl99.csv ] || continue
        $PY "$REPO/scripts/gpu_compare.py" res/$m-$mode-ngl0.csv res/$m-$mode-ngl99.csv --label "$m $mode CPU vs GPU" \
            | tee res/$m-$mode-compare.txt || fail=1
    done
done
el "captures compared (fail=$fail)"
el "self-consistency on each backend (ids = top-k of the same run's ffn_moe_probs) and near-tie margins"
$PY "$REPO/scripts/gpu_selfcheck.py" tiny.gguf tiny-gptoss.gguf $BIG.gguf --prompts prompts.txt -n 16 --ngl 0 99 \
    2>&1 | tee res/selfcheck.txt || fail=1

el "benchmark on the GPU (-ngl 99): plain vs recorder vs recorder+weights"
$PY "$REPO/scripts/bench_capture.py" --n-gpu-layers 99 --threads 1 --rounds ${ROUNDS:-5} --tokens 64 --big-tokens 64 \
    --big-layers $BL --workdir "$W" 2>&1 | tee res/bench-gpu.txt || fail=1
if [ "${CPU_BENCH:-1}" = 1 ]; then
    el "same benchmark on the CPU (-ngl 0, 8 threads) for scale"
    $PY "$REPO/scripts/bench_capture.py" --n-gpu-layers 0 --threads 8 --rounds 3 --tokens 64 --big-tokens 32 \
        --big-layers $BL --workdir "$W" 2>&1 | tee res/bench-cpu.txt || fail=1
fi
el "done; comparisons $([ $fail = 0 ] && echo IDENTICAL || echo DIFFERENT)"
exit $fail
