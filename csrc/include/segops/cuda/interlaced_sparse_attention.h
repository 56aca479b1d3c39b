// Torch-free launcher declarations of the interlaced_sparse_attention CUDA kernels (csrc/cuda/interlaced_sparse_attention.cu).
#pragma once
#include <cstddef>
#include <cstdint>

#include "segops/cuda/common.h"

namespace segops::cuda {

// Shapes and options shared by the forward and the backward. query, key: (N, Ck, H, W); value,
// out: (N, Cv, H, W); lse: (N, H, W) in the accumulation dtype (float64 for float64 data,
// float32 otherwise). H % ph == 0 and W % pw == 0. long_range selects the long-range groups
// (equal (y mod ph, x mod pw)); otherwise the ph x pw blocks (short range).
// Optional logit terms (window attention): with L members and G groups per sample, the logit
// of members (i, j) of group g of sample n is scale q_i.k_j + bias[n % nb, i, j]
// + mask[g % nm, i, j]; bias (nb, L, L) with N % nb == 0, mask (nm, L, L) finite with
// G % nm == 0. nb, nm are read only where the pointer is set.
struct IsaShape {
  int64_t N = 0, Ck = 0, Cv = 0, H = 0, W = 0, ph = 1, pw = 1;
  bool long_range = true;
  double scale = 1.0;
  DType dtype = DType::kFloat32;
  int64_t nb = 1, nm = 1;
};

// All tensors contiguous, of `dtype` except lse (accumulation dtype); bias, mask may be null.
struct IsaForwardParams {
  IsaShape shape;
  const void *query = nullptr, *key = nullptr, *value = nullptr;
  const void *bias = nullptr, *mask = nullptr;  // (nb, L, L), (nm, L, L)
  void* out = nullptr;        // (N, Cv, H, W)
  void* lse = nullptr;        // (N, H, W), natural log-sum-exp of the logits per position
  void* workspace = nullptr;  // interlaced_sparse_attention_forward_workspace_bytes (none) bytes
};

struct IsaBackwardParams {
  IsaShape shape;
  const void* grad_out = nullptr;  // (N, Cv, H, W)
  const void *query = nullptr, *key = nullptr, *value = nullptr;
  const void *bias = nullptr, *mask = nullptr;  // as in the forward
  const void *out = nullptr, *lse = nullptr;  // the forward's output and lse
  void *grad_query = nullptr, *grad_key = nullptr, *grad_value = nullptr;
  void* grad_bias = nullptr;  // (nb, L, L) when bias is set
  // Scratch of interlaced_sparse_attention_backward_workspace_bytes(params) bytes (the
  // per-position delta = <dO, O>, N*H*W accumulation-dtype values, and with a bias its
  // gradient's nb*L*L accumulation-dtype sums), aligned to 16 bytes.
  void* workspace = nullptr;
};

// Every output element is written (no pre-zeroing needed). Requires N, Ck, Cv, H, W > 0;
// returns cudaErrorInvalidValue for sizes the kernels cannot handle (a bad dtype, non-positive
// sizes, H or W not divisible by the block size, grids beyond the hardware limits).
SEGOPS_CUDA_LAUNCHER(interlaced_sparse_attention_forward, IsaForwardParams);
SEGOPS_CUDA_LAUNCHER(interlaced_sparse_attention_backward, IsaBackwardParams);

}  // namespace segops::cuda
