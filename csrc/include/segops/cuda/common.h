// Torch-free declarations shared by the CUDA kernels (csrc/cuda/*.cu) and their torch bindings
// (csrc/cuda/*.cpp). Only the CUDA runtime API and the standard library are visible here.
//
// Launcher parameter structs (segops/cuda/<op>.h) follow one layout: `shape` (sizes, options and
// dtype, shared by forward and backward) first, then the inputs in the op's argument order, the
// forward's saved outputs, the results (`out`, `grad_<input>`), and `workspace` last.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace segops::cuda {

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

// Declares the launcher `name` of a params struct and the size of the workspace it needs:
//   size_t <name>_workspace_bytes(const Params& p);
//   cudaError_t <name>(const Params& p, cudaStream_t stream);
#define SEGOPS_CUDA_LAUNCHER(name, Params)       \
  size_t name##_workspace_bytes(const Params& p); \
  cudaError_t name(const Params& p, cudaStream_t stream)

// Launch limits: blocks along gridDim.x, and along gridDim.y / gridDim.z.
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridYZ = 65535;

// Cuts consecutive 256-byte-aligned slices out of a launcher's workspace. With a null base it
// only counts: `used` is then the workspace size (the *_workspace_bytes functions).
struct WorkspaceCarver {
  static constexpr size_t kAlign = 256;
  static size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

  void* base = nullptr;
  size_t used = 0;

  void* take_bytes(size_t bytes) {
    void* slice = base == nullptr ? nullptr : static_cast<char*>(base) + used;
    used += align_up(bytes);
    return slice;
  }
  template <typename E> E* take(int64_t count) {
    return static_cast<E*>(take_bytes(static_cast<size_t>(count) * sizeof(E)));
  }
};

// The size of the workspace that carve(WorkspaceCarver&, A{}) cuts for the accumulation type A of
// `t` (a launcher's *_workspace_bytes runs its carving with a null base).
template <typename Carve>
size_t workspace_size(DType t, Carve carve) {
  WorkspaceCarver ws;
  if (t == DType::kFloat64) {
    carve(ws, double{});
  } else {
    carve(ws, float{});
  }
  return ws.used;
}

}  // namespace segops::cuda
