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

namespace segops {
namespace cuda_binding {
namespace isa {

constexpr const char* kOp = "interlaced_sparse_attention";

at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ph,
                  int64_t pw) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "segops.interlaced_sparse_attention (cuda): query, key, value must be 4-D "
              "(N, C, H, W), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "segops.interlaced_sparse_attention (cuda): key shape ",
              k.sizes(), " must equal query shape ", q.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(2) == q.size(2) && v.size(3) == q.size(3),
              "segops.interlaced_sparse_attention (cuda): value (N, H, W) must match query's, "
              "got ", v.sizes(), " vs ", q.sizes());
  TORCH_CHECK(ph > 0 && pw > 0 && q.size(2) % ph == 0 && q.size(3) % pw == 0,
              "segops.interlaced_sparse_attention (cuda): (H, W) = (", q.size(2), ", ",
              q.size(3), ") must be divisible by block_size (", ph, ", ", pw, ")");
}

cuda::IsaShape make_shape(const at::Tensor& q, const at::Tensor& v, int64_t ph, int64_t pw,
                          bool long_range, double scale) {
  cuda::IsaShape s;
  s.N = q.size(0);
  s.Ck = q.size(1);
  s.H = q.size(2);
  s.W = q.size(3);
  s.Cv = v.size(1);
  s.ph = ph;
  s.pw = pw;
  s.long_range = long_range;
  s.scale = scale;
  s.dtype = dtype_of(q, kOp);
  return s;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& query, const at::Tensor& key,
                                           const at::Tensor& value, int64_t ph, int64_t pw,
                                           bool long_range, double scale) {
  check_tensors(kOp, query, {{"query", &query}, {"key", &key}, {"value", &value}});
  check_inputs(query, key, value, ph, pw);
  const cuda::IsaShape shape = make_shape(query, value, ph, pw, long_range, scale);
  auto out = at::empty({shape.N, shape.Cv, shape.H, shape.W}, value.options());
  auto lse = at::empty({shape.N, shape.H, shape.W}, query.options().dtype(lse_dtype(query)));
  if (out.numel() == 0 || lse.numel() == 0) return {out, lse};
  TORCH_CHECK(shape.Ck > 0, "segops.interlaced_sparse_attention (cuda): Ck must be positive");
  c10::cuda::CUDAGuard guard(query.device());
  cuda::IsaForwardParams p;
  p.shape = shape;
  p.query = query.const_data_ptr();
  p.key = key.const_data_ptr();
  p.value = value.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  check_launch(cuda::interlaced_sparse_attention_forward(p, current_stream()), kOp);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse, int64_t ph, int64_t pw,
    bool long_range, double scale) {
  check_tensors(kOp, query, {{"grad_out", &grad_out}, {"query", &query}, {"key", &key},
                             {"value", &value}, {"out", &out}});
  check_inputs(query, key, value, ph, pw);
  TORCH_CHECK(grad_out.sizes() == value.sizes() && out.sizes() == value.sizes(),
              "segops.interlaced_sparse_attention_backward (cuda): grad_out and out must have "
              "value's shape ", value.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == query.size(0) && lse.size(1) == query.size(2) &&
                  lse.size(2) == query.size(3) && lse.scalar_type() == lse_dtype(query),
              "segops.interlaced_sparse_attention_backward (cuda): lse must be (N, H, W) of "
              "dtype ", lse_dtype(query), ", got ", lse.sizes(), " ", lse.scalar_type());
  TORCH_CHECK(lse.is_cuda() && lse.device() == query.device() && lse.is_contiguous(),
              "segops.interlaced_sparse_attention_backward (cuda): lse must be a contiguous "
              "tensor on ", query.device(), ", got ", lse.device());
  auto dq = at::empty_like(query), dk = at::empty_like(key), dv = at::empty_like(value);
  if (query.numel() == 0 || value.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  c10::cuda::CUDAGuard guard(query.device());
  cuda::IsaBackwardParams p;
  p.shape = make_shape(query, value, ph, pw, long_range, scale);
  p.grad_out = grad_out.const_data_ptr();
  p.query = query.const_data_ptr();
  p.key = key.const_data_ptr();
  p.value = value.const_data_ptr();
  p.out = out.const_data_ptr();
  p.lse = lse.const_data_ptr();
  p.grad_query = dq.mutable_data_ptr();
  p.grad_key = dk.mutable_data_ptr();
  p.grad_value = dv.mutable_data_ptr();
  const auto ws_bytes =
      static_cast<int64_t>(cuda::interlaced_sparse_attention_backward_workspace_bytes(p));
  auto workspace = at::empty({ws_bytes}, query.options().dtype(at::kByte));
  p.workspace = workspace.mutable_data_ptr();
  check_launch(cuda::interlaced_sparse_attention_backward(p, current_stream()), kOp);
  return {dq, dk, dv};
}

}  // namespace isa
}  // namespace cuda_binding
}  // namespace segops

TORCH_LIBRARY_IMPL(segops_C, CUDA, m) {
  m.impl("interlaced_sparse_attention_forward", &segops::cuda_binding::isa::forward);
  m.impl("interlaced_sparse_attention_backward", &segops::cuda_binding::isa::backward);
}

// ===== end interlaced_sparse_attention =====


// ===== disentangled_non_local =====

// ===== end disentangled_non_local =====


// ===== semantic_difference_conv2d =====

// ===== end semantic_difference_conv2d =====


// ===== qco (qco_forward/backward, texture_reconstruct_forward/backward) =====

// ===== end qco =====
