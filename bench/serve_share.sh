#!/usr/bin/env bash
# Issue 18's acceptance on one GPU: astrai-serve against the engine alone on the same workload
# and GPU, in one run (bench/serve_load.py --engine-baseline), Qwen3-0.6B shape, bf16 weights.
#
#   bash bench/serve_share.sh                      # bf16 KV cache: short, mixed, decode256
#   bash bench/serve_share.sh fp8 short mixed      # fp8 KV cache, the workloads named
#
# Expects the packages importable (PYTHONPATH with packages/*/src, or installed) and python3
# with torch. With $OUT set, each workload's report lands there as <workload>-<kv>.txt.
# SCALE=4 sends four times each preset's requests (same lengths): a timed pass of 2-3 s moves
# the share by +-10-15% from run to run, a longer one less.
set -uo pipefail
cd "$(dirname "$0")/.."
kv="${1:-auto}"
shift || true
workloads=("$@")
[ ${#workloads[@]} -eq 0 ] && workloads=(short mixed decode256)
out="${OUT:-/tmp/astrai-serve-share}"
mkdir -p "$out"
export TOKENIZERS_PARALLELISM=false
for w in "${workloads[@]}"; do
  case "$w" in short) n=512 ;; *) n=256 ;; esac
  n=$((n * ${SCALE:-1}))
  echo "== workload $w, KV cache $kv, $n requests"
  python3 bench/serve_load.py --model configs/model/qwen3-0.6b.json --device cuda --dtype bfloat16 \
    --workload "$w" --num-requests "$n" --kv-cache-dtype "$kv" --temperature 0 --engine-baseline --client-procs 8 --json \
    2>&1 | grep -v -e 'leaked function' -e 'leaked instance' -e 'leaked type' -e nanobind | tee "$out/$w-$kv.txt"
done
