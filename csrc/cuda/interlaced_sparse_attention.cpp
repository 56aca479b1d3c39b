// Torch binding of the interlaced_sparse_attention CUDA kernels (interlaced_sparse_attention.cu).
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include <tuple>

#include "segops/cuda/binding.h"
#include "segops/cuda/interlaced_sparse_attention.h"

namespace segops::cuda_binding::interlaced_sparse_attention {

constexpr const char* kForward = "interlaced_sparse_attention_forward (cuda)";
constexpr const char* kBackward = "interlaced_sparse_attention_backward (cuda)";

// The block size (ph, pw) is validated by the launcher (H, W divisible by it).
cuda::IsaShape checked_shape(const char* kernel, const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value, int64_t ph, int64_t pw, bool long_range,
                             double scale) {
  const cuda::DType dtype = check_attention_inputs(kernel, 4, query, key, value);
  const cuda::IsaShape s{query.size(0), query.size(1), value.size(1), query.size(2),
                         query.size(3), ph, pw, long_range, scale, dtype};
  guards::check_sizes(kernel, "key", key, query.sizes());
  guards::check_sizes(kernel, "value", value, {s.N, s.Cv, s.H, s.W});
  return s;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& query, const at::Tensor& key,
                                           const at::Tensor& value, int64_t ph, int64_t pw,
                                           bool long_range, double scale) {
  const cuda::IsaShape s = checked_shape(kForward, query, key, value, ph, pw, long_range, scale);
  at::Tensor out = at::empty({s.N, s.Cv, s.H, s.W}, value.options());
  at::Tensor lse = at::empty({s.N, s.H, s.W}, query.options().dtype(acc_dtype(query)));
  if (out.numel() == 0 || lse.numel() == 0) return {out, lse};
  cuda::IsaForwardParams p{s, query.const_data_ptr(), key.const_data_ptr(), value.const_data_ptr(),
                           out.mutable_data_ptr(), lse.mutable_data_ptr()};
  launch(kForward, query, p, cuda::interlaced_sparse_attention_forward_workspace_bytes,
         cuda::interlaced_sparse_attention_forward);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse, int64_t ph, int64_t pw,
    bool long_range, double scale) {
  const cuda::IsaShape s = checked_shape(kBackward, query, key, value, ph, pw, long_range, scale);
  check_out_and_grad(kBackward, query, out, grad_out, value.sizes());
  check_saved(kBackward, query, "lse", lse, {s.N, s.H, s.W});
  if (query.numel() == 0 || value.numel() == 0) {
    return {at::zeros_like(query), at::zeros_like(key), at::zeros_like(value)};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads{at::empty_like(query), at::empty_like(key),
                                                       at::empty_like(value)};
  auto& [grad_query, grad_key, grad_value] = grads;
  cuda::IsaBackwardParams p{s, grad_out.const_data_ptr(), query.const_data_ptr(),
                            key.const_data_ptr(), value.const_data_ptr(), out.const_data_ptr(),
                            lse.const_data_ptr(), grad_query.mutable_data_ptr(),
                            grad_key.mutable_data_ptr(), grad_value.mutable_data_ptr()};
  launch(kBackward, query, p, cuda::interlaced_sparse_attention_backward_workspace_bytes,
         cuda::interlaced_sparse_attention_backward);
  return grads;
}

}  // namespace segops::cuda_binding::interlaced_sparse_attention

TORCH_LIBRARY_IMPL(segops_C, CUDA, m) {
  using namespace segops::cuda_binding::interlaced_sparse_attention;
  m.impl("interlaced_sparse_attention_forward", &forward);
  m.impl("interlaced_sparse_attention_backward", &backward);
}
