// Schemas of the fused kernels behind segops's Python custom ops (library `segops_C`).
// Kernels register their implementations next to their code (csrc/cpu/<op>.cpp for CPU,
// csrc/cuda/<op>_binding.cpp for CUDA). The public ops `segops::<name>` (with fakes,
// autograd and backend dispatch) are defined in Python, in segops/ops/<name>.py.
#include <torch/library.h>

TORCH_LIBRARY(segops_C, m) {
  // One block per operator; each op's forward returns what its backward needs.
}
