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
#include <ATen/ops/sum.h>

#include <optional>
#include <string>

namespace segops {
namespace cuda_binding {
namespace sdc {

constexpr const char* kOp = "semantic_difference_conv2d";

inline int parse_similarity(const std::string& s) {
  if (s == "none") return cuda::kSdcNone;
  if (s == "charbonnier") return cuda::kSdcCharbonnier;
  if (s == "gaussian") return cuda::kSdcGaussian;
  TORCH_CHECK(false, "segops.", kOp, " (cuda): similarity must be charbonnier, gaussian or none, got ", s);
}

// Shape checks (the same as the CPU kernels') and the launcher's geometry.
inline cuda::SdcGeometry geometry(const at::Tensor& input, const at::Tensor& guidance,
                                  const at::Tensor& weight, int64_t dilation,
                                  const std::string& similarity, double sigma) {
  TORCH_CHECK(input.dim() == 4, "segops.", kOp, " (cuda): input must be 4-D (N, Cin, H, W), got ",
              input.sizes());
  TORCH_CHECK(guidance.dim() == 4, "segops.", kOp,
              " (cuda): guidance must be 4-D (N, Cg, H, W), got ", guidance.sizes());
  TORCH_CHECK(weight.dim() == 4, "segops.", kOp,
              " (cuda): weight must be 4-D (Cout, Cin, k, k), got ", weight.sizes());
  cuda::SdcGeometry g;
  g.similarity = parse_similarity(similarity);
  g.N = input.size(0);
  g.Cin = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.Cg = guidance.size(1);
  g.Cout = weight.size(0);
  g.k = weight.size(2);
  g.dilation = dilation;
  g.sigma = sigma;
  g.dtype = dtype_of(input, kOp);
  TORCH_CHECK(weight.size(1) == g.Cin && weight.size(3) == g.k && g.k % 2 == 1, "segops.", kOp,
              " (cuda): weight must be (Cout, Cin=", g.Cin, ", k, k) with k odd, got ",
              weight.sizes());
  TORCH_CHECK(guidance.size(0) == g.N && guidance.size(2) == g.H && guidance.size(3) == g.W,
              "segops.", kOp, " (cuda): guidance must match (N, H, W) = (", g.N, ", ", g.H, ", ",
              g.W, ") of input, got ", guidance.sizes());
  TORCH_CHECK(g.similarity != cuda::kSdcCharbonnier || g.Cg == g.Cin, "segops.", kOp,
              " (cuda): charbonnier needs Cg == Cin = ", g.Cin, ", got Cg = ", g.Cg);
  TORCH_CHECK(dilation >= 1, "segops.", kOp, " (cuda): dilation must be >= 1, got ", dilation);
  TORCH_CHECK(sigma > 0.0, "segops.", kOp, " (cuda): sigma must be > 0, got ", sigma);
  return g;
}

at::Tensor forward(const at::Tensor& input, const at::Tensor& guidance, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, int64_t dilation, std::string similarity,
                   double sigma) {
  check_tensors(kOp, input, {{"input", &input}, {"guidance", &guidance}, {"weight", &weight}});
  const cuda::SdcGeometry geo = geometry(input, guidance, weight, dilation, similarity, sigma);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_tensors(kOp, input, {{"bias", &*bias}});
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == geo.Cout, "segops.", kOp,
                " (cuda): bias must be (Cout,) = (", geo.Cout, ",), got ", bias->sizes());
  }
  at::Tensor out = at::empty({geo.N, geo.Cout, geo.H, geo.W}, input.options());
  if (out.numel() == 0) return out;
  c10::cuda::CUDAGuard guard(input.device());
  cuda::SdcForwardParams p;
  p.g = geo;
  p.input = input.data_ptr();
  p.guidance = guidance.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = has_bias ? bias->data_ptr() : nullptr;
  p.output = out.data_ptr();
  const size_t ws_bytes = cuda::semantic_difference_conv2d_forward_workspace_bytes(p);
  at::Tensor ws;
  if (ws_bytes > 0) {
    ws = at::empty({static_cast<int64_t>(ws_bytes)}, input.options().dtype(at::kByte));
    p.workspace = ws.data_ptr();
  }
  check_launch(cuda::semantic_difference_conv2d_forward(p, current_stream()), kOp);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& guidance,
    const at::Tensor& weight, int64_t dilation, std::string similarity, double sigma) {
  check_tensors(kOp, input, {{"grad_out", &grad_out}, {"input", &input}, {"guidance", &guidance},
                             {"weight", &weight}});
  const cuda::SdcGeometry geo = geometry(input, guidance, weight, dilation, similarity, sigma);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == geo.N && grad_out.size(1) == geo.Cout &&
                  grad_out.size(2) == geo.H && grad_out.size(3) == geo.W,
              "segops.", kOp, "_backward (cuda): grad_out must be (N, Cout, H, W) = (", geo.N, ", ",
              geo.Cout, ", ", geo.H, ", ", geo.W, "), got ", grad_out.sizes());
  c10::cuda::CUDAGuard guard(input.device());
  if (input.numel() == 0 || grad_out.numel() == 0) {
    // Nothing reaches the inputs; grad_bias is still grad_out summed (zeros when it is empty).
    // (An empty guidance alone is fine: the launcher writes grad_input and grad_weight.)
    return {at::zeros_like(input), at::zeros_like(guidance), at::zeros_like(weight),
            at::sum(grad_out, {0, 2, 3})};
  }
  at::Tensor grad_input = at::empty_like(input);
  at::Tensor grad_guidance = at::empty_like(guidance);
  at::Tensor grad_weight = at::empty_like(weight);
  at::Tensor grad_bias = at::empty({geo.Cout}, weight.options());
  cuda::SdcBackwardParams p;
  p.g = geo;
  p.grad_out = grad_out.data_ptr();
  p.input = input.data_ptr();
  p.guidance = guidance.data_ptr();
  p.weight = weight.data_ptr();
  p.grad_input = grad_input.data_ptr();
  p.grad_guidance = grad_guidance.data_ptr();
  p.grad_weight = grad_weight.data_ptr();
  p.grad_bias = grad_bias.data_ptr();
  const size_t ws_bytes = cuda::semantic_difference_conv2d_backward_workspace_bytes(p);
  at::Tensor ws;
  if (ws_bytes > 0) {
    ws = at::empty({static_cast<int64_t>(ws_bytes)}, input.options().dtype(at::kByte));
    p.workspace = ws.data_ptr();
  }
  check_launch(cuda::semantic_difference_conv2d_backward(p, current_stream()), kOp);
  return {grad_input, grad_guidance, grad_weight, grad_bias};
}

}  // namespace sdc
}  // namespace cuda_binding
}  // namespace segops

TORCH_LIBRARY_IMPL(segops_C, CUDA, m) {
  m.impl("semantic_difference_conv2d_forward", &segops::cuda_binding::sdc::forward);
  m.impl("semantic_difference_conv2d_backward", &segops::cuda_binding::sdc::backward);
}
// ===== end semantic_difference_conv2d =====


// ===== qco (qco_forward/backward, texture_reconstruct_forward/backward) =====

// ===== end qco =====
