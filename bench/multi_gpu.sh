#!/usr/bin/env bash
# Issue 8's evidence on a machine with 2 GPUs, from the repository root:
#
#   bash bench/multi_gpu.sh check train      # versions, then bench/train_scaling.py (~6 min on 2 H100s)
#   bash bench/multi_gpu.sh serve tests      # 1 vs 2 GPUs under bench/serve_load.py, then the 2-GPU tests (~4 min)
#   bash bench/multi_gpu.sh                  # all four in that order (longer than one 10-minute slot)
#
# Expects the packages importable (PYTHONPATH with packages/*/src, or installed) and python3 with
# torch. Figures go to stdout; with $OUT set, train_scaling.json and serve_load.txt land there.
set -euo pipefail
cd "$(dirname "$0")/.."

# NVLink multicast off: a program that uses it can put the host's shared GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
OUT_DIR="${OUT:-/tmp/astrai-multi-gpu}"
mkdir -p "$OUT_DIR"

check() {
  nvidia-smi -L
  python3 - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "GPUs", torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for name in ("lightning", "litserve", "datasets", "pyarrow", "fsspec", "tokenizers", "fastapi", "uvicorn", "zmq",
             "jsonargparse", "openai", "httpx", "astrai.core", "astrai.train", "astrai.serve"):
    module = importlib.import_module(name)
    print(f"{name:13s} {getattr(module, '__version__', '')} {getattr(module, '__file__', '') or list(module.__path__)[0]}")
# Dependencies the carried wheels declare but the image may hold in another version.
from importlib.metadata import PackageNotFoundError, requires, version
from packaging.requirements import Requirement
for dist in ("datasets", "litserve", "lightning", "fastapi", "uvicorn", "openai", "httpx2", "jsonargparse"):
    for spec in requires(dist) or []:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            print(f"WARNING: {dist} needs {req}, which is not installed")
            continue
        if not req.specifier.contains(have, prereleases=True):
            print(f"WARNING: {dist} needs {req}, found {req.name} {have}")
assert torch.cuda.device_count() >= 2, "needs 2 GPUs"
EOF
}

train() {
  python3 bench/train_scaling.py
}

serve() {
  # Same workload, a fresh server on 1 GPU, then on 2 (one engine each); random Qwen3-0.6B-shaped weights.
  python3 bench/serve_load.py --model configs/model/qwen3-0.6b.json --dtype bfloat16 --max-batch-size 128 \
    --num-requests 512 --prompt-len 16 128 --output-len 64 128 --devices 1 2 --json | tee "$OUT_DIR/serve_load.txt"
}

tests() {
  # (the CPU miniature in test_multi_gpu.py runs in CI; here only the GPU tests)
  python3 -m pytest tests/serve/test_serve_multi_gpu.py tests/train/test_multi_gpu.py -k "not on_cpu" -q -p no:cacheprovider -rs
}

sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(check train serve tests)
for section in "${sections[@]}"; do
  case "$section" in
    check|train|serve|tests) echo "=== $section ($(date +%T)) ==="; SECONDS=0; "$section"; echo "=== $section: ${SECONDS} s ===" ;;
    *) echo "unknown section '$section': use check, train, serve or tests" >&2; exit 2 ;;
  esac
done
