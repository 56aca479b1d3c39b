// CPU emulation of the CUDA subset used by the SDC kernels: blocks run one after another, each
// with blockDim real threads and a std::barrier for __syncthreads; __shared__ = static.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
#include <cstdio>
#include <cstdlib>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef void* cudaStream_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }

inline thread_local uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emu_bar = nullptr;
inline void __syncthreads() { emu_bar->arrive_and_wait(); }

template <class A> A __shfl_xor_sync(unsigned, A v, int o) {
  static A buf[1024];
  const unsigned t = threadIdx.x;
  buf[t] = v;
  __syncthreads();
  A r = buf[t ^ o];
  __syncthreads();
  return r;
}

using std::exp; using std::sqrt; using std::max; using std::min;

namespace emu {
inline long long blocks_run = 0;
template <class F> void launch(dim3 grid, dim3 block, F f) {
  gridDim = grid; blockDim = block;
  const unsigned nt = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx.x = bx; blockIdx.y = by; blockIdx.z = bz;
        std::barrier<> bar(nt);
        emu_bar = &bar;
        std::vector<std::thread> ts;
        ts.reserve(nt);
        for (unsigned t = 0; t < nt; ++t)
          ts.emplace_back([&, t] { threadIdx.x = t; threadIdx.y = 0; threadIdx.z = 0; f(); });
        for (auto& th : ts) th.join();
        ++blocks_run;
      }
}
}  // namespace emu
