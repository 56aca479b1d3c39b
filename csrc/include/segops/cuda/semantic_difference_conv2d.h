// Torch-free launcher declarations of the semantic_difference_conv2d CUDA kernels (csrc/cuda/semantic_difference_conv2d.cu).
//
//   Y[n,o,p] = b[o] + sum_{c,t} w[o,c,t] * S(c,p,t) * (U[c,p+d_t] - U[c,p])   (SPEC 2.4)
//
// All tensors are contiguous, on one device, of one dtype (`dtype`). The launchers need a
// device scratch buffer of *_workspace_bytes(params) bytes (may be 0, then `workspace` may be
// null); its contents on entry do not matter.
#pragma once
#include <cstddef>

#include "segops/cuda/common.h"

namespace segops::cuda {

// Similarity kinds, the same numbering as the CPU and Triton backends.
enum SdcSimilarity : int { kSdcNone = 0, kSdcCharbonnier = 1, kSdcGaussian = 2 };

// Shape shared by forward and backward. input (N, Cin, H, W), guidance (N, Cg, H, W),
// weight (Cout, Cin, k, k) with k odd, stride 1, "same" zero padding dilation * (k - 1) / 2.
struct SdcShape {
  int64_t N = 0, Cin = 0, Cg = 0, Cout = 0, H = 0, W = 0, k = 1, dilation = 1;
  int similarity = kSdcCharbonnier;  // SdcSimilarity; charbonnier needs Cg == Cin
  double sigma = 1.0;
  DType dtype = DType::kFloat32;
};

struct SdcForwardParams {
  SdcShape shape;
  const void *input = nullptr, *guidance = nullptr, *weight = nullptr;
  const void* bias = nullptr;  // (Cout,) or null
  void* out = nullptr;         // (N, Cout, H, W)
  void* workspace = nullptr;   // semantic_difference_conv2d_forward_workspace_bytes(*this) bytes
};

struct SdcBackwardParams {
  SdcShape shape;
  const void* grad_out = nullptr;  // (N, Cout, H, W)
  const void *input = nullptr, *guidance = nullptr, *weight = nullptr;
  void* grad_input = nullptr;     // (N, Cin, H, W), fully written
  void* grad_guidance = nullptr;  // (N, Cg, H, W), fully written (zeros for "none")
  void* grad_weight = nullptr;    // (Cout, Cin, k, k), fully written
  void* grad_bias = nullptr;      // (Cout,), fully written: grad_out summed over (N, H, W)
  void* workspace = nullptr;      // semantic_difference_conv2d_backward_workspace_bytes(*this) bytes
};

// Workspace: forward, the gaussian similarity S (N, k^2, H*W) in the accumulation type; backward,
// gaussian S and per-channel-block dL/dS partials, the tap-major weight copy, and the split-K
// partial sums of grad_weight (accumulation type), reduced in a fixed order.
// Both return cudaErrorInvalidValue for sizes the kernels do not support (H*W >= 2^31, a grid
// dimension over its limit, k even, a bad similarity, charbonnier with Cg != Cin) and the first
// launch error otherwise. Empty tensors must be handled by the caller (nothing is launched for
// them here either, but outputs are then left untouched).
SEGOPS_CUDA_LAUNCHER(semantic_difference_conv2d_forward, SdcForwardParams);
SEGOPS_CUDA_LAUNCHER(semantic_difference_conv2d_backward, SdcBackwardParams);

}  // namespace segops::cuda
