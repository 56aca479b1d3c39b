// Torch binding of the qco CUDA kernels (qco.cu): qco_forward / qco_backward and
// texture_reconstruct_forward / texture_reconstruct_backward.
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include <optional>
#include <tuple>
#include <vector>

#include "segops/cuda/binding.h"
#include "segops/cuda/qco.h"

namespace segops::cuda_binding::qco {

constexpr const char* kQcoForward = "qco_forward (cuda)";
constexpr const char* kQcoBackward = "qco_backward (cuda)";
constexpr const char* kReconForward = "texture_reconstruct_forward (cuda)";
constexpr const char* kReconBackward = "texture_reconstruct_backward (cuda)";

using QcoOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// num_levels, grid and H, W divisible by grid are validated by the launcher.
cuda::QcoShape checked_qco_shape(const char* kernel, const at::Tensor& x, int64_t num_levels,
                                 int64_t grid, bool cooc) {
  guards::check_rank(kernel, 4, {{"x", &x}});
  guards::check_like(kernel, x, {{"x", &x}});
  return cuda::QcoShape{x.size(0), x.size(1), x.size(2), x.size(3), num_levels, grid, cooc,
                        dtype_of(kernel, "x", x)};
}

// Shapes of the histogram and of the level tensor.
std::vector<int64_t> hist_sizes(const cuda::QcoShape& s) {
  const int64_t k = s.num_levels, g = s.grid;
  return s.cooc ? std::vector<int64_t>{s.N, g, g, k, k} : std::vector<int64_t>{s.N, k};
}
std::vector<int64_t> levels_sizes(const cuda::QcoShape& s) {
  const int64_t k = s.num_levels, g = s.grid;
  return s.cooc ? std::vector<int64_t>{s.N, g, g, k} : std::vector<int64_t>{s.N, k};
}

QcoOutputs qco_forward(const at::Tensor& x, int64_t num_levels, int64_t grid, bool cooc) {
  const cuda::QcoShape s = checked_qco_shape(kQcoForward, x, num_levels, grid, cooc);
  const int64_t regions = grid * grid;
  const auto acc = x.options().dtype(acc_dtype(x));
  at::Tensor hist = at::empty(hist_sizes(s), acc);
  at::Tensor levels = at::empty(levels_sizes(s), acc);
  at::Tensor sim = at::empty({s.N, s.H, s.W}, acc);
  at::Tensor rnorm = at::empty({s.N, s.H, s.W}, acc);
  at::Tensor mean = at::empty({s.N, regions, s.C}, acc);
  at::Tensor stats = at::empty({s.N, regions, 3}, acc);
  if (s.N == 0) return {hist, levels, sim, rnorm, mean, stats};
  cuda::QcoForwardParams p{s, x.const_data_ptr(), hist.mutable_data_ptr(),
                           levels.mutable_data_ptr(), sim.mutable_data_ptr(),
                           rnorm.mutable_data_ptr(), mean.mutable_data_ptr(),
                           stats.mutable_data_ptr()};
  launch(kQcoForward, x, p, cuda::qco_forward_workspace_bytes, cuda::qco_forward);
  return {hist, levels, sim, rnorm, mean, stats};
}

at::Tensor qco_backward(const at::Tensor& grad_hist, const at::Tensor& grad_levels,
                        const std::optional<at::Tensor>& grad_sim, const at::Tensor& x,
                        const at::Tensor& hist, const at::Tensor& sim, const at::Tensor& rnorm,
                        const at::Tensor& mean, const at::Tensor& stats, int64_t num_levels,
                        int64_t grid, bool cooc) {
  const char* kernel = kQcoBackward;
  const cuda::QcoShape s = checked_qco_shape(kernel, x, num_levels, grid, cooc);
  const int64_t regions = grid * grid;
  const bool has_grad_sim = grad_sim.has_value() && grad_sim->defined();
  check_saved(kernel, x, "hist", hist, hist_sizes(s));
  check_saved(kernel, x, "grad_hist", grad_hist, hist_sizes(s));
  check_saved(kernel, x, "grad_levels", grad_levels, levels_sizes(s));
  check_saved(kernel, x, "sim", sim, {s.N, s.H, s.W});
  check_saved(kernel, x, "rnorm", rnorm, {s.N, s.H, s.W});
  check_saved(kernel, x, "mean", mean, {s.N, regions, s.C});
  check_saved(kernel, x, "stats", stats, {s.N, regions, 3});
  if (has_grad_sim) check_saved(kernel, x, "grad_sim", *grad_sim, {s.N, s.H, s.W});
  at::Tensor grad_x = at::empty_like(x);
  if (grad_x.numel() == 0) return grad_x;
  cuda::QcoBackwardParams p{s, grad_hist.const_data_ptr(), grad_levels.const_data_ptr(),
                            has_grad_sim ? grad_sim->const_data_ptr() : nullptr,
                            x.const_data_ptr(), hist.const_data_ptr(), sim.const_data_ptr(),
                            rnorm.const_data_ptr(), mean.const_data_ptr(), stats.const_data_ptr(),
                            grad_x.mutable_data_ptr()};
  launch(kernel, x, p, cuda::qco_backward_workspace_bytes, cuda::qco_backward);
  return grad_x;
}

// num_levels >= 1 and non-empty positions are validated by the launcher.
cuda::TextureReconstructParams checked_recon(const char* kernel, const at::Tensor& sim,
                                             const at::Tensor& levels, const at::Tensor& features) {
  guards::check_rank(kernel, 3, {{"sim", &sim}, {"features", &features}});
  guards::check_rank(kernel, 2, {{"levels", &levels}});
  guards::check_like(kernel, sim, {{"sim", &sim}, {"levels", &levels}, {"features", &features}});
  const int64_t N = sim.size(0), H = sim.size(1), W = sim.size(2);
  const int64_t Cf = features.size(1), K = levels.size(1);
  guards::check_sizes(kernel, "levels", levels, {N, K});
  guards::check_sizes(kernel, "features", features, {N, Cf, K});
  cuda::TextureReconstructParams p{{N, H, W, Cf, K, dtype_of(kernel, "sim", sim)}};
  p.sim = sim.const_data_ptr();
  p.levels = levels.const_data_ptr();
  p.features = features.const_data_ptr();
  return p;
}

at::Tensor texture_reconstruct_forward(const at::Tensor& sim, const at::Tensor& levels,
                                       const at::Tensor& features) {
  cuda::TextureReconstructParams p = checked_recon(kReconForward, sim, levels, features);
  at::Tensor out = at::empty({p.shape.N, p.shape.Cf, p.shape.H, p.shape.W}, features.options());
  if (out.numel() == 0) return out;
  p.out = out.mutable_data_ptr();
  launch(kReconForward, sim, p, cuda::texture_reconstruct_forward_workspace_bytes,
         cuda::texture_reconstruct_forward);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> texture_reconstruct_backward(
    const at::Tensor& grad_out, const at::Tensor& sim, const at::Tensor& levels,
    const at::Tensor& features) {
  cuda::TextureReconstructParams p = checked_recon(kReconBackward, sim, levels, features);
  guards::check_like(kReconBackward, sim, {{"grad_out", &grad_out}});
  guards::check_sizes(kReconBackward, "grad_out", grad_out,
                      {p.shape.N, p.shape.Cf, p.shape.H, p.shape.W});
  if (p.shape.Cf == 0 || p.shape.N == 0)  // no channels or no samples: zero (or empty) gradients
    return {at::zeros_like(sim), at::zeros_like(levels), at::zeros_like(features)};
  at::Tensor grad_sim = at::empty_like(sim);
  at::Tensor grad_levels = at::empty_like(levels);
  at::Tensor grad_features = at::empty_like(features);
  p.grad_out = grad_out.const_data_ptr();
  p.grad_sim = grad_sim.mutable_data_ptr();
  p.grad_levels = grad_levels.mutable_data_ptr();
  p.grad_features = grad_features.mutable_data_ptr();
  launch(kReconBackward, sim, p, cuda::texture_reconstruct_backward_workspace_bytes,
         cuda::texture_reconstruct_backward);
  return {grad_sim, grad_levels, grad_features};
}

}  // namespace segops::cuda_binding::qco

TORCH_LIBRARY_IMPL(segops_C, CUDA, m) {
  using namespace segops::cuda_binding::qco;
  m.impl("qco_forward", &qco_forward);
  m.impl("qco_backward", &qco_backward);
  m.impl("texture_reconstruct_forward", &texture_reconstruct_forward);
  m.impl("texture_reconstruct_backward", &texture_reconstruct_backward);
}
