#!/usr/bin/env bash
# GPU check at real model size (issue 11; `BIG=1 scripts/gpu_check.sh` runs this): one CUDA build of the llama.cpp
# that llama-cpp-python vendors (shared libraries: libllama for the Python recorder, llama-bench as the stock
# program the C recorder `gguf-experts run` is preloaded into), a Qwen3-30B-A3B-shaped model streamed to disk
# (scripts/make_big_model.py), then in ONE call, so that every ratio compares runs of the same machine and minute:
#   - prefill/decode tok/s: plain vs Python recorder (+weights), in one process (scripts/bench_gpu_big.py);
#   - the same harness, plain, under `gguf-experts run` (C recorder; each mode in GGUF_EXPERTS_MODES);
#   - stock llama-bench (pp512, tg64): plain vs under `gguf-experts run`, per mode, with and without --weights;
#   - all of it at -ngl 99 and with the experts of half the layers in host memory (--n-cpu-moe);
#   - CPU vs GPU agreement and the self-check (ids = top-k of the same run's probabilities) on that model.
# Prepared here (no network there): .gpu/llama.cpp (vendored source, stripped) and .gpu/site (the Python parts of
# llama_cpp, gguf, diskcache) - see docs/capture.md, "GPU check". Run from the repository root:
#     OUT=/some/dir bash scripts/gpu_big.sh
# Knobs: STEPS (default "build model python llamabench run agree"), QUANT (Q8_0|Q4_K), LAYERS (48), NCMOE (24),
# ROUNDS (5), GGUF_EXPERTS_MODES (C recorder modes, default "callback keepalive"), SAVE_BUILD=1 (bring the build
# back in parts), PREBUILT=DIR (unpack DIR/cuda.tar.xz.* instead of building), CUDA_ARCH (90).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-big-out}
W=${WORK:-/tmp/gpu-big}
REPO=$PWD
STEPS=${STEPS:-build model python llamabench run agree}
QUANT=${QUANT:-Q8_0}
ARCH=${ARCH:-qwen3moe}  # gpt-oss: gpt-oss-20b's shapes (make_big_model.py --arch gpt-oss), e.g. with QUANT=MXFP4
LAYERS=${LAYERS:-48}
NCMOE=${NCMOE:-$((LAYERS / 2))}
ROUNDS=${ROUNDS:-5}
MODES=${GGUF_EXPERTS_MODES:-callback keepalive}
mkdir -p "$OUT" "$W"
T0=$(date +%s)
el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
export PYTHONUNBUFFERED=1
el "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null); $(nproc) cores; $(nvcc --version | tail -1)"

rm -rf /tmp/site && cp -r .gpu/site /tmp/site
export PYTHONPATH=/tmp/site:${PYSRC:-$REPO}  # PYSRC: another copy of the package to measure (default: this one)
BIN=$W/build/bin
if [ -n "${PREBUILT:-}" ] && ls "$PREBUILT"/cuda.tar.xz.* >/dev/null 2>&1; then
  cat "$PREBUILT"/cuda.tar.xz.* | xz -d | tar x -C "$W" && el "unpacked the saved build"
fi
if has build && [ ! -x "$BIN/llama-bench" ]; then
  el "building llama.cpp (CUDA sm_${CUDA_ARCH:-90}, shared libraries); log in $OUT/build.log"
  cmake -S .gpu/llama.cpp -B "$W/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_APP=OFF -DGGML_NATIVE=ON \
    -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL >"$OUT/build.log" 2>&1 \
  && timeout "${BUILD_TIMEOUT:-420}" cmake --build "$W/build" -j "$(nproc)" --target llama llama-bench >>"$OUT/build.log" 2>&1 \
  || { el "BUILD FAILED"; tail -30 "$OUT/build.log"; exit 3; }
  el "build done"
  if [ "${SAVE_BUILD:-0}" = 1 ]; then
    (cd "$W" && tar cf - build/bin) | xz -T0 -3 >/tmp/cuda.tar.xz
    split -b 15000000 -d /tmp/cuda.tar.xz "$OUT/cuda.tar.xz." && el "saved build: $(stat -c%s /tmp/cuda.tar.xz) bytes"
  fi
fi
[ -x "$BIN/llama-bench" ] || { el "no build"; exit 3; }
ln -sfn "$BIN" /tmp/site/llama_cpp/lib
python3 -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'GPU offload:', bool(llama_cpp.llama_supports_gpu_offload()))" \
  || { el "llama_cpp does not load"; exit 4; }

M=$W/big-$ARCH-$QUANT-$LAYERS.gguf
if has model && [ ! -f "$M" ]; then
  el "writing the model"
  python3 scripts/make_big_model.py "$M" --arch "$ARCH" --quant "$QUANT" --layers "$LAYERS" || exit 5
fi
ge() { (cd /tmp && python3 -m gguf_experts "$@"); }  # not from the repo root: PYSRC must win
J=$OUT/bench.jsonl
# PYVARIANTS: sets of bench_gpu_big.py variants, one process each ("plain,capture": capture's in-process keep-alive
# tracer is one per process, against plain in the same process)
PYVARIANTS=${PYVARIANTS:-plain,python,python-weights}
if has python; then
  for nc in 0 "$NCMOE"; do
    for vs in $PYVARIANTS; do
      slots=; case $vs in noslots/*) vs=${vs#noslots/}; slots=0;; esac  # keep-alive's flags alone (no device slots)
      el "Python harness, -ngl 99, --n-cpu-moe $nc: $vs${slots:+ (GGUF_EXPERTS_SLOTS=0)}"
      GGUF_EXPERTS_SLOTS=$slots python3 scripts/bench_gpu_big.py "$M" --ngl 99 --n-cpu-moe "$nc" --rounds "$ROUNDS" \
        --variants "$vs" --json "$J" --label "python-harness${slots:+-noslots}" 2>&1 | grep -v "^llama\|^load\|^print_info" | tail -3
    done
  done
fi
# C-recorder variants: MODE[:w][:COST][:noslots] (w = --weights; COST = noop|flags, the measurement knobs of
# docs/capture.md; noslots = GGUF_EXPERTS_SLOTS=0, keep-alive's flags without the device slots)
VARIANTS0=${VARIANTS0:-callback callback:w keepalive keepalive:w callback:noop keepalive:flags}  # at -ngl 99
VARIANTSN=${VARIANTSN:-callback keepalive keepalive:w}                                          # at --n-cpu-moe
traced() {  # traced VARIANT CMD...: CMD under `gguf-experts run` as VARIANT says
  local v=$1; shift; local mode=${v%%:*} w="" cost="" slots=""
  case ":$v:" in *:w:*) w=--weights;; esac
  case ":$v:" in *:noop:*) cost=noop;; *:flags:*) cost=flags;; esac
  case ":$v:" in *:noslots:*) slots=0;; esac
  GGUF_EXPERTS_MODE=$mode GGUF_EXPERTS_COST=$cost GGUF_EXPERTS_SLOTS=$slots ge run $w -o "$W/t-${v//:/-}.bin" -- "$@"
}
if has run && [ "${CHARNESS:-1}" = 1 ] && ge run --help >/dev/null 2>&1; then  # CHARNESS=0: llama-bench only
  for nc in 0 "$NCMOE"; do
    vs=$VARIANTS0; [ "$nc" = 0 ] || vs=$VARIANTSN
    python3 scripts/bench_gpu_big.py "$M" --ngl 99 --n-cpu-moe "$nc" --rounds "$ROUNDS" --variants plain --json "$J" --label "plain-process" 2>&1 | tail -2
    for v in $vs; do
      case $v in *noop*|*flags*) continue;; esac
      el "C recorder ($v) under the Python harness, --n-cpu-moe $nc"
      traced "$v" python3 "$REPO/scripts/bench_gpu_big.py" "$M" --ngl 99 --n-cpu-moe "$nc" --rounds "$ROUNDS" \
        --variants plain --json "$J" --label "C-$v" 2>&1 | tail -2
    done
    if [ "$nc" = 0 ]; then  # the same harness and inputs: keep-alive's trace against the callback's, row by row
      for pair in "callback keepalive" "callback:w keepalive:w"; do
        set -- $pair
        a=$W/t-${1//:/-}.bin b=$W/t-${2//:/-}.bin
        [ -f "$a" ] && [ -f "$b" ] || continue
        ge convert "$a" "$a.csv" --detail >/dev/null && ge convert "$b" "$b.csv" --detail >/dev/null \
          && python3 scripts/gpu_compare.py "$a.csv" "$b.csv" --label "GPU trace, $1 vs $2" | tee -a "$OUT/compare.txt"
      done
    fi
  done
fi
lb() { "$BIN/llama-bench" -m "$M" -ngl 99 -p 512 -n 64 -r "$ROUNDS" -o jsonl "$@" 2>/dev/null; }
tag() { sed "s/^/{\"variant\": \"$1\", \"ncmoe\": $2, \"r\": /; s/\$/}/" | tee -a "$OUT/llama-bench.jsonl" | cut -c1-120; }
if has llamabench; then
  for nc in 0 "$NCMOE"; do
    vs=$VARIANTS0; [ "$nc" = 0 ] || vs=$VARIANTSN
    el "llama-bench plain, --n-cpu-moe $nc"
    lb -ncmoe "$nc" | tag plain "$nc"
    if has run && ge run --help >/dev/null 2>&1; then
      for v in $vs; do
        el "llama-bench under gguf-experts run ($v), --n-cpu-moe $nc"
        traced "$v" "$BIN/llama-bench" -m "$M" -ngl 99 -p 512 -n 64 -r "$ROUNDS" -o jsonl -ncmoe "$nc" 2>/dev/null | tag "$v" "$nc"
      done
      el "llama-bench plain again, --n-cpu-moe $nc (drift check)"
      lb -ncmoe "$nc" | tag plain-again "$nc"
    fi
  done
fi
if has selfcheck; then  # ids = top-k of the same run's router output, callback and keep-alive, on the GPU
  printf '%s\n' "Once upon a time, in a land far away, there lived a" \
    "$(python3 -c "print(' '.join(f'def f{i}(x): return x * {i} + {i % 7}' for i in range(30)))")" >"$W/prompts.txt"
  el "self-check, -ngl 99"
  python3 scripts/gpu_selfcheck.py "$M" --prompts "$W/prompts.txt" -n 16 --ngl 99 99 --modes callback keepalive 2>&1 \
    | grep -v "^llama\|^load" | tail -6 | tee -a "$OUT/selfcheck.txt"
fi
if has agree; then
  el "agreement: CPU (-ngl 0) vs GPU (-ngl 99) on the same prompts; self-check on each backend"
  python3 - <<'EOF' >"$W/prompts.txt"
print("Once upon a time, in a land far away, there lived a")
print(" ".join(f"def f{i}(x): return x * {i} + {i % 7}" for i in range(30)))
EOF
  python3 scripts/gpu_selfcheck.py "$M" --prompts "$W/prompts.txt" -n 16 --ngl 0 99 2>&1 | grep -v "^llama\|^load" | tail -6
  python3 scripts/gpu_agree.py "$M" --ngl 0 99 2>&1 | tee "$OUT/agree.md" | grep -v "^llama\|^load" | tail -60
fi
python3 scripts/gpu_big_table.py "$J" "$OUT/llama-bench.jsonl" 2>&1 | tee "$OUT/table.md"
el "done"
