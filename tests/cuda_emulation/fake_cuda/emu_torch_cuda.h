// CPU stand-ins for the c10::cuda pieces the CUDA bindings use (segops/cuda/binding.h), for the emulation build
// (tests/cuda_emulation/build.py compiles the bindings with SEGOPS_CUDA_EMULATION).
#pragma once
#include <c10/core/Device.h>

#include "emu_cuda.h"

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct EmuStream {
  cudaStream_t stream() const { return nullptr; }
};
inline EmuStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10
