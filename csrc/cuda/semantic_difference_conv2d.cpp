// Torch binding of the semantic_difference_conv2d CUDA kernels (semantic_difference_conv2d.cu).
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>

#include <optional>
#include <string>
#include <tuple>

#include "segops/cuda/binding.h"
#include "segops/cuda/semantic_difference_conv2d.h"

namespace segops::cuda_binding::semantic_difference_conv2d {

constexpr const char* kForward = "semantic_difference_conv2d_forward (cuda)";
constexpr const char* kBackward = "semantic_difference_conv2d_backward (cuda)";

int parse_similarity(const char* kernel, const std::string& s) {
  if (s == "none") return cuda::kSdcNone;
  if (s == "charbonnier") return cuda::kSdcCharbonnier;
  if (s == "gaussian") return cuda::kSdcGaussian;
  TORCH_CHECK(false, "segops_C.", kernel, ": similarity must be charbonnier, gaussian or none, got ", s);
}

// k odd, dilation, sigma and charbonnier's Cg == Cin are validated by the launcher.
cuda::SdcShape checked_shape(const char* kernel, const at::Tensor& input,
                             const at::Tensor& guidance, const at::Tensor& weight,
                             int64_t dilation, const std::string& similarity, double sigma) {
  guards::check_rank(kernel, 4, {{"input", &input}, {"guidance", &guidance}, {"weight", &weight}});
  guards::check_like(kernel, input, {{"input", &input}, {"guidance", &guidance}, {"weight", &weight}});
  // N, Cin, Cg, Cout, H, W, k, dilation, similarity, sigma, dtype
  const cuda::SdcShape s{input.size(0), input.size(1), guidance.size(1), weight.size(0),
                         input.size(2), input.size(3), weight.size(2), dilation,
                         parse_similarity(kernel, similarity), sigma,
                         dtype_of(kernel, "input", input)};
  guards::check_sizes(kernel, "guidance", guidance, {s.N, s.Cg, s.H, s.W});
  guards::check_sizes(kernel, "weight", weight, {s.Cout, s.Cin, s.k, s.k});
  return s;
}

at::Tensor forward(const at::Tensor& input, const at::Tensor& guidance, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, int64_t dilation, std::string similarity,
                   double sigma) {
  const cuda::SdcShape s = checked_shape(kForward, input, guidance, weight, dilation, similarity, sigma);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    guards::check_like(kForward, input, {{"bias", &*bias}});
    guards::check_sizes(kForward, "bias", *bias, {s.Cout});
  }
  at::Tensor out = at::empty({s.N, s.Cout, s.H, s.W}, input.options());
  if (out.numel() == 0) return out;
  cuda::SdcForwardParams p{s, input.const_data_ptr(), guidance.const_data_ptr(),
                           weight.const_data_ptr(), has_bias ? bias->const_data_ptr() : nullptr,
                           out.mutable_data_ptr()};
  launch(kForward, input, p, cuda::semantic_difference_conv2d_forward_workspace_bytes,
         cuda::semantic_difference_conv2d_forward);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& guidance,
    const at::Tensor& weight, int64_t dilation, std::string similarity, double sigma) {
  const cuda::SdcShape s = checked_shape(kBackward, input, guidance, weight, dilation, similarity, sigma);
  guards::check_like(kBackward, input, {{"grad_out", &grad_out}});
  guards::check_sizes(kBackward, "grad_out", grad_out, {s.N, s.Cout, s.H, s.W});
  if (input.numel() == 0 || grad_out.numel() == 0) {
    // Nothing reaches the inputs; grad_bias is still grad_out summed (zeros when it is empty).
    // (An empty guidance alone is fine: the launcher writes grad_input and grad_weight.)
    return {at::zeros_like(input), at::zeros_like(guidance), at::zeros_like(weight),
            at::sum(grad_out, {0, 2, 3})};
  }
  at::Tensor grad_input = at::empty_like(input), grad_guidance = at::empty_like(guidance);
  at::Tensor grad_weight = at::empty_like(weight), grad_bias = at::empty({s.Cout}, weight.options());
  cuda::SdcBackwardParams p{s, grad_out.const_data_ptr(), input.const_data_ptr(),
                            guidance.const_data_ptr(), weight.const_data_ptr(),
                            grad_input.mutable_data_ptr(), grad_guidance.mutable_data_ptr(),
                            grad_weight.mutable_data_ptr(), grad_bias.mutable_data_ptr()};
  launch(kBackward, input, p, cuda::semantic_difference_conv2d_backward_workspace_bytes,
         cuda::semantic_difference_conv2d_backward);
  return {grad_input, grad_guidance, grad_weight, grad_bias};
}

}  // namespace segops::cuda_binding::semantic_difference_conv2d

TORCH_LIBRARY_IMPL(segops_C, CUDA, m) {
  using namespace segops::cuda_binding::semantic_difference_conv2d;
  m.impl("semantic_difference_conv2d_forward", &forward);
  m.impl("semantic_difference_conv2d_backward", &backward);
}
