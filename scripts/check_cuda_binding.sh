#!/usr/bin/env bash
# Syntax-check the torch bindings of the CUDA kernels (csrc/cuda/*.cpp) against the installed
# torch's headers and the CUDA toolkit's runtime headers, without a GPU or a CUDA build of torch
# (c10/cuda headers are header-only here; C10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for the
# configure header a CPU wheel lacks). Exits 0 with a note when torch or the CUDA headers are absent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
cuda_home=${CUDA_HOME:-/usr/local/cuda}
[ -f "$cuda_home/include/cuda_runtime_api.h" ] || cuda_home=$(dirname "$(dirname "$(readlink -f "$nvcc_bin")")")
if [ ! -f "$cuda_home/include/cuda_runtime_api.h" ]; then
  echo "check_cuda_binding: no CUDA headers under $cuda_home, skipping"; exit 0
fi
python=${PYTHON:-python}
incs=$("$python" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem '+p for p in include_paths()))") || {
  echo "check_cuda_binding: torch not importable, skipping"; exit 0; }
version=$("$python" -c 'import torch; print(torch.__version__)')
shopt -s nullglob
files=("$root"/csrc/cuda/*.cpp)
if [ ${#files[@]} -eq 0 ]; then echo "check_cuda_binding: no .cpp files under csrc/cuda"; exit 1; fi
status=0
for f in "${files[@]}"; do
  # shellcheck disable=SC2086
  if ${CXX:-g++} -fsyntax-only -std=c++17 -Wall -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DSEGOPS_WITH_CUDA=1 \
       $incs -I"$cuda_home/include" -I"$root/csrc/include" "$f"; then
    echo "ok   $(realpath --relative-to="$root" "$f") (syntax, against torch $version)"
  else
    echo "FAIL $(realpath --relative-to="$root" "$f")"; status=1
  fi
done
exit $status
