// Cheap guards at the torch boundary of the segops_C kernels, shared by the CPU and the CUDA
// bindings. The full argument validation, with the messages users see, runs once in Python
// (segops/ops); these checks only stop a direct torch.ops.segops_C call with bad arguments
// before it reaches a kernel, with a RuntimeError naming the kernel and the argument. Each one
// is reached by tests/test_kernel_guards.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <utility>

namespace segops {
namespace guards {

// (argument name, tensor) pairs; `kernel` below is "<segops_C kernel> (<backend>)".
using Arg = std::pair<const char*, const at::Tensor*>;

// Every argument has `rank` dimensions.
inline void check_rank(const char* kernel, int64_t rank, std::initializer_list<Arg> args) {
  for (const auto& [name, t] : args) {
    TORCH_CHECK(t->dim() == rank, "segops_C.", kernel, ": ", name, " must be ", rank,
                "-D, got shape ", t->sizes());
  }
}

// Every argument is contiguous and has `like`'s device and dtype.
inline void check_like(const char* kernel, const at::Tensor& like, std::initializer_list<Arg> args) {
  for (const auto& [name, t] : args) {
    TORCH_CHECK(t->device() == like.device(), "segops_C.", kernel, ": ", name, " is on ",
                t->device(), ", expected ", like.device());
    TORCH_CHECK(t->scalar_type() == like.scalar_type(), "segops_C.", kernel, ": ", name,
                " has dtype ", t->scalar_type(), ", expected ", like.scalar_type());
    TORCH_CHECK(t->is_contiguous(), "segops_C.", kernel, ": ", name, " must be contiguous");
  }
}

// `t` has exactly the sizes `expected`.
inline void check_sizes(const char* kernel, const char* name, const at::Tensor& t,
                        at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "segops_C.", kernel, ": ", name, " must have shape ",
              expected, ", got ", t.sizes());
}

// `t` has one of the dtypes a backend implements.
inline void check_dtype(const char* kernel, const char* name, const at::Tensor& t,
                        std::initializer_list<at::ScalarType> allowed) {
  for (auto s : allowed) {
    if (t.scalar_type() == s) return;
  }
  TORCH_CHECK(false, "segops_C.", kernel, ": ", name, " has dtype ", t.scalar_type(),
              ", which this backend does not implement");
}

// A condition on scalar arguments (or sizes) that the kernel's indexing relies on holds;
// `what...` states the requirement, e.g. "H must be divisible by grid = ", grid.
template <typename... Args>
inline void check_value(const char* kernel, bool ok, const Args&... what) {
  TORCH_CHECK(ok, "segops_C.", kernel, ": ", what...);
}

}  // namespace guards
}  // namespace segops
