// Torch-free launcher declarations of the criss_cross_attention CUDA kernels (csrc/cuda/criss_cross_attention.cu).
#pragma once
#include "segops/cuda/common.h"

namespace segops {
namespace cuda {}  // namespace cuda
}  // namespace segops
