#!/usr/bin/env bash
# Issue 21's open GPU measurements on one GPU, from the repository root (each part fits one
# 10-minute slot):
#
#   bash bench/grpo_gpu.sh trainer    # GRPO's trainer vs the pre-training path on the same tokens
#                                     # (+ profiles, idle gaps, host waits of a step each; ~4 min)
#   bash bench/grpo_gpu.sh side       # sync vs the same rollouts alone vs TRL (~6 min on an H100)
#   bash bench/grpo_gpu.sh split      # both (longer than one 10-minute slot)
#   bash bench/grpo_gpu.sh async      # sync vs async-1 vs async-2 side by side (~6 min)
#   bash bench/grpo_gpu.sh engine     # the rollout engine's decode step at 512 sampled rows: host
#                                     # time against device time per step, the sampler alone (~2 min)
#   bash bench/grpo_gpu.sh tests      # the GRPO, loss-compile and structured-output GPU tests
#   bash bench/grpo_gpu.sh learning   # quickstart GRPO sync vs async-1 vs async-2 (part 6's GPU half)
#   bash bench/grpo_gpu.sh multistep  # the rollout engine one decode step per scheduling against
#                                     # groups of 8 (num_scheduler_steps), with its GPU test (~2 min)
#
# Expects the packages importable (PYTHONPATH with packages/*/src, or installed; on a machine
# without our dependencies, carry the wheels bench/gpu_wheels.sh downloads). The `trl` run
# needs trl, accelerate and psutil; `learning` needs jsonargparse with its `signatures` extra
# (typeshed-client), which LightningCLI uses. Figures go to stdout; with $OUT set, the JSON
# records land there. To bound a part's time use `timeout -s KILL`: Lightning's signal handler takes
# a plain SIGTERM and the run goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
OUT_DIR="${OUT:-/tmp/astrai-grpo-gpu}"
mkdir -p "$OUT_DIR"
MODEL=configs/model/qwen2.5-0.5b.json

trainer() {
  python3 bench/train_throughput.py --model "$MODEL" --batch-size 16 --seq-len 320 --accumulate 32 \
    --steps 3 --warmup 2 --param-dtype bfloat16 --compile --grpo --grpo-first --profile | tee "$OUT_DIR/trainer_split.txt"
}

side() {
  python3 bench/grpo_throughput.py --model "$MODEL" --device cuda --runs sync rollout trl --steps 3 --warmup 2 \
    --trl-steps 2 --run-timeout 200 --output "$OUT_DIR/grpo_throughput.json"
}

tests() {
  python3 -m pytest -q --tb=short -rfs -p no:cacheprovider tests/train/test_grpo_module.py tests/train/test_grpo_logps.py \
    tests/train/test_loss_compile.py tests/engine/test_structured_output.py tests/engine/test_host.py 2>&1 \
    | tee "$OUT_DIR/tests.txt"
  # Heads 8 wide (the tests' tiny model) in the paged-attention kernels: tiles at least 16 wide.
  python3 -m pytest -q --tb=short -rfs -p no:cacheprovider tests/kernels/test_paged_attention.py -k "4-2-8" 2>&1 \
    | tee -a "$OUT_DIR/tests.txt"
}

engine() {
  # Is a rollout decode step host-bound? Thread CPU time of whole steps (eager) and the kernels'
  # device time per step; then the sampler's host time alone at the model's vocabulary.
  python3 bench/engine_step_profile.py --model "$MODEL" --device cuda --batch 512 --prompt-len 64 --rollout \
    --steps 40 --kernels 15 | tee "$OUT_DIR/engine_step.txt"
  python3 bench/engine_step_profile.py --model "$MODEL" --device cuda --batch 512 --rollout --sampler-only \
    | tee -a "$OUT_DIR/engine_step.txt"
}

async() {
  python3 bench/grpo_throughput.py --model "$MODEL" --device cuda --runs sync async-1 async-2 --steps 3 --warmup 2 \
    --run-timeout 170 --output "$OUT_DIR/grpo_async.json"
}

multistep() {
  python3 -m pytest -q --tb=short -rfs -p no:cacheprovider tests/engine/test_cuda_graphs.py -k multi_step 2>&1 \
    | tee "$OUT_DIR/multistep_test.txt"
  for k in 1 8; do
    python3 bench/grpo_throughput.py --model "$MODEL" --device cuda --runs rollout --scheduler-steps "$k" --steps 3 \
      --warmup 1 --output "$OUT_DIR/rollout_k$k.json"
  done
}

split() {
  trainer
  side
}

learning() {
  # The quickstart's checkpoints stay out of $OUT_DIR (only the figures come back from a device run).
  python3 bench/grpo_async_quickstart.py --out /tmp/astrai-grpo-quickstart --runs sync async-1 async-2 \
    | tee "$OUT_DIR/learning.txt"
}

for part in "${@:-split tests}"; do
  for name in $part; do
    started=$SECONDS
    "$name"
    echo "== $name: $((SECONDS - started)) s"
  done
done
