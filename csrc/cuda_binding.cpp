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
#ifdef SEGOPS_CUDA_EMULATION
    const bool on_device = t->is_cpu();
#else
    const bool on_device = t->is_cuda();
#endif
    TORCH_CHECK(on_device, "segops.", op, " (cuda): ", name, " must be a CUDA tensor, got ",
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

// ===== end semantic_difference_conv2d =====


// ===== qco (qco_forward/backward, texture_reconstruct_forward/backward) =====

// ===== end qco =====
