// Torch binding of the criss_cross_attention CUDA kernels (criss_cross_attention.cu).
#include <ATen/ops/empty_like.h>

#include <tuple>

#include "segops/cuda/binding.h"
#include "segops/cuda/criss_cross_attention.h"

namespace segops::cuda_binding::criss_cross_attention {

constexpr const char* kForward = "criss_cross_attention_forward (cuda)";
constexpr const char* kBackward = "criss_cross_attention_backward (cuda)";

cuda::CcaShape checked_shape(const char* kernel, const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value) {
  const cuda::DType dtype = check_attention_inputs(kernel, 4, query, key, value);
  const cuda::CcaShape s{query.size(0), query.size(1), value.size(1), query.size(2),
                         query.size(3), dtype};
  guards::check_sizes(kernel, "key", key, query.sizes());
  guards::check_sizes(kernel, "value", value, {s.N, s.Cv, s.H, s.W});
  return s;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& query, const at::Tensor& key,
                                           const at::Tensor& value) {
  const cuda::CcaShape s = checked_shape(kForward, query, key, value);
  at::Tensor out = at::empty({s.N, s.Cv, s.H, s.W}, value.options());
  at::Tensor stats = at::empty({s.N, 2, s.H, s.W}, query.options().dtype(acc_dtype(query)));
  if (s.N * s.H * s.W == 0) return {out, stats};
  cuda::CcaForwardParams p{s, query.const_data_ptr(), key.const_data_ptr(), value.const_data_ptr(),
                           out.mutable_data_ptr(), stats.mutable_data_ptr()};
  launch(kForward, query, p, cuda::criss_cross_attention_forward_workspace_bytes,
         cuda::criss_cross_attention_forward);
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& stats) {
  const cuda::CcaShape s = checked_shape(kBackward, query, key, value);
  check_out_and_grad(kBackward, query, out, grad_out, value.sizes());
  check_saved(kBackward, query, "stats", stats, {s.N, 2, s.H, s.W});
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads{at::empty_like(query), at::empty_like(key),
                                                       at::empty_like(value)};
  if (s.N * s.H * s.W == 0) return grads;
  auto& [grad_query, grad_key, grad_value] = grads;
  cuda::CcaBackwardParams p{s, grad_out.const_data_ptr(), query.const_data_ptr(),
                            key.const_data_ptr(), value.const_data_ptr(), out.const_data_ptr(),
                            stats.const_data_ptr(), grad_query.mutable_data_ptr(),
                            grad_key.mutable_data_ptr(), grad_value.mutable_data_ptr()};
  launch(kBackward, query, p, cuda::criss_cross_attention_backward_workspace_bytes,
         cuda::criss_cross_attention_backward);
  return grads;
}

}  // namespace segops::cuda_binding::criss_cross_attention

TORCH_LIBRARY_IMPL(segops_C, CUDA, m) {
  using namespace segops::cuda_binding::criss_cross_attention;
  m.impl("criss_cross_attention_forward", &forward);
  m.impl("criss_cross_attention_backward", &backward);
}
