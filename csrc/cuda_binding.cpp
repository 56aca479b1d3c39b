// The thin torch binding of the CUDA kernels: registers csrc/cuda/*.cu as the CUDA
// implementations of the segops_C kernels whose schemas are in csrc/register.cpp (the same
// kernels the CPU backend implements, so segops/ops/<op>.py reaches them through
// torch.ops.segops_C for CUDA tensors). Per op: check the tensors, allocate the outputs, set the
// device guard, call the torch-free launcher on the current stream and check the launch.
// Built only with SEGOPS_WITH_CUDA (setup.py, CUDA torch + nvcc).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>
#include <utility>

#include "segops/cuda/common.h"
#include "segops/cuda/criss_cross_attention.h"
#include "segops/cuda/disentangled_non_local.h"
#include "segops/cuda/interlaced_sparse_attention.h"
#include "segops/cuda/qco.h"
#include "segops/cuda/semantic_difference_conv2d.h"

namespace segops {
namespace cuda_binding {

inline cuda::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "segops.", op, " (cuda): dtype must be float16, bfloat16, float32 or "
                  "float64, got ", t.scalar_type());
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch(cudaError_t err, const char* op) {
  if (err == cudaSuccess) err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "segops.", op, " (cuda): kernel launch failed: ",
              cudaGetErrorString(err));
}

// Every tensor must be a contiguous CUDA tensor on `like`'s device with `like`'s dtype (the ops
// layer makes inputs and incoming gradients contiguous; this guards direct segops_C calls).
inline void check_tensors(const char* op, const at::Tensor& like,
                          std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  for (const auto& [name, t] : ts) {
    TORCH_CHECK(t->is_cuda(), "segops.", op, " (cuda): ", name, " must be a CUDA tensor, got ",
                t->device());
    TORCH_CHECK(t->device() == like.device(), "segops.", op, " (cuda): ", name, " is on ",
                t->device(), ", expected ", like.device());
    TORCH_CHECK(t->scalar_type() == like.scalar_type(), "segops.", op, " (cuda): ", name,
                " has dtype ", t->scalar_type(), ", expected ", like.scalar_type());
    TORCH_CHECK(t->is_contiguous(), "segops.", op, " (cuda): ", name, " must be contiguous");
  }
}

}  // namespace cuda_binding
}  // namespace segops

// Each op's section below is self-contained: its functions in namespace
// segops::cuda_binding::<op> and its own TORCH_LIBRARY_IMPL(segops_C, CUDA, m) block.


// ===== criss_cross_attention =====

// ===== end criss_cross_attention =====


// ===== interlaced_sparse_attention =====

// ===== end interlaced_sparse_attention =====


// ===== disentangled_non_local =====

// ===== end disentangled_non_local =====


// ===== semantic_difference_conv2d =====

// ===== end semantic_difference_conv2d =====


// ===== qco (qco_forward/backward, texture_reconstruct_forward/backward) =====
#include <optional>
#include <vector>

namespace segops {
namespace cuda_binding {
namespace qco {

using QcoOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Statistics and the gradients of the qco outputs are in the accumulation dtype.
inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_qco_args(const char* op, const at::Tensor& x, int64_t num_levels, int64_t grid,
                           bool cooc) {
  TORCH_CHECK(x.is_cuda(), "segops.", op, " (cuda): x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "segops.", op, " (cuda): x must be 4-D (N, C, H, W), got shape ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), "segops.", op, " (cuda): x must be contiguous");
  TORCH_CHECK(num_levels >= 1, "segops.", op, " (cuda): num_levels must be >= 1, got ", num_levels);
  TORCH_CHECK(grid >= 1, "segops.", op, " (cuda): grid must be >= 1, got ", grid);
  TORCH_CHECK(cooc || grid == 1, "segops.", op, " (cuda): the 1-D histogram has grid 1, got grid ",
              grid);
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0 && x.size(2) % grid == 0 && x.size(3) % grid == 0,
              "segops.", op, " (cuda): H and W of x must be positive multiples of grid = ", grid,
              ", got H x W = ", x.size(2), " x ", x.size(3));
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "segops.", op, " (cuda): ", name, " must have shape ",
              expected, ", got ", t.sizes());
}

inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

QcoOutputs qco_forward(const at::Tensor& x, int64_t num_levels, int64_t grid, bool cooc) {
  const char* op = "qco_forward";
  check_qco_args(op, x, num_levels, grid, cooc);
  const cuda::DType dt = dtype_of(x, op);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t k = num_levels, s = grid, r = grid * grid;
  const auto opts = x.options().dtype(acc_type(x));
  at::Tensor hist = cooc ? at::empty({n, s, s, k, k}, opts) : at::empty({n, k}, opts);
  at::Tensor levels = cooc ? at::empty({n, s, s, k}, opts) : at::empty({n, k}, opts);
  at::Tensor sim = at::empty({n, h, w}, opts);
  at::Tensor rnorm = at::empty({n, h, w}, opts);
  at::Tensor mean = at::empty({n, r, c}, opts);
  at::Tensor stats = at::empty({n, r, 3}, opts);
  if (n == 0) return {hist, levels, sim, rnorm, mean, stats};
  c10::cuda::CUDAGuard guard(x.device());
  cuda::QcoForwardParams p{};
  p.x = x.const_data_ptr();
  p.hist = hist.data_ptr();
  p.levels = levels.data_ptr();
  p.sim = sim.data_ptr();
  p.rnorm = rnorm.data_ptr();
  p.mean = mean.data_ptr();
  p.stats = stats.data_ptr();
  p.n = n;
  p.c = c;
  p.h = h;
  p.w = w;
  p.num_levels = k;
  p.grid = grid;
  p.cooc = cooc;
  p.dtype = dt;
  at::Tensor ws = workspace(cuda::qco_forward_workspace_bytes(p), x);
  p.workspace = ws.data_ptr();
  check_launch(cuda::qco_forward(p, current_stream()), op);
  return {hist, levels, sim, rnorm, mean, stats};
}

at::Tensor qco_backward(const at::Tensor& grad_hist, const at::Tensor& grad_levels,
                        const std::optional<at::Tensor>& grad_sim, const at::Tensor& x,
                        const at::Tensor& hist, const at::Tensor& sim, const at::Tensor& rnorm,
                        const at::Tensor& mean, const at::Tensor& stats, int64_t num_levels,
                        int64_t grid, bool cooc) {
  const char* op = "qco_backward";
  check_qco_args(op, x, num_levels, grid, cooc);
  const cuda::DType dt = dtype_of(x, op);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t k = num_levels, s = grid, r = grid * grid;
  TORCH_CHECK(hist.scalar_type() == acc_type(x), "segops.", op, " (cuda): hist must have the ",
              "accumulation dtype ", acc_type(x), " of x's dtype ", x.scalar_type(), ", got ",
              hist.scalar_type());
  const bool has_gs = grad_sim.has_value() && grad_sim->defined();
  check_tensors(op, hist, {{"hist", &hist}, {"grad_hist", &grad_hist},
                           {"grad_levels", &grad_levels}, {"sim", &sim}, {"rnorm", &rnorm},
                           {"mean", &mean}, {"stats", &stats}});
  TORCH_CHECK(hist.device() == x.device(), "segops.", op, " (cuda): hist is on ", hist.device(),
              ", expected ", x.device());
  if (has_gs) check_tensors(op, hist, {{"grad_sim", &*grad_sim}});
  const std::vector<int64_t> hshape =
      cooc ? std::vector<int64_t>{n, s, s, k, k} : std::vector<int64_t>{n, k};
  const std::vector<int64_t> lshape =
      cooc ? std::vector<int64_t>{n, s, s, k} : std::vector<int64_t>{n, k};
  check_shape(op, "hist", hist, hshape);
  check_shape(op, "grad_hist", grad_hist, hshape);
  check_shape(op, "grad_levels", grad_levels, lshape);
  check_shape(op, "sim", sim, {n, h, w});
  check_shape(op, "rnorm", rnorm, {n, h, w});
  check_shape(op, "mean", mean, {n, r, c});
  check_shape(op, "stats", stats, {n, r, 3});
  if (has_gs) check_shape(op, "grad_sim", *grad_sim, {n, h, w});
  at::Tensor gx = at::empty_like(x);
  if (gx.numel() == 0) return gx;
  c10::cuda::CUDAGuard guard(x.device());
  cuda::QcoBackwardParams p{};
  p.grad_hist = grad_hist.const_data_ptr();
  p.grad_levels = grad_levels.const_data_ptr();
  p.grad_sim = has_gs ? grad_sim->const_data_ptr() : nullptr;
  p.x = x.const_data_ptr();
  p.hist = hist.const_data_ptr();
  p.sim = sim.const_data_ptr();
  p.rnorm = rnorm.const_data_ptr();
  p.mean = mean.const_data_ptr();
  p.stats = stats.const_data_ptr();
  p.grad_x = gx.data_ptr();
  p.n = n;
  p.c = c;
  p.h = h;
  p.w = w;
  p.num_levels = k;
  p.grid = grid;
  p.cooc = cooc;
  p.dtype = dt;
  at::Tensor ws = workspace(cuda::qco_backward_workspace_bytes(p), x);
  p.workspace = ws.data_ptr();
  check_launch(cuda::qco_backward(p, current_stream()), op);
  return gx;
}

inline void check_recon(const char* op, const at::Tensor& sim, const at::Tensor& levels,
                        const at::Tensor& features) {
  TORCH_CHECK(sim.is_cuda(), "segops.", op, " (cuda): sim must be a CUDA tensor, got ",
              sim.device());
  TORCH_CHECK(sim.dim() == 3, "segops.", op, " (cuda): sim must be 3-D (N, H, W), got shape ",
              sim.sizes());
  TORCH_CHECK(levels.dim() == 2, "segops.", op,
              " (cuda): levels must be 2-D (N, K), got shape ", levels.sizes());
  TORCH_CHECK(features.dim() == 3, "segops.", op,
              " (cuda): features must be 3-D (N, Cf, K), got shape ", features.sizes());
  check_tensors(op, sim, {{"sim", &sim}, {"levels", &levels}, {"features", &features}});
  TORCH_CHECK(levels.size(0) == sim.size(0) && features.size(0) == sim.size(0), "segops.", op,
              " (cuda): levels and features must have sim's batch size ", sim.size(0),
              ", got ", levels.size(0), " and ", features.size(0));
  TORCH_CHECK(levels.size(1) >= 1 && features.size(2) == levels.size(1), "segops.", op,
              " (cuda): features must be (N, Cf, K) with K = levels.size(1) >= 1, got features ",
              features.sizes(), " and levels ", levels.sizes());
  TORCH_CHECK(sim.numel() > 0, "segops.", op, " (cuda): sim must not be empty, got shape ",
              sim.sizes());
}

inline cuda::TextureReconstructParams recon_params(const at::Tensor& sim, const at::Tensor& levels,
                                                   const at::Tensor& features, cuda::DType dt) {
  cuda::TextureReconstructParams p{};
  p.sim = sim.const_data_ptr();
  p.levels = levels.const_data_ptr();
  p.features = features.const_data_ptr();
  p.n = sim.size(0);
  p.h = sim.size(1);
  p.w = sim.size(2);
  p.cf = features.size(1);
  p.num_levels = levels.size(1);
  p.dtype = dt;
  return p;
}

at::Tensor texture_reconstruct_forward(const at::Tensor& sim, const at::Tensor& levels,
                                       const at::Tensor& features) {
  const char* op = "texture_reconstruct_forward";
  check_recon(op, sim, levels, features);
  const cuda::DType dt = dtype_of(sim, op);
  at::Tensor out = at::empty({sim.size(0), features.size(1), sim.size(1), sim.size(2)},
                             features.options());
  if (out.numel() == 0) return out;
  c10::cuda::CUDAGuard guard(sim.device());
  cuda::TextureReconstructParams p = recon_params(sim, levels, features, dt);
  p.out = out.data_ptr();
  at::Tensor ws = workspace(cuda::texture_reconstruct_forward_workspace_bytes(p), sim);
  p.workspace = ws.data_ptr();
  check_launch(cuda::texture_reconstruct_forward(p, current_stream()), op);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> texture_reconstruct_backward(
    const at::Tensor& grad_out, const at::Tensor& sim, const at::Tensor& levels,
    const at::Tensor& features) {
  const char* op = "texture_reconstruct_backward";
  check_recon(op, sim, levels, features);
  const cuda::DType dt = dtype_of(sim, op);
  check_tensors(op, sim, {{"grad_out", &grad_out}});
  check_shape(op, "grad_out", grad_out, {sim.size(0), features.size(1), sim.size(1), sim.size(2)});
  if (features.size(1) == 0)  // no channels: every gradient is zero (or empty)
    return {at::zeros_like(sim), at::zeros_like(levels), at::empty_like(features)};
  at::Tensor gsim = at::empty_like(sim);
  at::Tensor glev = at::empty_like(levels);
  at::Tensor gfeat = at::empty_like(features);
  c10::cuda::CUDAGuard guard(sim.device());
  cuda::TextureReconstructParams p = recon_params(sim, levels, features, dt);
  p.grad_out = grad_out.const_data_ptr();
  p.grad_sim = gsim.data_ptr();
  p.grad_levels = glev.data_ptr();
  p.grad_features = gfeat.data_ptr();
  at::Tensor ws = workspace(cuda::texture_reconstruct_backward_workspace_bytes(p), sim);
  p.workspace = ws.data_ptr();
  check_launch(cuda::texture_reconstruct_backward(p, current_stream()), op);
  return {gsim, glev, gfeat};
}

}  // namespace qco
}  // namespace cuda_binding
}  // namespace segops

TORCH_LIBRARY_IMPL(segops_C, CUDA, m) {
  m.impl("qco_forward", &segops::cuda_binding::qco::qco_forward);
  m.impl("qco_backward", &segops::cuda_binding::qco::qco_backward);
  m.impl("texture_reconstruct_forward", &segops::cuda_binding::qco::texture_reconstruct_forward);
  m.impl("texture_reconstruct_backward", &segops::cuda_binding::qco::texture_reconstruct_backward);
}
// ===== end qco =====
