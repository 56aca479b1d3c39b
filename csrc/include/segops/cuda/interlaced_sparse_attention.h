// Torch-free launcher declarations of the interlaced_sparse_attention CUDA kernels (csrc/cuda/interlaced_sparse_attention.cu).
#pragma once
#include "segops/cuda/common.h"

namespace segops {
namespace cuda {}  // namespace cuda
}  // namespace segops
