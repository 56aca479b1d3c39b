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

namespace segops {
namespace cuda_binding {
namespace dnl {

constexpr const char* kOp = "disentangled_non_local";

// Saved statistics (lse, g, lse_u) are in the accumulation dtype: float64 for float64, else float32.
inline at::ScalarType stat_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& unary) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "segops.", kOp,
              " (cuda): query, key and value must be 3-D (N, C, L), got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1), "segops.", kOp,
              " (cuda): key must be (N, Ck, Lk) with (N, Ck) of query ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(2) == k.size(2), "segops.", kOp,
              " (cuda): value must be (N, Cv, Lk) with N, Lk of key ", k.sizes(), ", got ",
              v.sizes());
  if (unary.has_value()) {
    TORCH_CHECK(unary->dim() == 2 && unary->size(0) == k.size(0) && unary->size(1) == k.size(2),
                "segops.", kOp, " (cuda): unary must be (N, Lk) = (", k.size(0), ", ", k.size(2),
                "), got ", unary->sizes());
  }
  TORCH_CHECK(k.size(2) > 0 || q.size(0) * q.size(2) == 0, "segops.", kOp,
              " (cuda): key has no positions (Lk = 0) but there are queries");
}

void check_stat(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dt,
                const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "segops.", kOp, " (cuda): ", name,
              " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dt, "segops.", kOp, " (cuda): ", name, " must have dtype ", dt,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "segops.", kOp, " (cuda): ", name, " must have shape ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "segops.", kOp, " (cuda): ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& unary, bool whiten, double s) {
  check_tensors(kOp, query, {{"query", &query}, {"key", &key}, {"value", &value}});
  if (unary.has_value()) check_tensors(kOp, query, {{"unary", &*unary}});
  check_shapes(query, key, value, unary);
  const cuda::DType dtype = dtype_of(query, kOp);
  const int64_t N = query.size(0), Ck = query.size(1), Lq = query.size(2);
  const int64_t Cv = value.size(1), Lk = key.size(2);
  c10::cuda::CUDAGuard guard(query.device());
  const auto sopt = query.options().dtype(stat_dtype(query));
  auto out = at::empty({N, Cv, Lq}, value.options());
  auto lse = at::empty({N, Lq}, sopt);
  auto g = at::zeros({N, Cv}, sopt);
  auto lse_u = at::zeros({N}, sopt);
  // Nothing to compute: no samples, no keys (then no queries either), or no queries and no
  // unary statistics to produce.
  if (N == 0 || Lk == 0 || (Lq == 0 && !unary.has_value())) return {out, lse, g, lse_u};
  cuda::DisentangledNonLocalForwardParams p;
  p.query = query.data_ptr();
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.unary = unary.has_value() ? unary->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.g = g.data_ptr();
  p.lse_u = lse_u.data_ptr();
  p.N = N;
  p.Ck = Ck;
  p.Cv = Cv;
  p.Lq = Lq;
  p.Lk = Lk;
  p.whiten = whiten;
  p.s = s;
  p.dtype = dtype;
  const size_t ws = cuda::disentangled_non_local_forward_workspace_bytes(p);
  at::Tensor workspace;
  if (ws > 0) {
    workspace = at::empty({static_cast<int64_t>(ws)}, query.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
  }
  check_launch(cuda::disentangled_non_local_forward(p, current_stream()), kOp);
  return {out, lse, g, lse_u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const std::optional<at::Tensor>& unary, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& g, const at::Tensor& lse_u, bool whiten, double s) {
  check_tensors(kOp, query, {{"grad_out", &grad_out}, {"query", &query}, {"key", &key},
                             {"value", &value}, {"out", &out}});
  if (unary.has_value()) check_tensors(kOp, query, {{"unary", &*unary}});
  check_shapes(query, key, value, unary);
  const cuda::DType dtype = dtype_of(query, kOp);
  const int64_t N = query.size(0), Ck = query.size(1), Lq = query.size(2);
  const int64_t Cv = value.size(1), Lk = key.size(2);
  TORCH_CHECK(out.sizes() == at::IntArrayRef({N, Cv, Lq}), "segops.", kOp,
              " (cuda): out must have shape (N, Cv, Lq) = (", N, ", ", Cv, ", ", Lq, "), got ",
              out.sizes());
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "segops.", kOp,
              " (cuda): grad_out must have the shape of out ", out.sizes(), ", got ",
              grad_out.sizes());
  const at::ScalarType sd = stat_dtype(query);
  check_stat(lse, "lse", {N, Lq}, sd, query);
  if (unary.has_value()) {
    check_stat(g, "g", {N, Cv}, sd, query);
    check_stat(lse_u, "lse_u", {N}, sd, query);
  }
  c10::cuda::CUDAGuard guard(query.device());
  auto dq = at::empty_like(query);
  // With no queries the gradients of key, value and unary are zero (nothing is launched).
  auto dk = Lq == 0 ? at::zeros_like(key) : at::empty_like(key);
  auto dv = Lq == 0 ? at::zeros_like(value) : at::empty_like(value);
  auto du = unary.has_value() ? (Lq == 0 ? at::zeros_like(*unary) : at::empty_like(*unary))
                              : at::empty({0}, query.options());
  if (N == 0 || Lq == 0 || Lk == 0) return {dq, dk, dv, du};
  cuda::DisentangledNonLocalBackwardParams p;
  p.grad_out = grad_out.data_ptr();
  p.query = query.data_ptr();
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.unary = unary.has_value() ? unary->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.g = unary.has_value() ? g.data_ptr() : nullptr;
  p.lse_u = unary.has_value() ? lse_u.data_ptr() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.du = unary.has_value() ? du.data_ptr() : nullptr;
  p.N = N;
  p.Ck = Ck;
  p.Cv = Cv;
  p.Lq = Lq;
  p.Lk = Lk;
  p.whiten = whiten;
  p.s = s;
  p.dtype = dtype;
  const size_t ws = cuda::disentangled_non_local_backward_workspace_bytes(p);
  at::Tensor workspace;
  if (ws > 0) {
    workspace = at::empty({static_cast<int64_t>(ws)}, query.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
  }
  check_launch(cuda::disentangled_non_local_backward(p, current_stream()), kOp);
  return {dq, dk, dv, du};
}

}  // namespace dnl
}  // namespace cuda_binding
}  // namespace segops

TORCH_LIBRARY_IMPL(segops_C, CUDA, m) {
  m.impl("disentangled_non_local_forward", &segops::cuda_binding::dnl::forward);
  m.impl("disentangled_non_local_backward", &segops::cuda_binding::dnl::backward);
}

// ===== end disentangled_non_local =====


// ===== semantic_difference_conv2d =====

// ===== end semantic_difference_conv2d =====


// ===== qco (qco_forward/backward, texture_reconstruct_forward/backward) =====

// ===== end qco =====
