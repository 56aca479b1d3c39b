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

namespace segops {
namespace cuda {

struct QcoForwardParams {
  const void* x;  // (N, C, H, W) dtype
  void* hist;     // cooc ? (N, s, s, K, K) : (N, K)       acc
  void* levels;   // cooc ? (N, s, s, K) : (N, K)          acc
  void* sim;      // (N, H, W)                             acc
  void* rnorm;    // (N, H, W)                             acc
  void* mean;     // (N, R, C), R = grid²                  acc
  void* stats;    // (N, R, 3): lo, hi, histogram total    acc
  void* workspace;
  int64_t n, c, h, w, num_levels, grid;  // H, W > 0 and divisible by grid
  bool cooc;                             // false requires grid 1
  DType dtype;
};

struct QcoBackwardParams {
  const void* grad_hist;    // like hist                    acc
  const void* grad_levels;  // like levels                  acc
  const void* grad_sim;     // (N, H, W) acc, or nullptr (no incoming gradient)
  const void* x;            // (N, C, H, W) dtype
  const void* hist;         // the forward's outputs        acc
  const void* sim;
  const void* rnorm;
  const void* mean;
  const void* stats;
  void* grad_x;             // (N, C, H, W) dtype
  void* workspace;
  int64_t n, c, h, w, num_levels, grid;
  bool cooc;
  DType dtype;
};

size_t qco_forward_workspace_bytes(const QcoForwardParams& p);
cudaError_t qco_forward(const QcoForwardParams& p, cudaStream_t stream);
size_t qco_backward_workspace_bytes(const QcoBackwardParams& p);
cudaError_t qco_backward(const QcoBackwardParams& p, cudaStream_t stream);

struct TextureReconstructParams {
  const void* sim;       // (N, H, W)     dtype
  const void* levels;    // (N, K)        dtype
  const void* features;  // (N, Cf, K)    dtype
  const void* grad_out;  // (N, Cf, H, W) dtype (backward only)
  void* out;             // (N, Cf, H, W) dtype (forward only)
  void* grad_sim;        // like sim      (backward only)
  void* grad_levels;     // like levels   (backward only)
  void* grad_features;   // like features (backward only)
  void* workspace;
  int64_t n, h, w, cf, num_levels;  // N, H, W, K >= 1; Cf >= 0
  DType dtype;
};

size_t texture_reconstruct_forward_workspace_bytes(const TextureReconstructParams& p);
cudaError_t texture_reconstruct_forward(const TextureReconstructParams& p, cudaStream_t stream);
size_t texture_reconstruct_backward_workspace_bytes(const TextureReconstructParams& p);
cudaError_t texture_reconstruct_backward(const TextureReconstructParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace segops
