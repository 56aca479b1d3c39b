// Device-side helpers shared by the CUDA kernels: the accumulation type, conversions between the
// storage types and it, the accumulation math, warp reductions and the DType -> C++ type
// dispatch. CUDA headers only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "segops/cuda/common.h"

namespace segops::cuda {

// fp64 inputs accumulate in fp64, everything else in fp32.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

template <typename A, typename T> __device__ __forceinline__ A to_acc(T v) { return static_cast<A>(v); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// Accumulation math, one policy for every kernel: accurate exp / log (not __expf), and products
// summed with an explicit fma (never left to contraction), so that a value a backward kernel
// recomputes equals the forward's bit for bit (fma(x, y, s) == fma(y, x, s)).
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double acc_fma(double a, double b, double c) { return fma(a, b, c); }
template <typename A> __device__ __forceinline__ A neg_inf() { return -static_cast<A>(INFINITY); }

// Sum / max over aligned groups of kLanes lanes (32: the warp; 16: each half-warp); every lane of
// the warp must take part.
template <int kLanes = 32, typename A> __device__ __forceinline__ A warp_sum(A v) {
  static_assert(kLanes >= 1 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "kLanes: power of 2");
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int kLanes = 32, typename A> __device__ __forceinline__ A warp_max(A v) {
  static_assert(kLanes >= 1 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "kLanes: power of 2");
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace segops::cuda

// Runs the statement with `scalar_t` bound to the C++ type of `dtype` (float, double, __half,
// __nv_bfloat16); an unknown dtype returns cudaErrorInvalidValue from the enclosing launcher.
#define SEGOPS_CUDA_DISPATCH(dtype, ...)                                                  \
  switch (dtype) {                                                                        \
    case ::segops::cuda::DType::kFloat32: { using scalar_t = float; __VA_ARGS__; break; }  \
    case ::segops::cuda::DType::kFloat64: { using scalar_t = double; __VA_ARGS__; break; } \
    case ::segops::cuda::DType::kFloat16: { using scalar_t = __half; __VA_ARGS__; break; } \
    case ::segops::cuda::DType::kBFloat16: {                                              \
      using scalar_t = __nv_bfloat16;                                                     \
      __VA_ARGS__;                                                                        \
      break;                                                                              \
    }                                                                                     \
    default: return cudaErrorInvalidValue;                                                \
  }
