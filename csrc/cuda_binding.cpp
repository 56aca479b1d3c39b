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
#include <torch/library.h>
#ifdef SEGOPS_CUDA_EMULATION  // tests/cuda_emulation: the kernels run on the CPU, see build.py
#include "emu_torch_cuda.h"
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
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

// Whether `t` lives where the kernels run (a CUDA device; the CPU in the emulation build).
inline bool on_kernel_device(const at::Tensor& t) {
#ifdef SEGOPS_CUDA_EMULATION
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch(cudaError_t err, const char* op) {
  if (err == cudaSuccess) err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "segops.", op, " (cuda): kernel launch failed: ",
              cudaGetErrorString(err));
}

// Scratch memory a launcher asks for (its *_workspace_bytes): a byte tensor on `like`'s device
// that lives until the end of the calling scope (at least one byte, so the pointer is never null).
struct Workspace {
  at::Tensor bytes;
  Workspace(size_t n, const at::Tensor& like)
      : bytes(at::empty({static_cast<int64_t>(std::max<size_t>(n, 1))}, like.options().dtype(at::kByte))) {}
  void* ptr() { return bytes.data_ptr(); }
};

// Every tensor must be a contiguous CUDA tensor on `like`'s device with `like`'s dtype (the ops
// layer makes inputs and incoming gradients contiguous; this guards direct segops_C calls).
inline void check_tensors(const char* op, const at::Tensor& like,
                          std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  for (const auto& [name, t] : ts) {
    TORCH_CHECK(on_kernel_device(*t), "segops.", op, " (cuda): ", name, " must be a CUDA tensor, got ",
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
namespace segops {
namespace cuda_binding {
namespace cca {

constexpr const char* kOp = "criss_cross_attention";

// Statistics are kept in the accumulation dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType stats_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_qkv(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
              "segops.criss_cross_attention (cuda): query, key, value must be 4-D, got ",
              query.dim(), ", ", key.dim(), ", ", value.dim());
  TORCH_CHECK(key.sizes() == query.sizes(), "segops.criss_cross_attention (cuda): key shape ",
              key.sizes(), " must equal query shape ", query.sizes());
  TORCH_CHECK(value.size(0) == query.size(0) && value.size(2) == query.size(2) &&
                  value.size(3) == query.size(3),
              "segops.criss_cross_attention (cuda): value shape ", value.sizes(),
              " must be (N, Cv, H, W) with (N, H, W) of query ", query.sizes());
  check_tensors(kOp, query, {{"query", &query}, {"key", &key}, {"value", &value}});
  (void)dtype_of(query, kOp);
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& query, const at::Tensor& key,
                                           const at::Tensor& value) {
  check_qkv(query, key, value);
  c10::cuda::CUDAGuard guard(query.device());
  const int64_t N = query.size(0), Ck = query.size(1), H = query.size(2), W = query.size(3);
  const int64_t Cv = value.size(1);
  at::Tensor out = at::empty({N, Cv, H, W}, value.options());
  at::Tensor stats = at::empty({N, 2, H, W}, query.options().dtype(stats_dtype(query.scalar_type())));
  if (N * H * W == 0) return {out, stats};
  cuda::CcaForwardParams p;
  p.query = query.const_data_ptr();
  p.key = key.const_data_ptr();
  p.value = value.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.stats = stats.mutable_data_ptr();
  p.N = N;
  p.Ck = Ck;
  p.Cv = Cv;
  p.H = H;
  p.W = W;
  p.dtype = dtype_of(query, kOp);
  Workspace ws(cuda::criss_cross_attention_forward_workspace_bytes(p), query);
  p.workspace = ws.ptr();
  check_launch(cuda::criss_cross_attention_forward(p, current_stream()), kOp);
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& stats) {
  check_qkv(query, key, value);
  TORCH_CHECK(grad_out.sizes() == value.sizes() && out.sizes() == value.sizes(),
              "segops.criss_cross_attention_backward (cuda): grad_out ", grad_out.sizes(),
              " and out ", out.sizes(), " must have the value's shape ", value.sizes());
  check_tensors(kOp, query, {{"grad_out", &grad_out}, {"out", &out}});
  const int64_t N = query.size(0), Ck = query.size(1), H = query.size(2), W = query.size(3);
  const int64_t Cv = value.size(1);
  TORCH_CHECK(stats.dim() == 4 && stats.size(0) == N && stats.size(1) == 2 &&
                  stats.size(2) == H && stats.size(3) == W,
              "segops.criss_cross_attention_backward (cuda): stats must be (N, 2, H, W) = (", N,
              ", 2, ", H, ", ", W, "), got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == stats_dtype(query.scalar_type()),
              "segops.criss_cross_attention_backward (cuda): stats must have dtype ",
              stats_dtype(query.scalar_type()), " for ", query.scalar_type(), " inputs, got ",
              stats.scalar_type());
  check_tensors(kOp, stats, {{"stats", &stats}});
  TORCH_CHECK(stats.device() == query.device(),
              "segops.criss_cross_attention_backward (cuda): stats is on ", stats.device(),
              ", expected ", query.device());
  c10::cuda::CUDAGuard guard(query.device());
  at::Tensor dq = at::empty_like(query), dk = at::empty_like(key), dv = at::empty_like(value);
  if (N * H * W == 0) return {dq, dk, dv};
  cuda::CcaBackwardParams p;
  p.grad_out = grad_out.const_data_ptr();
  p.query = query.const_data_ptr();
  p.key = key.const_data_ptr();
  p.value = value.const_data_ptr();
  p.out = out.const_data_ptr();
  p.stats = stats.const_data_ptr();
  p.grad_query = dq.mutable_data_ptr();
  p.grad_key = dk.mutable_data_ptr();
  p.grad_value = dv.mutable_data_ptr();
  p.N = N;
  p.Ck = Ck;
  p.Cv = Cv;
  p.H = H;
  p.W = W;
  p.dtype = dtype_of(query, kOp);
  Workspace ws(cuda::criss_cross_attention_backward_workspace_bytes(p), query);
  p.workspace = ws.ptr();
  check_launch(cuda::criss_cross_attention_backward(p, current_stream()), kOp);
  return {dq, dk, dv};
}

}  // namespace cca
}  // namespace cuda_binding
}  // namespace segops

TORCH_LIBRARY_IMPL(segops_C, CUDA, m) {
  m.impl("criss_cross_attention_forward", &segops::cuda_binding::cca::forward);
  m.impl("criss_cross_attention_backward", &segops::cuda_binding::cca::backward);
}
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
  TORCH_CHECK(on_kernel_device(lse) && lse.device() == query.device() && lse.is_contiguous(),
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
  Workspace ws(cuda::interlaced_sparse_attention_backward_workspace_bytes(p), query);
  p.workspace = ws.ptr();
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
  TORCH_CHECK(on_kernel_device(t) && t.device() == like.device(), "segops.", kOp, " (cuda): ", name,
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
  Workspace ws(cuda::disentangled_non_local_forward_workspace_bytes(p), query);
  p.workspace = ws.ptr();
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
  Workspace ws(cuda::disentangled_non_local_backward_workspace_bytes(p), query);
  p.workspace = ws.ptr();
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
  Workspace ws(cuda::semantic_difference_conv2d_forward_workspace_bytes(p), input);
  p.workspace = ws.ptr();
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
  Workspace ws(cuda::semantic_difference_conv2d_backward_workspace_bytes(p), input);
  p.workspace = ws.ptr();
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
  TORCH_CHECK(on_kernel_device(x), "segops.", op, " (cuda): x must be a CUDA tensor, got ", x.device());
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
  Workspace ws(cuda::qco_forward_workspace_bytes(p), x);
  p.workspace = ws.ptr();
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
  Workspace ws(cuda::qco_backward_workspace_bytes(p), x);
  p.workspace = ws.ptr();
  check_launch(cuda::qco_backward(p, current_stream()), op);
  return gx;
}

inline void check_recon(const char* op, const at::Tensor& sim, const at::Tensor& levels,
                        const at::Tensor& features) {
  TORCH_CHECK(on_kernel_device(sim), "segops.", op, " (cuda): sim must be a CUDA tensor, got ",
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
  Workspace ws(cuda::texture_reconstruct_forward_workspace_bytes(p), sim);
  p.workspace = ws.ptr();
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
  Workspace ws(cuda::texture_reconstruct_backward_workspace_bytes(p), sim);
  p.workspace = ws.ptr();
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
