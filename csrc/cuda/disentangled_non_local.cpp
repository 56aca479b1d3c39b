// Torch binding of the disentangled_non_local CUDA kernels (disentangled_non_local.cu).
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <optional>
#include <tuple>

#include "segops/cuda/binding.h"
#include "segops/cuda/disentangled_non_local.h"

namespace segops::cuda_binding::disentangled_non_local {

constexpr const char* kForward = "disentangled_non_local_forward (cuda)";
constexpr const char* kBackward = "disentangled_non_local_backward (cuda)";

const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr() : nullptr;
}

// Lk == 0 with queries is left to the launcher (it returns cudaErrorInvalidValue).
cuda::DnlShape checked_shape(const char* kernel, const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value, const std::optional<at::Tensor>& unary,
                             bool whiten, double s) {
  const cuda::DType dtype = check_attention_inputs(kernel, 3, query, key, value);
  const cuda::DnlShape shape{query.size(0), query.size(1), value.size(1), query.size(2),
                             key.size(2), whiten, s, dtype};
  guards::check_sizes(kernel, "key", key, {shape.N, shape.Ck, shape.Lk});
  guards::check_sizes(kernel, "value", value, {shape.N, shape.Cv, shape.Lk});
  if (unary.has_value()) {
    guards::check_like(kernel, query, {{"unary", &*unary}});
    guards::check_sizes(kernel, "unary", *unary, {shape.N, shape.Lk});
  }
  return shape;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& unary, bool whiten, double s) {
  const cuda::DnlShape shape = checked_shape(kForward, query, key, value, unary, whiten, s);
  const auto acc = query.options().dtype(acc_dtype(query));
  at::Tensor out = at::empty({shape.N, shape.Cv, shape.Lq}, value.options());
  at::Tensor lse = at::empty({shape.N, shape.Lq}, acc);
  at::Tensor g = at::zeros({shape.N, shape.Cv}, acc);
  at::Tensor lse_u = at::zeros({shape.N}, acc);
  // Nothing to compute: no samples, or no queries and no unary statistics to produce.
  if (shape.N == 0 || (shape.Lq == 0 && !unary.has_value())) return {out, lse, g, lse_u};
  cuda::DnlForwardParams p{shape, query.const_data_ptr(), key.const_data_ptr(),
                           value.const_data_ptr(), data_or_null(unary), out.mutable_data_ptr(),
                           lse.mutable_data_ptr(), g.mutable_data_ptr(), lse_u.mutable_data_ptr()};
  launch(kForward, query, p, cuda::disentangled_non_local_forward_workspace_bytes,
         cuda::disentangled_non_local_forward);
  return {out, lse, g, lse_u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const std::optional<at::Tensor>& unary, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& g, const at::Tensor& lse_u, bool whiten, double s) {
  const cuda::DnlShape shape = checked_shape(kBackward, query, key, value, unary, whiten, s);
  const bool has_unary = unary.has_value();
  check_out_and_grad(kBackward, query, out, grad_out, {shape.N, shape.Cv, shape.Lq});
  check_saved(kBackward, query, "lse", lse, {shape.N, shape.Lq});
  if (has_unary) {
    check_saved(kBackward, query, "g", g, {shape.N, shape.Cv});
    check_saved(kBackward, query, "lse_u", lse_u, {shape.N});
  }
  // With no queries the gradients of key, value and unary are zero (nothing is launched).
  const bool no_queries = shape.Lq == 0;
  const auto like = [no_queries](const at::Tensor& t) {
    return no_queries ? at::zeros_like(t) : at::empty_like(t);
  };
  at::Tensor grad_query = at::empty_like(query), grad_key = like(key), grad_value = like(value);
  at::Tensor grad_unary = has_unary ? like(*unary) : at::empty({0}, query.options());
  if (shape.N == 0 || no_queries) return {grad_query, grad_key, grad_value, grad_unary};
  cuda::DnlBackwardParams p{shape, grad_out.const_data_ptr(), query.const_data_ptr(),
                            key.const_data_ptr(), value.const_data_ptr(), data_or_null(unary),
                            out.const_data_ptr(), lse.const_data_ptr(),
                            has_unary ? g.const_data_ptr() : nullptr,
                            has_unary ? lse_u.const_data_ptr() : nullptr,
                            grad_query.mutable_data_ptr(), grad_key.mutable_data_ptr(),
                            grad_value.mutable_data_ptr(),
                            has_unary ? grad_unary.mutable_data_ptr() : nullptr};
  launch(kBackward, query, p, cuda::disentangled_non_local_backward_workspace_bytes,
         cuda::disentangled_non_local_backward);
  return {grad_query, grad_key, grad_value, grad_unary};
}

}  // namespace segops::cuda_binding::disentangled_non_local

TORCH_LIBRARY_IMPL(segops_C, CUDA, m) {
  using namespace segops::cuda_binding::disentangled_non_local;
  m.impl("disentangled_non_local_forward", &forward);
  m.impl("disentangled_non_local_backward", &backward);
}
