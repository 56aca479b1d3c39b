// Torch-free launcher declarations of the criss_cross_attention CUDA kernels (csrc/cuda/criss_cross_attention.cu).
//
// Same contract as csrc/cpu/criss_cross_attention.cpp: query, key (N, Ck, H, W), value
// (N, Cv, H, W), all contiguous and of `dtype`; out (N, Cv, H, W) of `dtype`; stats (N, 2, H, W)
// = (maximum energy m, log l with l = sum exp(e - m)) per position over the H + W - 1 positions of
// its row and column, in the accumulation dtype (float64 for float64 inputs, float32 otherwise).
// Gradients grad_query, grad_key, grad_value have the shapes and dtype of query, key, value.
//
// Both launchers need a device workspace of *_workspace_bytes(params) bytes (256-byte aligned
// start; may be 0 bytes, then `workspace` may be null): transposed copies of the inputs for the
// column pass and, for float16/bfloat16, fp32 buffers for the column parts of the results.
// Sizes with N * H * W == 0 launch nothing. Returns cudaErrorInvalidValue for an unknown dtype, a
// missing workspace or a grid the kernels cannot address.
#pragma once
#include <cstddef>
#include <cstdint>

#include "segops/cuda/common.h"

namespace segops::cuda {

struct CcaShape {
  int64_t N = 0, Ck = 0, Cv = 0, H = 0, W = 0;
  DType dtype = DType::kFloat32;
};

struct CcaForwardParams {
  CcaShape shape;
  const void* query = nullptr;  // (N, Ck, H, W)
  const void* key = nullptr;    // (N, Ck, H, W)
  const void* value = nullptr;  // (N, Cv, H, W)
  void* out = nullptr;          // (N, Cv, H, W)
  void* stats = nullptr;        // (N, 2, H, W), accumulation dtype
  void* workspace = nullptr;    // criss_cross_attention_forward_workspace_bytes bytes
};

struct CcaBackwardParams {
  CcaShape shape;
  const void* grad_out = nullptr;  // (N, Cv, H, W)
  const void* query = nullptr;     // (N, Ck, H, W)
  const void* key = nullptr;       // (N, Ck, H, W)
  const void* value = nullptr;     // (N, Cv, H, W)
  const void* out = nullptr;       // (N, Cv, H, W), the forward's output
  const void* stats = nullptr;     // (N, 2, H, W), accumulation dtype, the forward's statistics
  void *grad_query = nullptr, *grad_key = nullptr, *grad_value = nullptr;  // like query, key, value
  void* workspace = nullptr;       // criss_cross_attention_backward_workspace_bytes bytes
};

SEGOPS_CUDA_LAUNCHER(criss_cross_attention_forward, CcaForwardParams);
SEGOPS_CUDA_LAUNCHER(criss_cross_attention_backward, CcaBackwardParams);

}  // namespace segops::cuda
