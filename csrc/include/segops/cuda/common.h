// Torch-free declarations shared by the CUDA kernels (csrc/cuda/*.cu) and the torch binding
// (csrc/cuda_binding.cpp). Only the CUDA runtime API and the standard library are visible here.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace segops {
namespace cuda {

// Element type of the tensors a launcher receives as raw pointers.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

}  // namespace cuda
}  // namespace segops
