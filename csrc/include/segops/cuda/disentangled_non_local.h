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

namespace segops::cuda {

struct DnlShape {
  int64_t N = 0, Ck = 0, Cv = 0, Lq = 0, Lk = 0;
  bool whiten = false;
  double s = 1.0;
  DType dtype = DType::kFloat32;
};

struct DnlForwardParams {
  DnlShape shape;
  const void* query = nullptr;  // (N, Ck, Lq)
  const void* key = nullptr;    // (N, Ck, Lk)
  const void* value = nullptr;  // (N, Cv, Lk)
  const void* unary = nullptr;  // (N, Lk), or nullptr for no unary term
  void* out = nullptr;          // (N, Cv, Lq)
  void* lse = nullptr;          // (N, Lq), accumulation type: per-query log-sum-exp
  void* g = nullptr;            // (N, Cv), accumulation type; written only with unary (the
                                // caller zero-fills it otherwise)
  void* lse_u = nullptr;        // (N,), accumulation type; written only with unary (zero-filled
                                // by the caller otherwise)
  void* workspace = nullptr;    // disentangled_non_local_forward_workspace_bytes(*this) bytes
};

struct DnlBackwardParams {
  DnlShape shape;
  const void* grad_out = nullptr;  // (N, Cv, Lq)
  const void* query = nullptr;     // (N, Ck, Lq)
  const void* key = nullptr;       // (N, Ck, Lk)
  const void* value = nullptr;     // (N, Cv, Lk)
  const void* unary = nullptr;     // (N, Lk), or nullptr
  const void* out = nullptr;       // (N, Cv, Lq), the forward output
  const void* lse = nullptr;       // (N, Lq), accumulation type
  const void* g = nullptr;         // (N, Cv), accumulation type (read only with unary)
  const void* lse_u = nullptr;     // (N,), accumulation type (read only with unary)
  void *grad_query = nullptr, *grad_key = nullptr, *grad_value = nullptr;  // like query, key, value
  void* grad_unary = nullptr;      // (N, Lk); only with unary
  void* workspace = nullptr;       // disentangled_non_local_backward_workspace_bytes(*this) bytes
};

// Kernels whose grid would be empty are skipped; sizes the kernels cannot address (more than
// kMaxGridX blocks) return cudaErrorInvalidValue. Requires Lk > 0 when N * Lq > 0.
SEGOPS_CUDA_LAUNCHER(disentangled_non_local_forward, DnlForwardParams);
SEGOPS_CUDA_LAUNCHER(disentangled_non_local_backward, DnlBackwardParams);

}  // namespace segops::cuda
