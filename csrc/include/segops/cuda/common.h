// Torch-free declarations shared by the CUDA kernels (csrc/cuda/*.cu) and the torch binding
// (csrc/cuda_binding.cpp). Only the CUDA runtime API and the standard library are visible here.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
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

// Bytes per element of the storage type, and of its accumulation type (fp64 for fp64, else fp32).
inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
  }
  return 0;
}
inline size_t acc_size(DType t) { return t == DType::kFloat64 ? sizeof(double) : sizeof(float); }

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace segops
