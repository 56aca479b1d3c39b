// Torch side of the CUDA bindings (csrc/cuda/<op>.cpp; never included by a .cu): each binding
// registers its op's torch-free launchers (segops/cuda/<op>.h) as the CUDA kernels of the
// segops_C schemas in csrc/register.cpp. Per kernel: the cheap guards of segops/torch_guards.h
// (the full validation runs in Python, segops/ops), the outputs, the device guard, and the
// launch on the current stream with its workspace. Built only with SEGOPS_WITH_CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#ifdef SEGOPS_CUDA_EMULATION  // tests/cuda_emulation: the kernels run on the CPU, see build.py
#include "emu_torch_cuda.h"
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>

#include "segops/cuda/common.h"
#include "segops/torch_guards.h"

namespace segops::cuda_binding {

// Saved statistics and the gradients of statistics are kept in the accumulation dtype: float64
// for float64 data, float32 otherwise.
inline at::ScalarType acc_dtype(const at::Tensor& data) {
  return data.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The launcher's DType of argument `name`; any other dtype is rejected.
inline cuda::DType dtype_of(const char* kernel, const char* name, const at::Tensor& t) {
  guards::check_dtype(kernel, name, t, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
  switch (t.scalar_type()) {
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: return cuda::DType::kFloat32;
  }
}

// query, key, value of an attention op: `rank`-D, contiguous, of query's device and dtype (one
// the kernels implement, returned). Their sizes are the op's to check.
inline cuda::DType check_attention_inputs(const char* kernel, int64_t rank, const at::Tensor& query,
                                          const at::Tensor& key, const at::Tensor& value) {
  guards::check_rank(kernel, rank, {{"query", &query}, {"key", &key}, {"value", &value}});
  guards::check_like(kernel, query, {{"query", &query}, {"key", &key}, {"value", &value}});
  return dtype_of(kernel, "query", query);
}

// The forward's output and its incoming gradient: contiguous, of query's device and dtype, and
// of `sizes`.
inline void check_out_and_grad(const char* kernel, const at::Tensor& query, const at::Tensor& out,
                               const at::Tensor& grad_out, at::IntArrayRef sizes) {
  guards::check_like(kernel, query, {{"grad_out", &grad_out}, {"out", &out}});
  guards::check_sizes(kernel, "grad_out", grad_out, sizes);
  guards::check_sizes(kernel, "out", out, sizes);
}

// A saved tensor in the accumulation dtype of `data`: on its device, contiguous, of `sizes`.
inline void check_saved(const char* kernel, const at::Tensor& data, const char* name,
                        const at::Tensor& t, at::IntArrayRef sizes) {
  TORCH_CHECK(t.device() == data.device(), "segops_C.", kernel, ": ", name, " is on ",
              t.device(), ", expected ", data.device());
  TORCH_CHECK(t.scalar_type() == acc_dtype(data), "segops_C.", kernel, ": ", name,
              " has dtype ", t.scalar_type(), ", expected ", acc_dtype(data));
  TORCH_CHECK(t.is_contiguous(), "segops_C.", kernel, ": ", name, " must be contiguous");
  guards::check_sizes(kernel, name, t, sizes);
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Launcher parameter structs are filled by aggregate initialisation, in their field order (shape,
// inputs, saved tensors, results; segops/cuda/common.h); the workspace is set by launch().

// Runs launch(params, stream) on `like`'s device with a workspace of workspace_bytes(params)
// bytes (a byte tensor that lives until the kernels have been queued; the stream orders its
// reuse), and turns an error into a RuntimeError.
template <typename Params>
void launch(const char* kernel, const at::Tensor& like, Params& params,
            size_t (*workspace_bytes)(const Params&),
            cudaError_t (*launcher)(const Params&, cudaStream_t)) {
  c10::cuda::CUDAGuard device_guard(like.device());
  const size_t bytes = std::max<size_t>(workspace_bytes(params), 1);  // never a null pointer
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  params.workspace = workspace.data_ptr();
  cudaError_t err = launcher(params, current_stream());
  if (err == cudaSuccess) err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "segops_C.", kernel, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace segops::cuda_binding
