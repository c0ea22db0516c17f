#!/usr/bin/env bash
# Issue 21's table on a GPU machine (docs/capture.md, "capture as cheap as run"): one CUDA build (scripts/gpu_big.sh),
# then per model of MODELS (ARCH:QUANT:LAYERS[:NCMOE]) in the same call: stock llama-bench pp512/tg64 plain, under
# `gguf-experts run` (keep-alive, with and without --weights) and plain again (drift); `capture`'s in-process
# keep-alive recorder against plain in the same process (scripts/bench_gpu_big.py); the self-check (ids = top-k of
# the same run's router output) for the callback and keep-alive paths. Each model is deleted after its rows.
#     OUT=/some/dir bash scripts/gpu_issue21.sh     (prepared by scripts/gpu_prepare_big.sh; carry .gpu)
# Knobs: MODELS (default "qwen3moe:Q8_0:48:24 qwen3moe:Q4_K:48:24 gpt-oss:MXFP4:24:12"), ROUNDS (5), SAVE_BUILD, PREBUILT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-issue21-out}
mkdir -p "$OUT"
for spec in ${MODELS:-qwen3moe:Q8_0:48:24 qwen3moe:Q4_K:48:24 gpt-oss:MXFP4:24:12}; do
  IFS=: read -r arch quant layers ncmoe <<<"$spec"
  o=$OUT/$arch-$quant-$layers
  echo "=== $arch $quant, $layers layers, --n-cpu-moe 0 and ${ncmoe:-$((layers / 2))}"
  ARCH=$arch QUANT=$quant LAYERS=$layers NCMOE=${ncmoe:-$((layers / 2))} OUT=$o CHARNESS=0 \
    STEPS="build model python llamabench run selfcheck" VARIANTS0="keepalive keepalive:w" VARIANTSN="keepalive keepalive:w" \
    PYVARIANTS="plain,capture plain,capture-weights" bash scripts/gpu_big.sh
  [ "${SAVE_BUILD:-0}" = 1 ] && ls "$o"/cuda.tar.xz.* >/dev/null 2>&1 && mv "$o"/cuda.tar.xz.* "$OUT"/ && export PREBUILT=$OUT SAVE_BUILD=0
  rm -f "${WORK:-/tmp/gpu-big}"/big-*.gguf
done
