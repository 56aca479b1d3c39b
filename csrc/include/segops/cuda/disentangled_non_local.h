// Torch-free launcher declarations of the disentangled_non_local CUDA kernels (csrc/cuda/disentangled_non_local.cu).
//
// Flattened, contiguous operands: query (N, Ck, Lq), key (N, Ck, Lk), value (N, Cv, Lk), unary
// (N, Lk) or none, all of `dtype`; `s` is the combined logit factor (scale / temperature).
// The saved statistics lse (N, Lq), g (N, Cv), lse_u (N,) are in the accumulation type
// (float64 for float64 inputs, float32 otherwise). Both launchers need a scratch buffer of
// *_workspace_bytes(params) bytes (any alignment of at least 256 bytes; at::empty gives that).
#pragma once
#include <cstddef>
#include <cstdint>

#include "segops/cuda/common.h"

namespace segops {
namespace cuda {

struct DisentangledNonLocalForwardParams {
  const void* query = nullptr;  // (N, Ck, Lq)
  const void* key = nullptr;    // (N, Ck, Lk)
  const void* value = nullptr;  // (N, Cv, Lk)
  const void* unary = nullptr;  // (N, Lk), or nullptr for no unary term
  void* out = nullptr;          // (N, Cv, Lq), dtype
  void* lse = nullptr;          // (N, Lq), accumulation type: per-query log-sum-exp
  void* g = nullptr;            // (N, Cv), accumulation type; written only with unary (the
                                // caller zero-fills it otherwise)
  void* lse_u = nullptr;        // (N,), accumulation type; written only with unary (zero-filled
                                // by the caller otherwise)
  void* workspace = nullptr;    // disentangled_non_local_forward_workspace_bytes(*this) bytes
  int64_t N = 0, Ck = 0, Cv = 0, Lq = 0, Lk = 0;
  bool whiten = false;
  double s = 1.0;
  DType dtype = DType::kFloat32;
};

struct DisentangledNonLocalBackwardParams {
  const void* grad_out = nullptr;  // (N, Cv, Lq), dtype
  const void* query = nullptr;     // (N, Ck, Lq)
  const void* key = nullptr;       // (N, Ck, Lk)
  const void* value = nullptr;     // (N, Cv, Lk)
  const void* unary = nullptr;     // (N, Lk), or nullptr
  const void* out = nullptr;       // (N, Cv, Lq), the forward output
  const void* lse = nullptr;       // (N, Lq), accumulation type
  const void* g = nullptr;         // (N, Cv), accumulation type (read only with unary)
  const void* lse_u = nullptr;     // (N,), accumulation type (read only with unary)
  void* dq = nullptr;              // (N, Ck, Lq), dtype
  void* dk = nullptr;              // (N, Ck, Lk), dtype
  void* dv = nullptr;              // (N, Cv, Lk), dtype
  void* du = nullptr;              // (N, Lk), dtype; only with unary
  void* workspace = nullptr;       // disentangled_non_local_backward_workspace_bytes(*this) bytes
  int64_t N = 0, Ck = 0, Cv = 0, Lq = 0, Lk = 0;
  bool whiten = false;
  double s = 1.0;
  DType dtype = DType::kFloat32;
};

size_t disentangled_non_local_forward_workspace_bytes(const DisentangledNonLocalForwardParams& p);
size_t disentangled_non_local_backward_workspace_bytes(const DisentangledNonLocalBackwardParams& p);

// Kernels whose grid would be empty are skipped; sizes the kernels cannot address (more than
// 2^31 - 1 blocks) return cudaErrorInvalidValue. Requires Lk > 0 when N * Lq > 0.
cudaError_t disentangled_non_local_forward(const DisentangledNonLocalForwardParams& p,
                                           cudaStream_t stream);
cudaError_t disentangled_non_local_backward(const DisentangledNonLocalBackwardParams& p,
                                            cudaStream_t stream);

}  // namespace cuda
}  // namespace segops
