#!/usr/bin/env bash
# Issue 21's table on a GPU machine (docs/capture.md, "capture as cheap as run"): one CUDA build (scripts/gpu_big.sh),
# then per model of MODELS (ARCH:QUANT:LAYERS[:NCMOE]) in the same call: stock llama-bench pp512/tg64 plain, under
# `gguf-experts run` (keep-alive, with and without --weights) and plain again (drift); `capture`'s in-process
# keep-alive recorder against plain in the same process (scripts/bench_gpu_big.py); the self-check (ids = top-k of
# the same run's router output) for the callback and keep-alive paths. Each model is deleted after its rows.
#     OUT=/some/dir bash scripts/gpu_issue21.sh     (prepared by scripts/gpu_prepare_big.sh; carry .gpu)
# Knobs: MODELS (default "qwen3moe:Q8_0:48:24 qwen3moe:Q4_K:48:24 gpt-oss:MXFP4:24:12"), ROUNDS (5), SAVE_BUILD, PREBUILT,
# AB_SLOTS=1 (every keep-alive variant also with GGUF_EXPERTS_SLOTS=0, interleaved: the device slots' A/B).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-issue21-out}
mkdir -p "$OUT"
REPO=$PWD
V="keepalive keepalive:w" PV="plain,capture plain,capture-weights"
if [ "${AB_SLOTS:-0}" = 1 ]; then
  V="keepalive keepalive:noslots keepalive:w keepalive:w:noslots"
  PV="plain,capture noslots/plain,capture plain,capture-weights noslots/plain,capture-weights"
fi
for spec in ${MODELS:-qwen3moe:Q8_0:48:24 qwen3moe:Q4_K:48:24 gpt-oss:MXFP4:24:12}; do
  IFS=: read -r arch quant layers ncmoe <<<"$spec"
  o=$OUT/$arch-$quant-$layers
  echo "=== $arch $quant, $layers layers, --n-cpu-moe 0 and ${ncmoe:-$((layers / 2))}"
  ARCH=$arch QUANT=$quant LAYERS=$layers NCMOE=${ncmoe:-$((layers / 2))} OUT=$o CHARNESS=0 \
    STEPS="build model python llamabench run selfcheck" VARIANTS0="$V" VARIANTSN="$V" PYVARIANTS="$PV" bash scripts/gpu_big.sh
  for t in "${WORK:-/tmp/gpu-big}"/t-keepalive*.bin; do  # keep-alive's device-to-host copies per ubatch (meta)
    [ -f "$t" ] && (cd /tmp && PYTHONPATH=/tmp/site:$REPO python3 -c "import sys; from gguf_experts.trace.reader import read_trace
c = read_trace(sys.argv[1]).header.meta.get('keepalive_copies') or {}
print(sys.argv[1].rsplit('/', 1)[-1], 'copies per ubatch:', round(c['copies'] / c['ubatches'], 2) if c else None, c)" "$t") \
      | tee -a "$o/copies.txt"
  done
  rm -f "${WORK:-/tmp/gpu-big}"/t-*.bin
  [ "${SAVE_BUILD:-0}" = 1 ] && ls "$o"/cuda.tar.xz.* >/dev/null 2>&1 && mv "$o"/cuda.tar.xz.* "$OUT"/ && export PREBUILT=$OUT SAVE_BUILD=0
  rm -f "${WORK:-/tmp/gpu-big}"/big-*.gguf
done
