// Torch-free launcher declarations of the disentangled_non_local CUDA kernels (csrc/cuda/disentangled_non_local.cu).
#pragma once
#include "segops/cuda/common.h"

namespace segops {
namespace cuda {}  // namespace cuda
}  // namespace segops
