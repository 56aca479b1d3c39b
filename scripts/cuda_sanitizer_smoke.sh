#!/usr/bin/env bash
# compute-sanitizer over a smoke subset of the cuda tier: every op's forward and backward on the
# `cuda` backend against the fp64 reference, on every sample of every op description
# (tests/test_contract.py iterates them), all dtypes.
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own allocation, so an out-of-bounds
# access is not hidden inside a cached block. Needs a GPU. Tools: SEGOPS_SANITIZER_TOOLS
# (default "memcheck"; "memcheck racecheck synccheck" for the shared-memory checks too).
# Usage: scripts/cuda_sanitizer_smoke.sh [extra pytest args]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cs=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
[ -x "$cs" ] || { echo "compute-sanitizer not found (set COMPUTE_SANITIZER)" >&2; exit 1; }
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "cuda_sanitizer_smoke: needs a CUDA device" >&2; exit 1; }
status=0
for tool in ${SEGOPS_SANITIZER_TOOLS:-memcheck}; do
  echo "== compute-sanitizer --tool $tool"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$tool" --error-exitcode 97 --print-limit 20 \
    python -m pytest -q -p no:cacheprovider tests/test_contract.py \
      -k "matches_fp64 and cuda-cuda" "$@" || status=1
done
exit $status
