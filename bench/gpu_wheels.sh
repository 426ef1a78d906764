#!/usr/bin/env bash
# Wheels for a GPU machine whose Python 3.12 has torch (and much else) but not our dependencies,
# and no network: the workspace's locked runtime versions (uv export --no-dev) plus TRL (the GRPO
# bench's comparison), as manylinux x86_64 wheels, minus what the machine already holds.
#
#   bash bench/gpu_wheels.sh [HAVE] [DIR]     # HAVE: names the machine holds (its `pip list`,
#                                             # one per line or comma-separated); DIR: .whl
#
# torch, triton and the CUDA / NVIDIA packages are always left out (the machine's own build
# stays). There, before the commands that need them:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/packages/astrai-core/src:$PWD/packages/astrai-train/src:$PWD/packages/astrai-serve/src
set -euo pipefail
cd "$(dirname "$0")/.."
HAVE="${1:-}"
DIR="${2:-.whl}"
# TRL for the comparison; tzdata, pandas's time zones (the machines' image held none).
EXTRA="trl==1.16.0 tzdata"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Keep the requirements whose markers hold on the machine (CPython 3.12, Linux, x86_64).
uv export --frozen --no-dev --all-packages --no-emit-workspace --no-hashes --no-header --no-annotate \
  | python3 -c '
import sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
machine = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_machine": "x86_64", "platform_system": "Linux", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
for line in sys.stdin:
    line = line.strip()
    if line and not line.startswith("#"):
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(machine):
            print(f"{req.name}{req.specifier}")
' > "$work/locked.txt"
printf '%s\n' $EXTRA >> "$work/locked.txt"

normalise() { tr 'A-Z_.' 'a-z--' | sed 's/^ *//; s/ *$//'; }
{
  printf '%s\n' torch triton
  [ -n "$HAVE" ] && tr ',' '\n' < "$HAVE" | awk '{print $1}'
} | normalise | sort -u > "$work/have.txt"

while IFS= read -r requirement; do
  name=$(printf '%s' "${requirement%%==*}" | normalise)
  case "$name" in cuda-* | nvidia-*) continue ;; esac
  grep -qx "$name" "$work/have.txt" || echo "$requirement"
done < "$work/locked.txt" | sort -u > "$work/wanted.txt"

mkdir -p "$DIR"
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" -r "$work/wanted.txt"
echo "$(wc -l < "$work/wanted.txt") wheels in $DIR ($(du -sh "$DIR" | cut -f1)): $(tr '\n' ' ' < "$work/wanted.txt")"
