#!/usr/bin/env bash
# What leaving out ggml's AMX path costs on a host where AMX works (issue 16), measured in one run.
#
#     bash scripts/bench_amx.sh LLAMA_SRC.tar.xz      # on a machine whose CPU has AMX (e.g. the GPU host, CPU only)
#
# LLAMA_SRC.tar.xz: the llama.cpp that llama-cpp-python vendors, e.g. `tar cJf llama-src.tar.xz -C
# "$(dirname "$(bash scripts/build_llama_tools.sh)")/../../src" --exclude=./models --exclude=./docs .` (the tools
# cache keeps it in src/). The Python it finds needs numpy and gguf (PYTHONPATH=DIR with a copy of gguf-py works).
# Measured 2026-12-06 on a 16-core AMX host, 8-layer model: no-AMX / AMX = 0.834 (Q8_0 pp512), 0.859 (Q8_0 tg32),
# 0.881 (Q4_K pp512), 0.905 (Q4_K tg32).
#
# Builds the vendored llama.cpp twice, CPU only: stock -march=native (AMX on), and -march=native without AMX (the
# flags of gguf_experts/native_build.py). Makes one MoE model (scripts/make_big_model.py, Qwen3-30B-A3B width,
# LAYERS layers) at Q8_0 and Q4_K, runs llama-bench pp512 / tg32 with the builds alternating, and prints each
# build's tokens/s and the ratio no-AMX / AMX. It also says whether the AMX build really runs AMX
# (llama.cpp's system info).
set -euo pipefail
SRC_TAR=${1:?usage: bench_amx.sh LLAMA_SRC.tar.xz}
W=${WORK:-/tmp/amxbench}
LAYERS=${LAYERS:-8}
THREADS=${THREADS:-$(nproc)}
OUT=${OUT:-$W/out}
mkdir -p "$W/src" "$OUT"
tar xJf "$SRC_TAR" -C "$W/src"
PY=
for p in python3 /opt/torch/.venv/bin/python; do
  if $p -c 'import numpy' 2>/dev/null; then PY=$p; break; fi
done
[ -n "$PY" ] || { echo "bench_amx: no Python with numpy here" >&2; exit 2; }
eval "NOAMX=($($PY gguf_experts/native_build.py cmake-args))"
build() {
  local name=$1; shift
  cmake -S "$W/src" -B "$W/b-$name" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DGGML_CUDA=OFF "$@" >"$OUT/cfg-$name.log" 2>&1
  cmake --build "$W/b-$name" -j "$THREADS" --target llama-bench >"$OUT/build-$name.log" 2>&1
}
t0=$(date +%s)
build amx -DGGML_NATIVE=ON &
build noamx "${NOAMX[@]}" &
$PY scripts/make_big_model.py "$W/m-q8.gguf" --quant Q8_0 --layers "$LAYERS" >"$OUT/make-q8.log" 2>&1 &
$PY scripts/make_big_model.py "$W/m-q4k.gguf" --quant Q4_K --layers "$LAYERS" >"$OUT/make-q4k.log" 2>&1 &
wait
echo "builds and models: $(( $(date +%s) - t0 )) s; no-AMX flags: ${NOAMX[*]}"
echo "stock -march=native defines: $(echo | cc -march=native -dM -E - | grep -o '__AMX_[A-Z0-9]*__' | tr '\n' ' ')"
for m in q8 q4k; do
  for round in 1 2; do
    for b in amx noamx; do
      "$W/b-$b/bin/llama-bench" -m "$W/m-$m.gguf" -p 512 -n 32 -t "$THREADS" -r 3 -o json 2>"$OUT/bench-$m-$b-$round.err" \
        >"$OUT/bench-$m-$b-$round.json"
    done
  done
done
echo "AMX build's load log: $(grep -h -i -o 'AMX[^,]*' "$OUT"/bench-q8-amx-1.err | sort -u | head -3 | tr '\n' ' ')"
$PY - "$OUT" <<'PY'
import glob, json, os, statistics, sys
out = sys.argv[1]
rows = {}
for f in sorted(glob.glob(os.path.join(out, "bench-*.json"))):
    _, m, b, r = os.path.basename(f)[:-5].split("-")
    for rec in json.load(open(f)):
        test = f"pp{rec['n_prompt']}" if rec["n_prompt"] else f"tg{rec['n_gen']}"
        rows.setdefault((m, test), {}).setdefault(b, []).append(rec["avg_ts"])
print(f"{'model':6} {'test':6} {'AMX t/s':>10} {'no-AMX t/s':>11} {'no-AMX / AMX':>13}")
for (m, test), d in sorted(rows.items()):
    a, n = statistics.mean(d["amx"]), statistics.mean(d["noamx"])
    print(f"{m:6} {test:6} {a:10.1f} {n:11.1f} {n / a:13.3f}")
PY
