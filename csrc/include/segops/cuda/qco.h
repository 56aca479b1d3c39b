// Torch-free launcher declarations of the qco CUDA kernels (csrc/cuda/qco.cu): qco_forward /
// qco_backward (qco_1d: grid 1, cooc false; qco_2d: cooc true, grid >= 1) and
// texture_reconstruct_forward / _backward. Same algorithm and saved tensors as csrc/cpu/qco.cpp.
//
// Types: x, gx, and every texture_reconstruct tensor are in `dtype`; every qco statistic (hist,
// levels, sim, rnorm, mean, stats) and the gradients of hist/levels/sim are in the accumulation
// type (double for kFloat64, float otherwise).
//
// Each launcher needs a scratch buffer of <name>_workspace_bytes(params) bytes (>= 256-byte
// aligned, contents irrelevant; the caller allocates it, the launcher may be given nullptr when
// the size is 0). Launchers return cudaErrorInvalidValue for sizes they cannot handle, and do not
// launch anything when there is nothing to compute.
#pragma once
#include <cstddef>
#include <cstdint>

#include "segops/cuda/common.h"

namespace segops::cuda {

struct QcoShape {
  int64_t N = 0, C = 0, H = 0, W = 0;  // H, W > 0 and divisible by grid
  int64_t num_levels = 0, grid = 1;
  bool cooc = false;                   // false requires grid 1
  DType dtype = DType::kFloat32;
};

struct QcoForwardParams {
  QcoShape shape;
  const void* x = nullptr;      // (N, C, H, W) dtype
  void* hist = nullptr;         // cooc ? (N, s, s, K, K) : (N, K)       acc
  void* levels = nullptr;       // cooc ? (N, s, s, K) : (N, K)          acc
  void* sim = nullptr;          // (N, H, W)                             acc
  void* rnorm = nullptr;        // (N, H, W)                             acc
  void* mean = nullptr;         // (N, R, C), R = grid²                  acc
  void* stats = nullptr;        // (N, R, 3): lo, hi, histogram total    acc
  void* workspace = nullptr;
};

struct QcoBackwardParams {
  QcoShape shape;
  const void* grad_hist = nullptr;    // like hist                    acc
  const void* grad_levels = nullptr;  // like levels                  acc
  const void* grad_sim = nullptr;     // (N, H, W) acc, or nullptr (no incoming gradient)
  const void* x = nullptr;            // (N, C, H, W) dtype
  // the forward's outputs (acc)
  const void *hist = nullptr, *sim = nullptr, *rnorm = nullptr, *mean = nullptr, *stats = nullptr;
  void* grad_x = nullptr;             // (N, C, H, W) dtype
  void* workspace = nullptr;
};

SEGOPS_CUDA_LAUNCHER(qco_forward, QcoForwardParams);
SEGOPS_CUDA_LAUNCHER(qco_backward, QcoBackwardParams);

struct TextureReconstructShape {
  int64_t N = 0, H = 0, W = 0, Cf = 0, num_levels = 0;  // N, H, W, K >= 1; Cf >= 0
  DType dtype = DType::kFloat32;
};

// One struct for both directions: the forward reads sim, levels, features and writes out; the
// backward reads grad_out too and writes the grad_* fields.
struct TextureReconstructParams {
  TextureReconstructShape shape;
  const void* grad_out = nullptr;  // (N, Cf, H, W) dtype (backward only)
  const void* sim = nullptr;       // (N, H, W)     dtype
  const void* levels = nullptr;    // (N, K)        dtype
  const void* features = nullptr;  // (N, Cf, K)    dtype
  void* out = nullptr;             // (N, Cf, H, W) dtype (forward only)
  void *grad_sim = nullptr, *grad_levels = nullptr, *grad_features = nullptr;  // backward only
  void* workspace = nullptr;
};

SEGOPS_CUDA_LAUNCHER(texture_reconstruct_forward, TextureReconstructParams);
SEGOPS_CUDA_LAUNCHER(texture_reconstruct_backward, TextureReconstructParams);

}  // namespace segops::cuda
