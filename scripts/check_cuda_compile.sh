#!/usr/bin/env bash
# Compile-check every CUDA kernel file (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90, without a
# GPU and without torch: kernel files include only CUDA headers and csrc/include.
# Compile only; CI runs scripts/check_cuda_resources.py instead, which compiles the
# same files once and also checks registers, spills and shared memory.
# Usage: scripts/check_cuda_compile.sh [extra nvcc flags]. Exits 0 with a note when nvcc is absent
# unless SEGOPS_REQUIRE_NVCC=1.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$nvcc" ]; then
  if [ "${SEGOPS_REQUIRE_NVCC:-0}" = 1 ]; then echo "nvcc not found" >&2; exit 1; fi
  echo "check_cuda_compile: nvcc not found, skipping"; exit 0
fi
shopt -s nullglob
files=("$root"/csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "check_cuda_compile: no .cu files under csrc/cuda"; exit 0; fi
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
status=0
for f in "${files[@]}"; do
  if "$nvcc" -c -std=c++17 -O1 --expt-relaxed-constexpr -I"$root/csrc/include" \
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
       "$@" "$f" -o "$out/$(basename "$f").o"; then
    echo "ok   $(realpath --relative-to="$root" "$f")"
  else
    echo "FAIL $(realpath --relative-to="$root" "$f")"; status=1
  fi
done
exit $status
