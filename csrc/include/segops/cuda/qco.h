// Torch-free launcher declarations of the qco CUDA kernels (csrc/cuda/qco.cu).
#pragma once
#include "segops/cuda/common.h"

namespace segops {
namespace cuda {}  // namespace cuda
}  // namespace segops
