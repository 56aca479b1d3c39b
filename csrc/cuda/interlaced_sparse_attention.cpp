// Torch binding of the interlaced_sparse_attention CUDA kernels (interlaced_sparse_attention.cu).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include <optional>
#include <tuple>

#include "segops/cuda/binding.h"
#include "segops/cuda/interlaced_sparse_attention.h"

namespace segops::cuda_binding::interlaced_sparse_attention {

constexpr const char* kForward = "interlaced_sparse_attention_forward (cuda)";
constexpr const char* kBackward = "interlaced_sparse_attention_backward (cuda)";

const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr() : nullptr;
}

// An optional (k, L, L) logit term like query, k dividing `users` (the samples for the bias,
// the groups per sample for the mask); returns k (1 when absent). Left to the launcher when the
// block size does not divide the map.
int64_t checked_term(const char* kernel, const char* name, const at::Tensor& query,
                     const std::optional<at::Tensor>& term, const cuda::IsaShape& s, bool bias) {
  if (!term.has_value()) return 1;
  guards::check_rank(kernel, 3, {{name, &*term}});
  guards::check_like(kernel, query, {{name, &*term}});
  if (s.ph <= 0 || s.pw <= 0 || s.H % s.ph != 0 || s.W % s.pw != 0) return term->size(0);
  const int64_t inner = s.ph * s.pw, outer = (s.H / s.ph) * (s.W / s.pw);
  const int64_t members = s.long_range ? outer : inner;
  const int64_t users = bias ? s.N : (s.long_range ? inner : outer);
  const int64_t k = term->size(0);
  guards::check_sizes(kernel, name, *term, {k, members, members});
  guards::check_value(kernel, k > 0 && users % k == 0, name, ".size(0) must divide ", users);
  return k;
}

// The block size (ph, pw) and the term counts are validated by the launcher (H, W divisible by
// the block size, N % nb == 0, G % nm == 0).
cuda::IsaShape checked_shape(const char* kernel, const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& mask, int64_t ph, int64_t pw,
                             bool long_range, double scale) {
  const cuda::DType dtype = check_attention_inputs(kernel, 4, query, key, value);
  cuda::IsaShape s{query.size(0), query.size(1), value.size(1), query.size(2),
                   query.size(3), ph, pw, long_range, scale, dtype};
  guards::check_sizes(kernel, "key", key, query.sizes());
  guards::check_sizes(kernel, "value", value, {s.N, s.Cv, s.H, s.W});
  s.nb = checked_term(kernel, "bias", query, bias, s, true);
  s.nm = checked_term(kernel, "mask", query, mask, s, false);
  return s;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& query, const at::Tensor& key,
                                           const at::Tensor& value,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& mask, int64_t ph,
                                           int64_t pw, bool long_range, double scale) {
  const cuda::IsaShape s =
      checked_shape(kForward, query, key, value, bias, mask, ph, pw, long_range, scale);
  at::Tensor out = at::empty({s.N, s.Cv, s.H, s.W}, value.options());
  at::Tensor lse = at::empty({s.N, s.H, s.W}, query.options().dtype(acc_dtype(query)));
  if (out.numel() == 0 || lse.numel() == 0) return {out, lse};
  cuda::IsaForwardParams p{s, query.const_data_ptr(), key.const_data_ptr(), value.const_data_ptr(),
                           data_or_null(bias), data_or_null(mask), out.mutable_data_ptr(),
                           lse.mutable_data_ptr()};
  launch(kForward, query, p, cuda::interlaced_sparse_attention_forward_workspace_bytes,
         cuda::interlaced_sparse_attention_forward);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse,
    int64_t ph, int64_t pw, bool long_range, double scale) {
  const cuda::IsaShape s =
      checked_shape(kBackward, query, key, value, bias, mask, ph, pw, long_range, scale);
  check_out_and_grad(kBackward, query, out, grad_out, value.sizes());
  check_saved(kBackward, query, "lse", lse, {s.N, s.H, s.W});
  at::Tensor grad_bias = bias.has_value() ? at::empty_like(*bias) : at::empty({0}, query.options());
  if (query.numel() == 0 || value.numel() == 0) {
    return {at::zeros_like(query), at::zeros_like(key), at::zeros_like(value), grad_bias.zero_()};
  }
  at::Tensor grad_query = at::empty_like(query), grad_key = at::empty_like(key),
             grad_value = at::empty_like(value);
  cuda::IsaBackwardParams p{s, grad_out.const_data_ptr(), query.const_data_ptr(),
                            key.const_data_ptr(), value.const_data_ptr(), data_or_null(bias),
                            data_or_null(mask), out.const_data_ptr(), lse.const_data_ptr(),
                            grad_query.mutable_data_ptr(), grad_key.mutable_data_ptr(),
                            grad_value.mutable_data_ptr(),
                            bias.has_value() ? grad_bias.mutable_data_ptr() : nullptr};
  launch(kBackward, query, p, cuda::interlaced_sparse_attention_backward_workspace_bytes,
         cuda::interlaced_sparse_attention_backward);
  return {grad_query, grad_key, grad_value, grad_bias};
}

}  // namespace segops::cuda_binding::interlaced_sparse_attention

TORCH_LIBRARY_IMPL(segops_C, CUDA, m) {
  using namespace segops::cuda_binding::interlaced_sparse_attention;
  m.impl("interlaced_sparse_attention_forward", &forward);
  m.impl("interlaced_sparse_attention_backward", &backward);
}
