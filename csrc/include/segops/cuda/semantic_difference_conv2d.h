// Torch-free launcher declarations of the semantic_difference_conv2d CUDA kernels (csrc/cuda/semantic_difference_conv2d.cu).
#pragma once
#include "segops/cuda/common.h"

namespace segops {
namespace cuda {}  // namespace cuda
}  // namespace segops
