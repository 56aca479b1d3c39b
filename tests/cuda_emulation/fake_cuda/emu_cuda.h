// A host emulation of the CUDA subset the kernels in csrc/cuda use, so their index arithmetic,
// tiling, masking and synchronisation logic can be tested on a CPU (tests/test_cuda_emulation.py).
//
// Execution model: blocks run one after another; the threads of a block are fibers on one OS
// thread (emu_runtime.cpp), switched only at barriers: __syncthreads over the block, warp
// operations (__shfl_*_sync, __syncwarp, WMMA) over the 32 lanes of a warp. A barrier that can
// never complete (a divergent __syncthreads) is reported as a launch failure, not a hang. __shared__ variables become statics (one block at a time
// uses them); dynamic shared memory is a per-launch buffer (tests/cuda_emulation/build.py rewrites
// `extern __shared__` declarations and `<<<...>>>` launches). fp16 is _Float16, bf16 is rounded to
// nearest-even from fp32. WMMA fragments hold the whole 16x16 tile in every lane (the layout of
// fragment elements across lanes is unspecified in CUDA, so correct code cannot depend on it).
// What this cannot show: timing, real memory-model races, the GPU's exp/rsqrt accuracy.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __constant__ static
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 800
#endif
#define SEGOPS_CUDA_EMULATION 1

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
// The running fiber's indices: the scheduler sets them before it resumes a thread.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

typedef struct emu_stream* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97, cudaDevAttrMultiProcessorCount = 16 };
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated CUDA error (see stderr)";
}
namespace emu {
inline cudaError_t last_error = cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::last_error; }
template <typename F> cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 227 * 1024 : 132;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4 };
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t bytes, cudaMemcpyKind, cudaStream_t = nullptr) {
  std::memmove(d, s, bytes);
  return cudaSuccess;
}

namespace emu {
constexpr int kWarp = 32;
constexpr size_t kMaxDynamicShared = 227 * 1024;

// Implemented in emu_runtime.cpp: fibers (one per CUDA thread) on one OS thread, switched only
// at barriers, so a block's threads interleave exactly at __syncthreads / warp operations.
void run_block(int nthreads, void (*body)(void*), void* ctx);  // runs body once per thread
void block_barrier();
void warp_barrier();
int tid();
inline unsigned char* dyn_smem = nullptr;
inline std::vector<unsigned char> dyn_smem_buffer;
inline unsigned char exchange[1024][16];  // shuffle slots, one per thread

inline int nthreads() { return static_cast<int>(blockDim.x * blockDim.y * blockDim.z); }
inline int lane() { return tid() % kWarp; }

struct Cfg {
  dim3 grid, block;
  size_t shared;
  Cfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), shared(s) {}
};

template <typename F> void launch(const Cfg& c, F&& kernel) {
  const long long nt = 1LL * c.block.x * c.block.y * c.block.z;
  if (nt <= 0 || nt > 1024 || c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 ||
      c.grid.y > 65535 || c.grid.z > 65535 || c.block.z > 64 || c.shared > kMaxDynamicShared) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  blockDim = c.block;
  gridDim = c.grid;
  dyn_smem_buffer.assign(c.shared + 16, 0xCD);  // garbage-filled, like real shared memory
  dyn_smem = dyn_smem_buffer.data() + (16 - reinterpret_cast<uintptr_t>(dyn_smem_buffer.data()) % 16) % 16;
  auto body = [](void* k) { (*static_cast<std::remove_reference_t<F>*>(k))(); };
  for (unsigned bz = 0; bz < c.grid.z; ++bz)
    for (unsigned by = 0; by < c.grid.y; ++by)
      for (unsigned bx = 0; bx < c.grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        run_block(static_cast<int>(nt), body, &kernel);
        if (last_error != cudaSuccess) return;
      }
}

template <typename V> V shuffle(V v, int src_lane) {
  static_assert(sizeof(V) <= 16, "shuffle of a type wider than 16 bytes");
  const int t = tid();
  std::memcpy(exchange[t], &v, sizeof(V));
  warp_barrier();
  const int warp0 = t - lane();
  const int width = std::min(kWarp, nthreads() - warp0);
  V r = v;
  if (src_lane >= 0 && src_lane < width) std::memcpy(&r, exchange[warp0 + src_lane], sizeof(V));
  warp_barrier();
  return r;
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }
inline void __threadfence() {}
inline void __threadfence_block() {}
template <typename V> V __shfl_sync(unsigned, V v, int src, int width = 32) {
  return emu::shuffle(v, (emu::lane() / width) * width + src % width);
}
template <typename V> V __shfl_xor_sync(unsigned, V v, int mask, int width = 32) {
  const int l = emu::lane();
  const int s = l ^ mask;
  return emu::shuffle(v, (s / width == l / width) ? s : l);
}
template <typename V> V __shfl_down_sync(unsigned, V v, unsigned d, int width = 32) {
  const int l = emu::lane();
  const int s = l + static_cast<int>(d);
  return emu::shuffle(v, (s / width == l / width) ? s : l);
}
template <typename V> V __shfl_up_sync(unsigned, V v, unsigned d, int width = 32) {
  const int l = emu::lane();
  const int s = l - static_cast<int>(d);
  return emu::shuffle(v, (s >= 0 && s / width == l / width) ? s : l);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= (emu::shuffle(pred ? 1 : 0, i) ? 1u : 0u) << i;
  return r;
}
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
inline int __all_sync(unsigned m, int pred) {
  const int width = std::min(32, emu::nthreads() - (emu::tid() - emu::lane()));
  const unsigned full = width == 32 ? 0xffffffffu : ((1u << width) - 1);
  return (__ballot_sync(m, pred) & full) == full;
}

// Atomics: fibers switch only at barriers, so a plain read-modify-write is atomic here.
template <typename T> T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T> T atomicMax(T* p, T v) { T old = *p; if (old < v) *p = v; return old; }
template <typename T> T atomicMin(T* p, T v) { T old = *p; if (v < old) *p = v; return old; }
template <typename T> T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <typename T> T __ldg(const T* p) { return *p; }

// Math: the device intrinsics as their libm counterparts.
using std::abs; using std::ceil; using std::exp; using std::exp2; using std::expm1; using std::floor;
using std::fma; using std::log; using std::log1p; using std::log2; using std::max; using std::min;
using std::pow; using std::round; using std::sqrt; using std::tanh; using std::isinf; using std::isnan;
using std::isfinite;
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __saturatef(float a) { return std::min(1.0f, std::max(0.0f, a)); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
// Explicitly rounded (never contracted) arithmetic: built with -ffp-contract=off, plain is exact.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __drcp_rn(double a) { return 1.0 / a; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
#define CUDART_INF_F std::numeric_limits<float>::infinity()
#define CUDART_INF std::numeric_limits<double>::infinity()

// fp16 and bf16 storage types.
struct __half {
  _Float16 h;
  __half() = default;
  __half(float f) : h(static_cast<_Float16>(f)) {}
  __half(double f) : h(static_cast<_Float16>(f)) {}
  __half(int f) : h(static_cast<_Float16>(f)) {}
  operator float() const { return static_cast<float>(h); }
};
inline float __half2float(__half v) { return static_cast<float>(v.h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __double2half(double f) { return __half(f); }

struct __nv_bfloat16 {
  uint16_t b;
  static uint16_t round(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : b(round(f)) {}
  __nv_bfloat16(double f) : b(round(static_cast<float>(f))) {}
  __nv_bfloat16(int f) : b(round(static_cast<float>(f))) {}
  operator float() const {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef __nv_bfloat16 nv_bfloat16;
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double f) { return __nv_bfloat16(f); }

// WMMA: every lane holds the whole tile; operations act on it identically in every lane.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision { struct tf32 {}; }

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  using storage_t = std::conditional_t<std::is_same_v<T, precision::tf32>, float, T>;
  storage_t x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
  __syncwarp();
}

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  constexpr bool col = std::is_same_v<L, col_major>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = col ? p[static_cast<size_t>(c) * ldm + r] : p[static_cast<size_t>(r) * ldm + c];
  __syncwarp();
}

template <int M, int N, int K, typename T, typename P>
void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const P* p, unsigned ldm, layout_t l) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.x[r * N + c] = l == mem_col_major ? p[static_cast<size_t>(c) * ldm + r] : p[static_cast<size_t>(r) * ldm + c];
  __syncwarp();
}

template <int M, int N, int K, typename T, typename P>
void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t l) {
  __syncwarp();
  if (emu::lane() == 0) {
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < N; ++c) {
        P& dst = l == mem_col_major ? p[static_cast<size_t>(c) * ldm + r] : p[static_cast<size_t>(r) * ldm + c];
        dst = static_cast<P>(f.x[r * N + c]);
      }
  }
  __syncwarp();
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TC, void>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC, void>& c) {
  TC out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = static_cast<float>(c.x[i * N + j]);
      for (int k = 0; k < K; ++k)
        acc += static_cast<float>(a.x[i * K + k]) * static_cast<float>(b.x[k * N + j]);
      out[i * N + j] = static_cast<TC>(acc);
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
  __syncwarp();
}
}  // namespace wmma
}  // namespace nvcuda
