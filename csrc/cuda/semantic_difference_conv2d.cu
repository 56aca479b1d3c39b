// Semantic difference convolution (SDN), CUDA kernels — SPEC 2.4. Torch-free: the binding
// (semantic_difference_conv2d.cpp) allocates tensors and workspace and calls the launchers below.
//
//   Y[n,o,p] = b[o] + sum_{c,t} w[o,c,t] * D[n,c,t,p],   D = S(c,p,t) * (U[c,p+d_t] - U[c,p])
//
// with U, V zero outside the image. The same algorithm as csrc/cpu/semantic_difference_conv2d.cpp
// and segops/triton/semantic_difference_conv2d.py, never materialising the k^2-unfolded U or V:
//
// forward   an implicit GEMM Y[o, p] = W[o, K] D[K, p] over K = Cin*k^2 (index c*k^2 + t, the
//           weight's own layout): each K-step builds its D tile from U (and V / S) in shared
//           memory. "gaussian" first writes S (N, k^2, HW) in the accumulation type to the
//           workspace (one scalar per pixel and tap, summed over all Cg channels).
// backward  (deterministic: no atomics anywhere)
//           - grad_bias: one block per output channel, fixed-order block reduction.
//           - grad_weight: dW[o, K] = sum_{n,p} dY[n,o,p] D[n,K,p], split-K over pixel blocks into
//             accumulation-type partials in the workspace, summed in split order by a second kernel.
//           - grad_input (+ charbonnier grad_guidance, + gaussian dL/dS partials) by gathering:
//             for pixel q and tap t, dD(c,t,q) and dD(c,t,q-d_t) are two small GEMMs over Cout
//             (W[t]^T dY at q and at the shifted pixel), then dU[q] = sum_t S(q-d_t) dD(q-d_t)
//             - S(q) dD(q); charbonnier's dV follows from the same two terms.
//           - gaussian grad_guidance: dL/dS(t,p) = sum_c dD (U[c,p+d]-U[c,p]) (per channel-block
//             partials, summed in order), then one gather pass over V.
// fp32/fp64 use SIMT shared-memory tiles with accumulation-type FMAs. fp16/bf16 run the three
// GEMM-shaped kernels (forward, grad_weight partials, grad_input tap products) on tensor cores
// through WMMA (16x16x16, fp32 accumulator fragments; D is rounded to the storage type before the
// MMA, as the reference does); everything elementwise stays in fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "segops/cuda/device_utils.cuh"
#include "segops/cuda/semantic_difference_conv2d.h"
#include "segops/cuda/tile_dot.cuh"

namespace segops {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // every tiled kernel: 256 threads (8 warps)

// fp16/bf16 use the WMMA kernels (forward, grad_weight, grad_input); build with
// -DSEGOPS_SDC_NO_WMMA to run them through the SIMT kernels instead (debugging).
#ifdef SEGOPS_SDC_NO_WMMA
template <typename T> constexpr bool use_wmma() { return false; }
#else
template <typename T> constexpr bool use_wmma() { return sizeof(T) == 2; }
#endif

// Geometry in 32-bit where the launcher guarantees it fits (HW, Cin*k^2, ... < 2^31); plane
// offsets are formed in int64 by the kernels.
struct Geo {
  int64_t N;
  int Cin, Cg, Cout, H, W, HW, k, KK, K, half, dil;
  __device__ __forceinline__ int dy(int t) const { return (t / k - half) * dil; }
  __device__ __forceinline__ int dx(int t) const { return (t % k - half) * dil; }
  __device__ __forceinline__ bool inside(int y, int x) const { return y >= 0 && y < H && x >= 0 && x < W; }
};

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
// (1 + e^2 / sigma^2)^(-1/2), computed as 1 / sqrt like the CPU kernels.
__device__ __forceinline__ float charbonnier(float e, float inv_s2) { return 1.0f / sqrtf(1.0f + e * e * inv_s2); }
__device__ __forceinline__ double charbonnier(double e, double inv_s2) { return 1.0 / sqrt(1.0 + e * e * inv_s2); }

// Loads U[base + idx] when `ok`, else 0 (the zero padding), as the accumulation type.
template <typename A, typename T>
__device__ __forceinline__ A load_or_zero(const T* __restrict__ ptr, int64_t idx, bool ok) {
  return ok ? to_acc<A>(ptr[idx]) : A(0);
}

// D[n, c, t, p] = S * (U[c, p+d_t] - U[c, p]) for pixel p = (y, x) inside the image.
template <typename T, int SIM>
__device__ __forceinline__ acc_t<T> weighted_diff(const T* __restrict__ U, const T* __restrict__ V,
                                                  const acc_t<T>* __restrict__ S, const Geo& g,
                                                  int64_t n, int c, int t, int p, int y, int x,
                                                  acc_t<T> inv_s2) {
  using A = acc_t<T>;
  const int yy = y + g.dy(t), xx = x + g.dx(t);
  const bool in = g.inside(yy, xx);
  const int64_t base = (n * g.Cin + c) * g.HW;
  const int64_t q = in ? base + static_cast<int64_t>(yy) * g.W + xx : base;
  const A u = to_acc<A>(U[base + p]);
  A d = load_or_zero<A>(U, q, in) - u;
  if (SIM == kSdcCharbonnier) {  // Cg == Cin: V has U's layout
    const A e = load_or_zero<A>(V, q, in) - to_acc<A>(V[base + p]);
    d *= charbonnier(e, inv_s2);
  } else if (SIM == kSdcGaussian) {
    d *= S[(n * g.KK + t) * g.HW + p];
  }
  return d;
}

// ---- gaussian similarity -----------------------------------------------------------------------

// S[n, t, p] = exp(scale * sum_c (V[c, p+d_t] - V[c, p])^2), scale = -1 / (2 sigma^2 Cg).
// One thread per (n, t, p), grid-stride; loops over the Cg channels (coalesced over p).
template <typename T>
__global__ void __launch_bounds__(kThreads) gaussian_similarity_kernel(
    const T* __restrict__ V, acc_t<T>* __restrict__ S, Geo g, acc_t<T> scale) {
  using A = acc_t<T>;
  const int64_t total = g.N * g.KK * g.HW;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int p = static_cast<int>(i % g.HW);
    const int64_t nt = i / g.HW;
    const int t = static_cast<int>(nt % g.KK);
    const int64_t n = nt / g.KK;
    const int y = p / g.W, x = p % g.W;
    const int yy = y + g.dy(t), xx = x + g.dx(t);
    const bool in = g.inside(yy, xx);
    const int q = in ? yy * g.W + xx : 0;
    A acc = A(0);
    for (int c = 0; c < g.Cg; ++c) {
      const T* v = V + (n * g.Cg + c) * g.HW;
      const A e = load_or_zero<A>(v, q, in) - to_acc<A>(v[p]);
      acc += e * e;
    }
    S[i] = acc_exp(acc * scale);
  }
}

// ---- forward (SIMT) ----------------------------------------------------------------------------

// Block: output tile of 64 pixels x 64 output channels of image n; K-steps of 16.
// Thread (tx, ty) = (tid % 16, tid / 16) owns o = o0 + ty + 16 i, p = p0 + tx + 16 j (i, j < 4).
// D-tile builder: column tid % 64 (a fixed pixel), rows tid / 64 + 4 i.
constexpr int kFwdBP = 64, kFwdBO = 64, kFwdBK = 16;

template <typename T, int SIM>
__global__ void __launch_bounds__(kThreads) forward_simt_kernel(
    const T* __restrict__ U, const T* __restrict__ V, const acc_t<T>* __restrict__ S,
    const T* __restrict__ Wt, const T* __restrict__ B, T* __restrict__ Y, Geo g, acc_t<T> inv_s2,
    int tiles_per_image) {
  using A = acc_t<T>;
  constexpr int BP = kFwdBP, BO = kFwdBO, BK = kFwdBK;
  __shared__ A Ds[BK][BP];
  __shared__ A Ws[BK][BO + 1];
  const int tid = threadIdx.x;
  const int64_t n = blockIdx.x / tiles_per_image;
  const int p0 = static_cast<int>(blockIdx.x % tiles_per_image) * BP;
  const int o0 = blockIdx.y * BO;

  const int bj = tid % BP, br = tid / BP;  // builder: pixel column, first row (0..3)
  const int bp = p0 + bj;
  const bool bpin = bp < g.HW;
  const int by = bpin ? bp / g.W : 0, bx = bpin ? bp % g.W : 0;
  const int tx = tid % 16, ty = tid / 16;

  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);

  for (int k0 = 0; k0 < g.K; k0 += BK) {
#pragma unroll
    for (int i = 0; i < BK / 4; ++i) {
      const int r = br + 4 * i, kidx = k0 + r;
      A d = A(0);
      if (bpin && kidx < g.K) {
        const int c = kidx / g.KK, t = kidx - c * g.KK;
        d = weighted_diff<T, SIM>(U, V, S, g, n, c, t, bp, by, bx, inv_s2);
      }
      Ds[r][bj] = d;
    }
#pragma unroll
    for (int i = 0; i < BK * BO / kThreads; ++i) {
      const int idx = tid + kThreads * i;
      const int kk = idx % BK, oo = idx / BK;
      const int o = o0 + oo, kidx = k0 + kk;
      Ws[kk][oo] = (o < g.Cout && kidx < g.K) ? to_acc<A>(Wt[static_cast<int64_t>(o) * g.K + kidx]) : A(0);
    }
    __syncthreads();
    accumulate_outer<BK, BK>(acc, Strided<A>{&Ws[0][0], BO + 1, 1}, ty, Strided<A>{&Ds[0][0], BP, 1},
                             tx);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int o = o0 + ty + 16 * i;
    if (o >= g.Cout) continue;
    const A bo = B != nullptr ? to_acc<A>(B[o]) : A(0);
    T* y = Y + (n * g.Cout + o) * g.HW;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int p = p0 + tx + 16 * j;
      if (p < g.HW) y[p] = from_acc<T>(acc[i][j] + bo);
    }
  }
}

// ---- forward (WMMA, fp16/bf16) -----------------------------------------------------------------

// Block: 64 pixels x 64 output channels, K-steps of 32 (two 16-deep MMAs). The D tile is built in
// fp32 and rounded to the storage type in shared memory (the reference rounds D the same way),
// the weight tile copied as is. Warp w owns the 16 x 32 output sub-tile (pixels 16 (w % 4) ..,
// channels 32 (w / 4) ..): two 16x16 fp32 accumulator fragments. Epilogue through shared fp32.
constexpr int kMmaBP = 64, kMmaBO = 64, kMmaBK = 32;
constexpr int kMmaLd = 64 + 8;   // half-typed tile row stride (multiple of 8 elements)
constexpr int kMmaLdC = 64 + 4;  // fp32 staging row stride (multiple of 4 elements)

template <typename T> struct MmaType;
template <> struct MmaType<__half> { using type = __half; };
template <> struct MmaType<__nv_bfloat16> { using type = __nv_bfloat16; };

template <typename T, int SIM>
__global__ void __launch_bounds__(kThreads) forward_wmma_kernel(
    const T* __restrict__ U, const T* __restrict__ V, const float* __restrict__ S,
    const T* __restrict__ Wt, const T* __restrict__ B, T* __restrict__ Y, Geo g, float inv_s2,
    int tiles_per_image) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int BP = kMmaBP, BO = kMmaBO, BK = kMmaBK;
  // A operand: D^T (pixel x K) stored K-major, Ds[k][p] -> col_major with ld kMmaLd.
  // B operand: W^T (K x channel), Ws[k][o] -> row_major with ld kMmaLd.
  __shared__ __align__(32) T Ds[BK * kMmaLd];
  __shared__ __align__(32) T Ws[BK * kMmaLd];
  __shared__ __align__(32) float Cs[BO * kMmaLdC];  // Cs[o][p] (col_major store of C[p][o])
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t n = blockIdx.x / tiles_per_image;
  const int p0 = static_cast<int>(blockIdx.x % tiles_per_image) * BP;
  const int o0 = blockIdx.y * BO;

  const int bj = tid % BP, br = tid / BP;  // builder: pixel column, rows br + 4 i (i < 8)
  const int bp = p0 + bj;
  const bool bpin = bp < g.HW;
  const int by = bpin ? bp / g.W : 0, bx = bpin ? bp % g.W : 0;

  const int wp = (warp % 4) * 16;  // warp's pixel offset in the tile
  const int wo = (warp / 4) * 32;  // warp's channel offset in the tile
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);

  for (int k0 = 0; k0 < g.K; k0 += BK) {
#pragma unroll
    for (int i = 0; i < BK / 4; ++i) {
      const int r = br + 4 * i, kidx = k0 + r;
      float d = 0.0f;
      if (bpin && kidx < g.K) {
        const int c = kidx / g.KK, t = kidx - c * g.KK;
        d = weighted_diff<T, SIM>(U, V, S, g, n, c, t, bp, by, bx, inv_s2);
      }
      Ds[r * kMmaLd + bj] = from_acc<T>(d);
    }
#pragma unroll
    for (int i = 0; i < BK * BO / kThreads; ++i) {
      const int idx = tid + kThreads * i;
      const int kk = idx % BK, oo = idx / BK;
      const int o = o0 + oo, kidx = k0 + kk;
      Ws[kk * kMmaLd + oo] = (o < g.Cout && kidx < g.K) ? Wt[static_cast<int64_t>(o) * g.K + kidx]
                                                        : from_acc<T>(0.0f);
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, typename MmaType<T>::type, wmma::col_major> a;
      wmma::load_matrix_sync(a, Ds + ks * kMmaLd + wp, kMmaLd);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, typename MmaType<T>::type, wmma::row_major> b;
        wmma::load_matrix_sync(b, Ws + ks * kMmaLd + wo + 16 * f, kMmaLd);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
    __syncthreads();
  }
  // C[p][o] at Cs[o * kMmaLdC + p] (col_major); then 64 x 64 outputs, 16 per thread.
#pragma unroll
  for (int f = 0; f < 2; ++f)
    wmma::store_matrix_sync(Cs + (wo + 16 * f) * kMmaLdC + wp, acc[f], kMmaLdC, wmma::mem_col_major);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < BP * BO / kThreads; ++i) {
    const int idx = tid + kThreads * i;
    const int pp = idx % BP, oo = idx / BP;
    const int o = o0 + oo, p = p0 + pp;
    if (o < g.Cout && p < g.HW) {
      const float bo = B != nullptr ? to_acc<float>(B[o]) : 0.0f;
      Y[(n * g.Cout + o) * g.HW + p] = from_acc<T>(Cs[oo * kMmaLdC + pp] + bo);
    }
  }
#endif
}

// ---- backward ----------------------------------------------------------------------------------

// grad_bias[o] = sum_{n,p} dY[n,o,p]: one block per o, fixed-order reduction.
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_bias_kernel(const T* __restrict__ G, T* __restrict__ dB, Geo g) {
  using A = acc_t<T>;
  __shared__ A part[kThreads / 32];
  const int o = blockIdx.x;
  A acc = A(0);
  for (int64_t n = 0; n < g.N; ++n) {
    const T* gp = G + (n * g.Cout + o) * g.HW;
    for (int p = threadIdx.x; p < g.HW; p += kThreads) acc += to_acc<A>(gp[p]);
  }
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    A s = A(0);
    for (int w = 0; w < kThreads / 32; ++w) s += part[w];
    dB[o] = from_acc<T>(s);
  }
}

// Wtap[(t * Cout + o) * Cin + c] = weight[(o * Cin + c) * KK + t] (grid-stride over the weight).
template <typename T>
__global__ void __launch_bounds__(kThreads) tap_major_kernel(const T* __restrict__ Wt, T* __restrict__ Wtap, Geo g) {
  const int64_t total = static_cast<int64_t>(g.Cout) * g.K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int t = static_cast<int>(i % g.KK);
    const int64_t oc = i / g.KK;  // o * Cin + c
    const int c = static_cast<int>(oc % g.Cin);
    const int64_t o = oc / g.Cin;
    Wtap[(t * static_cast<int64_t>(g.Cout) + o) * g.Cin + c] = Wt[i];
  }
}

// grad_weight partials: block = (64 output channels) x (64 K-columns) tile and one split, i.e. a
// contiguous range of 16-pixel blocks (a pixel block never spans two images). Thread (tx, ty) owns
// o = o0 + ty + 16 i, K = k0 + tx + 16 j (i, j < 4); loader: pixel tid % 16, rows tid / 16 + 16 i.
// part[(split * Cout + o) * K + kidx] = this split's sum (accumulation type).
constexpr int kDwBO = 64, kDwBK = 64, kDwBP = 16;

template <typename T, int SIM>
__global__ void __launch_bounds__(kThreads) grad_weight_partial_kernel(
    const T* __restrict__ G, const T* __restrict__ U, const T* __restrict__ V,
    const acc_t<T>* __restrict__ S, acc_t<T>* __restrict__ part, Geo g, acc_t<T> inv_s2,
    int tiles_o, int tiles_k, int64_t blocks_per_image, int64_t blocks_per_split, int64_t nblocks) {
  using A = acc_t<T>;
  constexpr int BO = kDwBO, BKK = kDwBK, BP = kDwBP;
  __shared__ A Gs[BP][BO + 1];
  __shared__ A Ds[BP][BKK + 1];
  const int tid = threadIdx.x;
  const int tiles = tiles_o * tiles_k;
  const int tile = static_cast<int>(blockIdx.x % tiles);
  const int64_t split = blockIdx.x / tiles;
  const int o0 = (tile % tiles_o) * BO, k0 = (tile / tiles_o) * BKK;
  const int tx = tid % 16, ty = tid / 16;
  const int lp = tid % BP, lr = tid / BP;  // loader: pixel, first row (0..15)

  // The 4 K-columns this thread builds: (c, t) fixed for the whole loop.
  int lc[4], lt[4];
  bool lk[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int kidx = k0 + lr + 16 * i;
    lk[i] = kidx < g.K;
    lc[i] = lk[i] ? kidx / g.KK : 0;
    lt[i] = lk[i] ? kidx - lc[i] * g.KK : 0;
  }

  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);

  const int64_t b0 = split * blocks_per_split;
  const int64_t b1 = b0 + blocks_per_split < nblocks ? b0 + blocks_per_split : nblocks;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n = b / blocks_per_image;
    const int p = static_cast<int>(b % blocks_per_image) * BP + lp;
    const bool pin = p < g.HW;
    const int y = pin ? p / g.W : 0, x = pin ? p % g.W : 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int o = o0 + lr + 16 * i;
      Gs[lp][lr + 16 * i] = (pin && o < g.Cout) ? to_acc<A>(G[(n * g.Cout + o) * g.HW + p]) : A(0);
      Ds[lp][lr + 16 * i] = (pin && lk[i]) ? weighted_diff<T, SIM>(U, V, S, g, n, lc[i], lt[i], p, y, x, inv_s2) : A(0);
    }
    __syncthreads();
    accumulate_outer<BP, BP>(acc, Strided<A>{&Gs[0][0], BO + 1, 1}, ty,
                             Strided<A>{&Ds[0][0], BKK + 1, 1}, tx);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int o = o0 + ty + 16 * i;
    if (o >= g.Cout) continue;
    A* dst = part + (split * g.Cout + o) * g.K;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int kidx = k0 + tx + 16 * j;
      if (kidx < g.K) dst[kidx] = acc[i][j];
    }
  }
}

// WMMA variant (fp16/bf16) of the grad_weight partials: the same tiles and splits, pixel blocks of
// 32 (two 16-deep MMAs per block). A = dY (channel x pixel) from Gs[p][o] (col_major, ld 72),
// B = D^T (pixel x K) from Ds[p][k] (row_major, ld 72), D rounded to the storage type (the
// reference rounds D the same way). Warp w owns channels 16 (w % 4) .., K-columns 32 (w / 4) ..:
// two fp32 accumulator fragments, staged through Cs[o][k] (ld 68) for the store.
// Loaders: pixel tid % 32, rows tid / 32 + 8 i (i < 8). Shared: 2 x 32 x 72 x 2 + 64 x 68 x 4 = 26624 B.
constexpr int kDwMmaBP = 32;

template <typename T, int SIM>
__global__ void __launch_bounds__(kThreads) grad_weight_partial_wmma_kernel(
    const T* __restrict__ G, const T* __restrict__ U, const T* __restrict__ V,
    const float* __restrict__ S, float* __restrict__ part, Geo g, float inv_s2,
    int tiles_o, int tiles_k, int64_t blocks_per_image, int64_t blocks_per_split, int64_t nblocks) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int BO = kDwBO, BKK = kDwBK, BP = kDwMmaBP;
  __shared__ __align__(32) T Gs[BP * kMmaLd];
  __shared__ __align__(32) T Ds[BP * kMmaLd];
  __shared__ __align__(32) float Cs[BO * kMmaLdC];
  const int tid = threadIdx.x, warp = tid / 32;
  const int tiles = tiles_o * tiles_k;
  const int tile = static_cast<int>(blockIdx.x % tiles);
  const int64_t split = blockIdx.x / tiles;
  const int o0 = (tile % tiles_o) * BO, k0 = (tile / tiles_o) * BKK;
  const int lp = tid % BP, lr = tid / BP;  // loader: pixel, first row (0..7)
  const int fo = (warp % 4) * 16, fk = (warp / 4) * 32;
  const T zero = from_acc<T>(0.0f);

  int lc[8], lt[8];
  bool lk[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int kidx = k0 + lr + 8 * i;
    lk[i] = kidx < g.K;
    lc[i] = lk[i] ? kidx / g.KK : 0;
    lt[i] = lk[i] ? kidx - lc[i] * g.KK : 0;
  }
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);

  const int64_t b0 = split * blocks_per_split;
  const int64_t b1 = b0 + blocks_per_split < nblocks ? b0 + blocks_per_split : nblocks;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n = b / blocks_per_image;
    const int p = static_cast<int>(b % blocks_per_image) * BP + lp;
    const bool pin = p < g.HW;
    const int y = pin ? p / g.W : 0, x = pin ? p % g.W : 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = lr + 8 * i, o = o0 + r;
      Gs[lp * kMmaLd + r] = (pin && o < g.Cout) ? G[(n * g.Cout + o) * g.HW + p] : zero;
      Ds[lp * kMmaLd + r] = (pin && lk[i])
          ? from_acc<T>(weighted_diff<T, SIM>(U, V, S, g, n, lc[i], lt[i], p, y, x, inv_s2)) : zero;
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < BP; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
      wmma::load_matrix_sync(a, Gs + ks * kMmaLd + fo, kMmaLd);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, Ds + ks * kMmaLd + fk + 16 * f, kMmaLd);
        wmma::mma_sync(acc[f], a, bf, acc[f]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < 2; ++f)
    wmma::store_matrix_sync(Cs + fo * kMmaLdC + fk + 16 * f, acc[f], kMmaLdC, wmma::mem_row_major);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < BO * BKK / kThreads; ++i) {
    const int idx = tid + kThreads * i;
    const int kk = idx % BKK, oo = idx / BKK;
    const int o = o0 + oo, kidx = k0 + kk;
    if (o < g.Cout && kidx < g.K) part[(split * g.Cout + o) * g.K + kidx] = Cs[oo * kMmaLdC + kk];
  }
#endif
}

// grad_weight[i] = sum_{s < splits} part[s][i], in split order (deterministic).
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_weight_reduce_kernel(
    const acc_t<T>* __restrict__ part, T* __restrict__ dW, int64_t numel, int64_t splits) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A s = A(0);
    for (int64_t k = 0; k < splits; ++k) s += part[k * numel + i];
    dW[i] = from_acc<T>(s);
  }
}

// grad_input by gathering. Block: 64 pixels x 32 input channels of image n (channel block
// blockIdx.y). Thread (tp, tc) = (tid % 16, tid / 16) owns q = p0 + tp + 16 i (i < 4),
// c = c0 + tc + 16 j (j < 2). Per tap t, over chunks of output channels (tap products below):
//   aq[q][c] = sum_o W[o,c,t] dY[o,q]       (dD at q)
//   ar[q][c] = sum_o W[o,c,t] dY[o,q-d_t]   (dD at the pixel whose tap t reads q; 0 outside)
// Gaussian: GS[((cb * N + n) * KK + t) * HW + q] = sum_{c in block} aq (U[c,q+d] - U[c,q]).
constexpr int kDuBP = 64, kDuBC = 32;

// SIMT tap products: output-channel chunks of 16. Loaders: dY at pixel tid % 64, rows
// tid / 64 + 4 i (i < 4); W at channel tid % 32, rows tid / 32 + 8 i (i < 2), from the
// tap-major copy Wtap[t][o][c]. Shared: 2 x 16 x 64 + 16 x 32 accumulation-type elements.
template <typename T>
__device__ __forceinline__ void tap_products_simt(const T* __restrict__ gbase, const T* __restrict__ Wtap,
                                                  const Geo& g, int t, int p0, int c0, int lq, bool lqin,
                                                  int lr, bool lrin, acc_t<T> (&aq)[4][2], acc_t<T> (&ar)[4][2]) {
  using A = acc_t<T>;
  constexpr int BP = kDuBP, BC = kDuBC, BO = 16;
  __shared__ A Gq[BO][BP];
  __shared__ A Gr[BO][BP];
  __shared__ A Ws[BO][BC];
  const int tid = threadIdx.x;
  const int lp = tid % BP, lo = tid / BP;  // dY loader (lq = p0 + lp)
  const int wc = tid % BC, wo = tid / BC;  // weight loader
  const int tp = tid % 16, tc = tid / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) aq[i][j] = ar[i][j] = A(0);
  for (int o0 = 0; o0 < g.Cout; o0 += BO) {
#pragma unroll
    for (int i = 0; i < BO * BP / kThreads; ++i) {
      const int r = lo + 4 * i, o = o0 + r;
      const T* go = gbase + static_cast<int64_t>(o < g.Cout ? o : 0) * g.HW;
      Gq[r][lp] = load_or_zero<A>(go, lq, lqin && o < g.Cout);
      Gr[r][lp] = load_or_zero<A>(go, lr, lrin && o < g.Cout);
    }
#pragma unroll
    for (int i = 0; i < BO * BC / kThreads; ++i) {
      const int r = wo + 8 * i, o = o0 + r, c = c0 + wc;
      Ws[r][wc] = (o < g.Cout && c < g.Cin)
                      ? to_acc<A>(Wtap[(static_cast<int64_t>(t) * g.Cout + o) * g.Cin + c]) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int oo = 0; oo < BO; ++oo) {
      A a[4], b[4], w[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = Gq[oo][tp + 16 * i];
        b[i] = Gr[oo][tp + 16 * i];
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) w[j] = Ws[oo][tc + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          aq[i][j] += a[i] * w[j];
          ar[i][j] += b[i] * w[j];
        }
    }
    __syncthreads();
  }
}

// WMMA tap products (fp16/bf16): output-channel chunks of 32 (two 16-deep MMAs). Gq/Gr[o][p]
// (A = dY^T, pixel x channel, col_major, ld 72), Ws[o][c] (B, row_major, ld 40). Warp w owns the
// 16 x 16 sub-tile pixels 16 (w % 4) .., channels 16 (w / 4) ..: one aq and one ar fragment,
// staged through shared fp32 Aq/Ar[p][c] (ld 36) and read back by the owning threads.
// Loaders: dY at pixel tid % 64, rows tid / 64 + 4 i (i < 8); W at channel tid % 32, rows
// tid / 32 + 8 i (i < 4). Shared: 2 x 32 x 72 + 32 x 40 storage + 2 x 64 x 36 fp32 = 30720 B.
constexpr int kDuMmaBO = 32, kDuLdP = 64 + 8, kDuLdC = 32 + 8, kDuLdF = 32 + 4;

template <typename T>
__device__ __forceinline__ void tap_products_wmma(const T* __restrict__ gbase, const T* __restrict__ Wtap,
                                                  const Geo& g, int t, int p0, int c0, int lq, bool lqin,
                                                  int lr, bool lrin, float (&aq)[4][2], float (&ar)[4][2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int BP = kDuBP, BC = kDuBC, BO = kDuMmaBO;
  __shared__ __align__(32) T Gq[BO * kDuLdP];
  __shared__ __align__(32) T Gr[BO * kDuLdP];
  __shared__ __align__(32) T Ws[BO * kDuLdC];
  __shared__ __align__(32) float Aq[BP * kDuLdF];
  __shared__ __align__(32) float Ar[BP * kDuLdF];
  const int tid = threadIdx.x, warp = tid / 32;
  const int lp = tid % BP, lo = tid / BP;
  const int wc = tid % BC, wo = tid / BC;
  const int tp = tid % 16, tc = tid / 16;
  const int fp = (warp % 4) * 16, fc = (warp / 4) * 16;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> cq, cr;
  wmma::fill_fragment(cq, 0.0f);
  wmma::fill_fragment(cr, 0.0f);
  const T zero = from_acc<T>(0.0f);
  for (int o0 = 0; o0 < g.Cout; o0 += BO) {
#pragma unroll
    for (int i = 0; i < BO * BP / kThreads; ++i) {
      const int r = lo + 4 * i, o = o0 + r;
      const T* go = gbase + static_cast<int64_t>(o < g.Cout ? o : 0) * g.HW;
      Gq[r * kDuLdP + lp] = (lqin && o < g.Cout) ? go[lq] : zero;
      Gr[r * kDuLdP + lp] = (lrin && o < g.Cout) ? go[lr] : zero;
    }
#pragma unroll
    for (int i = 0; i < BO * BC / kThreads; ++i) {
      const int r = wo + 8 * i, o = o0 + r, c = c0 + wc;
      Ws[r * kDuLdC + wc] = (o < g.Cout && c < g.Cin)
                                ? Wtap[(static_cast<int64_t>(t) * g.Cout + o) * g.Cin + c] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < BO; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
      wmma::load_matrix_sync(b, Ws + ks * kDuLdC + fc, kDuLdC);
      wmma::load_matrix_sync(a, Gq + ks * kDuLdP + fp, kDuLdP);
      wmma::mma_sync(cq, a, b, cq);
      wmma::load_matrix_sync(a, Gr + ks * kDuLdP + fp, kDuLdP);
      wmma::mma_sync(cr, a, b, cr);
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(Aq + fp * kDuLdF + fc, cq, kDuLdF, wmma::mem_row_major);
  wmma::store_matrix_sync(Ar + fp * kDuLdF + fc, cr, kDuLdF, wmma::mem_row_major);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      aq[i][j] = Aq[(tp + 16 * i) * kDuLdF + tc + 16 * j];
      ar[i][j] = Ar[(tp + 16 * i) * kDuLdF + tc + 16 * j];
    }
  // The next call's stores to Aq/Ar come after its first __syncthreads: no hazard with these reads.
#endif
}

template <typename T, int SIM, bool MMA>
__global__ void __launch_bounds__(kThreads) grad_input_kernel(
    const T* __restrict__ G, const T* __restrict__ U, const T* __restrict__ V,
    const acc_t<T>* __restrict__ S, const T* __restrict__ Wtap, T* __restrict__ dU,
    T* __restrict__ dV, acc_t<T>* __restrict__ GS, Geo g, acc_t<T> inv_s2, int tiles_per_image) {
  using A = acc_t<T>;
  constexpr int BP = kDuBP, BC = kDuBC;
  __shared__ A red[16][BP];  // gaussian: per-tc partial sums of dL/dS
  const int tid = threadIdx.x;
  const int64_t n = blockIdx.x / tiles_per_image;
  const int p0 = static_cast<int>(blockIdx.x % tiles_per_image) * BP;
  const int cb = blockIdx.y, c0 = cb * BC;
  const int tp = tid % 16, tc = tid / 16;

  const int lq = p0 + tid % BP;  // the dY loaders' pixel (both product variants)
  const bool lqin = lq < g.HW;
  const int ly = lqin ? lq / g.W : 0, lx = lqin ? lq % g.W : 0;
  const T* gbase = G + n * g.Cout * g.HW;

  int qy[4], qx[4], qq[4];
  bool qin[4], cin[2];
  int cc[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    qq[i] = p0 + tp + 16 * i;
    qin[i] = qq[i] < g.HW;
    qy[i] = qin[i] ? qq[i] / g.W : 0;
    qx[i] = qin[i] ? qq[i] % g.W : 0;
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    cc[j] = c0 + tc + 16 * j;
    cin[j] = cc[j] < g.Cin;
  }
  A uq[4][2], vq[4][2], du[4][2], dv[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const bool ok = qin[i] && cin[j];
      const int64_t off = (n * g.Cin + (cin[j] ? cc[j] : 0)) * g.HW + qq[i];
      uq[i][j] = load_or_zero<A>(U, off, ok);
      vq[i][j] = SIM == kSdcCharbonnier ? load_or_zero<A>(V, off, ok) : A(0);
      du[i][j] = A(0);
      dv[i][j] = A(0);
    }

  for (int t = 0; t < g.KK; ++t) {
    const int dy = g.dy(t), dx = g.dx(t);
    const int lyr = ly - dy, lxr = lx - dx;
    const bool lrin = lqin && g.inside(lyr, lxr);
    const int lr = lrin ? lyr * g.W + lxr : 0;
    A aq[4][2], ar[4][2];
    if constexpr (MMA) {
      tap_products_wmma<T>(gbase, Wtap, g, t, p0, c0, lq, lqin, lr, lrin, aq, ar);
    } else {
      tap_products_simt<T>(gbase, Wtap, g, t, p0, c0, lq, lqin, lr, lrin, aq, ar);
    }
    // Tap epilogue: p = q + d (the neighbour tap t of q reads), r = q - d (the pixel whose tap t reads q).
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int yp = qy[i] + dy, xp = qx[i] + dx, yr = qy[i] - dy, xr = qx[i] - dx;
      const bool inp = qin[i] && g.inside(yp, xp), inr = qin[i] && g.inside(yr, xr);
      const int qp = inp ? yp * g.W + xp : 0, qr = inr ? yr * g.W + xr : 0;
      A gsum = A(0);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (!(qin[i] && cin[j])) continue;
        const int64_t base = (n * g.Cin + cc[j]) * g.HW;
        if (SIM == kSdcNone) {
          du[i][j] += ar[i][j] - aq[i][j];
        } else if (SIM == kSdcCharbonnier) {
          const A up = load_or_zero<A>(U, base + qp, inp);
          A e = load_or_zero<A>(V, base + qp, inp) - vq[i][j];
          A s = charbonnier(e, inv_s2);
          du[i][j] -= aq[i][j] * s;
          dv[i][j] += aq[i][j] * (up - uq[i][j]) * s * s * s * e * inv_s2;
          if (inr) {
            const A ur = to_acc<A>(U[base + qr]);
            e = vq[i][j] - to_acc<A>(V[base + qr]);
            s = charbonnier(e, inv_s2);
            du[i][j] += ar[i][j] * s;
            dv[i][j] -= ar[i][j] * (uq[i][j] - ur) * s * s * s * e * inv_s2;
          }
        } else {  // gaussian
          const A* st = S + (n * g.KK + t) * g.HW;
          const A sr = inr ? st[qr] : A(0);
          du[i][j] += ar[i][j] * sr - aq[i][j] * st[qq[i]];
          gsum += aq[i][j] * (load_or_zero<A>(U, base + qp, inp) - uq[i][j]);
        }
      }
      if (SIM == kSdcGaussian) red[tc][tp + 16 * i] = gsum;
    }
    if (SIM == kSdcGaussian) {
      __syncthreads();
      if (tid < BP) {
        const int q = p0 + tid;
        if (q < g.HW) {
          A s = A(0);
#pragma unroll
          for (int r = 0; r < 16; ++r) s += red[r][tid];
          GS[((cb * g.N + n) * g.KK + t) * g.HW + q] = s;
        }
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (!(qin[i] && cin[j])) continue;
      const int64_t off = (n * g.Cin + cc[j]) * g.HW + qq[i];
      dU[off] = from_acc<T>(du[i][j]);
      if (SIM == kSdcCharbonnier) dV[off] = from_acc<T>(dv[i][j]);
    }
}

// Gaussian: GS[0][n,t,p] <- coef * S[n,t,p] * sum_{cb < ncb} GS[cb][n,t,p] (in place, in cb order).
template <typename A>
__global__ void __launch_bounds__(kThreads) gaussian_gs_reduce_kernel(A* __restrict__ GS, const A* __restrict__ S,
                                                                       int64_t numel, int ncb, A coef) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A s = A(0);
    for (int cb = 0; cb < ncb; ++cb) s += GS[cb * numel + i];
    GS[i] = coef * S[i] * s;
  }
}

// Gaussian grad_guidance by gathering, one thread per (n, c, q):
// dV[c,q] = sum_t SG(t,q) (V[c,q+d]-V[c,q]) - [q-d inside] SG(t,q-d) (V[c,q]-V[c,q-d]).
template <typename T>
__global__ void __launch_bounds__(kThreads) gaussian_grad_guidance_kernel(
    const T* __restrict__ V, const acc_t<T>* __restrict__ SG, T* __restrict__ dV, Geo g) {
  using A = acc_t<T>;
  const int64_t total = g.N * g.Cg * g.HW;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int q = static_cast<int>(i % g.HW);
    const int64_t nc = i / g.HW;
    const int64_t n = nc / g.Cg;
    const T* v = V + nc * g.HW;
    const int y = q / g.W, x = q % g.W;
    const A vq = to_acc<A>(v[q]);
    A acc = A(0);
    for (int t = 0; t < g.KK; ++t) {
      const int dy = g.dy(t), dx = g.dx(t);
      const A* sg = SG + (n * g.KK + t) * g.HW;
      const int yp = y + dy, xp = x + dx, yr = y - dy, xr = x - dx;
      const bool inp = g.inside(yp, xp);
      acc += sg[q] * (load_or_zero<A>(v, inp ? yp * g.W + xp : 0, inp) - vq);
      if (g.inside(yr, xr)) {
        const int qr = yr * g.W + xr;
        acc -= sg[qr] * (vq - to_acc<A>(v[qr]));
      }
    }
    dV[i] = from_acc<T>(acc);
  }
}

// ---- launch helpers ----------------------------------------------------------------------------

constexpr int64_t kMaxInt = 0x7fffffff;  // the kernels index with int

inline unsigned int elementwise_blocks(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(b, int64_t(1) << 20)));
}

// Validates the geometry and fills the kernels' Geo; false when unsupported.
bool make_geo(const SdcShape& s, Geo* g) {
  if (s.N < 0 || s.Cin < 0 || s.Cg < 0 || s.Cout < 0 || s.H < 0 || s.W < 0) return false;
  if (s.k < 1 || s.k % 2 == 0 || s.k > 4095 || s.dilation < 1) return false;
  if (s.similarity != kSdcNone && s.similarity != kSdcCharbonnier && s.similarity != kSdcGaussian) return false;
  if (s.similarity == kSdcCharbonnier && s.Cg != s.Cin) return false;
  if (!(s.sigma > 0.0)) return false;
  const int64_t half = (s.k - 1) / 2, KK = s.k * s.k;
  if (s.H * s.W > kMaxInt || s.Cin * KK > kMaxInt || s.Cout > kMaxInt || s.Cg > kMaxInt) return false;
  // y + dy must not overflow int (H < 2^31 already): |dy| <= half * dilation < 2^30.
  if (s.dilation > (int64_t(1) << 30) / std::max<int64_t>(1, half)) return false;
  if (s.H > (int64_t(1) << 30) || s.W > (int64_t(1) << 30)) return false;
  g->N = s.N;
  g->Cin = static_cast<int>(s.Cin);
  g->Cg = static_cast<int>(s.Cg);
  g->Cout = static_cast<int>(s.Cout);
  g->H = static_cast<int>(s.H);
  g->W = static_cast<int>(s.W);
  g->HW = static_cast<int>(s.H * s.W);
  g->k = static_cast<int>(s.k);
  g->KK = static_cast<int>(KK);
  g->K = static_cast<int>(s.Cin * KK);
  g->half = static_cast<int>(half);
  g->dil = static_cast<int>(s.dilation);
  return true;
}

inline bool empty_problem(const Geo& g) {
  return g.N == 0 || g.HW == 0 || g.Cout == 0 || g.Cin == 0;
}

// Grid of the backward and its workspace slices (cut by carve_backward).
struct BwdLayout {
  void* S = nullptr;     // gaussian S (N, KK, HW), accumulation type
  void* GS = nullptr;    // gaussian dL/dS partials (ncb, N, KK, HW), accumulation type
  void* Wtap = nullptr;  // tap-major weight (KK, Cout, Cin), storage type
  void* part = nullptr;  // grad_weight partials (splits, Cout, K), accumulation type
  int tiles_o = 0, tiles_k = 0, ncb = 0;
  int64_t blocks_per_image = 0, nblocks = 0, blocks_per_split = 0, splits = 0;
};

BwdLayout carve_backward(const Geo& g, const SdcShape& s, WorkspaceCarver& ws) {
  BwdLayout l;
#ifdef SEGOPS_SDC_NO_WMMA
  const int dw_bp = kDwBP;
#else
  const int dw_bp = dtype_size(s.dtype) == 2 ? kDwMmaBP : kDwBP;  // must match the kernel launched
#endif
  const int64_t A = static_cast<int64_t>(acc_size(s.dtype));
  const int64_t nkh = g.N * g.KK * g.HW;
  l.ncb = (g.Cin + kDuBC - 1) / kDuBC;
  l.tiles_o = (g.Cout + kDwBO - 1) / kDwBO;
  l.tiles_k = (g.K + kDwBK - 1) / kDwBK;
  l.blocks_per_image = (g.HW + dw_bp - 1) / dw_bp;
  l.nblocks = g.N * l.blocks_per_image;
  // Splits: about 512 blocks in all (fixed, so results do not depend on the GPU), each split at
  // least 8 pixel blocks, then rounded so that no split is empty.
  const int64_t tiles = static_cast<int64_t>(l.tiles_o) * l.tiles_k;
  int64_t splits = std::max<int64_t>(1, 512 / std::max<int64_t>(1, tiles));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, l.nblocks / 8));
  l.blocks_per_split = std::max<int64_t>(1, (l.nblocks + splits - 1) / splits);
  l.splits = std::max<int64_t>(1, (l.nblocks + l.blocks_per_split - 1) / l.blocks_per_split);
  if (s.similarity == kSdcGaussian) {
    l.S = ws.take_bytes(static_cast<size_t>(nkh * A));
    l.GS = ws.take_bytes(static_cast<size_t>(l.ncb * nkh * A));
  }
  l.Wtap = ws.take_bytes(static_cast<size_t>(g.Cout) * g.K * dtype_size(s.dtype));
  l.part = ws.take_bytes(static_cast<size_t>(l.splits * g.Cout * static_cast<int64_t>(g.K) * A));
  return l;
}

// -1 / (2 sigma^2 Cg); 0 when Cg == 0 (S = 1 instead of exp(0 * -inf) = NaN).
template <typename A>
A gaussian_scale(double sigma, int Cg) {
  return Cg > 0 ? static_cast<A>(-1.0 / (2.0 * sigma * sigma * static_cast<double>(Cg))) : A(0);
}

template <typename T, int SIM>
cudaError_t launch_forward_sim(const SdcForwardParams& p, const Geo& g, cudaStream_t stream) {
  using A = acc_t<T>;
  const A inv_s2 = static_cast<A>(1.0 / (p.shape.sigma * p.shape.sigma));
  A* S = static_cast<A*>(p.workspace);
  static_assert(kMmaBP == kFwdBP && kMmaBO == kFwdBO, "one forward grid for both kernels");
  const int tiles_per_image = (g.HW + kFwdBP - 1) / kFwdBP;  // kMmaBP == kFwdBP
  const int64_t gx = g.N * tiles_per_image;
  const int64_t gy = (g.Cout + kFwdBO - 1) / kFwdBO;            // kMmaBO == kFwdBO
  if (gx > kMaxGridX || gy > kMaxGridYZ) return cudaErrorInvalidValue;
  if (SIM == kSdcGaussian) {
    const A scale = gaussian_scale<A>(p.shape.sigma, g.Cg);
    gaussian_similarity_kernel<T><<<elementwise_blocks(g.N * g.KK * g.HW), kThreads, 0, stream>>>(
        static_cast<const T*>(p.guidance), S, g, scale);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned int>(gx), static_cast<unsigned int>(gy));
  const T* U = static_cast<const T*>(p.input);
  const T* V = static_cast<const T*>(p.guidance);
  const T* Wt = static_cast<const T*>(p.weight);
  const T* B = static_cast<const T*>(p.bias);
  T* Y = static_cast<T*>(p.out);
  if constexpr (use_wmma<T>()) {
    forward_wmma_kernel<T, SIM><<<grid, kThreads, 0, stream>>>(U, V, S, Wt, B, Y, g, inv_s2, tiles_per_image);
  } else {
    forward_simt_kernel<T, SIM><<<grid, kThreads, 0, stream>>>(U, V, S, Wt, B, Y, g, inv_s2, tiles_per_image);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_forward(const SdcForwardParams& p, const Geo& g, cudaStream_t stream) {
  switch (p.shape.similarity) {
    case kSdcNone: return launch_forward_sim<T, kSdcNone>(p, g, stream);
    case kSdcCharbonnier: return launch_forward_sim<T, kSdcCharbonnier>(p, g, stream);
    case kSdcGaussian: return launch_forward_sim<T, kSdcGaussian>(p, g, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, int SIM>
cudaError_t launch_backward_sim(const SdcBackwardParams& p, const Geo& g, cudaStream_t stream) {
  using A = acc_t<T>;
  WorkspaceCarver ws{p.workspace};
  const BwdLayout l = carve_backward(g, p.shape, ws);
  A* S = static_cast<A*>(l.S);
  A* GS = static_cast<A*>(l.GS);
  T* Wtap = static_cast<T*>(l.Wtap);
  A* part = static_cast<A*>(l.part);
  const T* G = static_cast<const T*>(p.grad_out);
  const T* U = static_cast<const T*>(p.input);
  const T* V = static_cast<const T*>(p.guidance);
  const T* Wt = static_cast<const T*>(p.weight);
  T* dU = static_cast<T*>(p.grad_input);
  T* dV = static_cast<T*>(p.grad_guidance);
  T* dW = static_cast<T*>(p.grad_weight);
  T* dB = static_cast<T*>(p.grad_bias);
  const A inv_s2 = static_cast<A>(1.0 / (p.shape.sigma * p.shape.sigma));

  const int tiles_per_image = (g.HW + kDuBP - 1) / kDuBP;
  const int64_t du_gx = g.N * tiles_per_image;
  const int64_t dw_gx = static_cast<int64_t>(l.tiles_o) * l.tiles_k * l.splits;
  if (du_gx > kMaxGridX || l.ncb > kMaxGridYZ || dw_gx > kMaxGridX || g.Cout > kMaxGridX) {
    return cudaErrorInvalidValue;
  }

  cudaError_t err;
#define SDC_CHECK()                              \
  do {                                           \
    err = cudaGetLastError();                    \
    if (err != cudaSuccess) return err;          \
  } while (0)
  if (SIM == kSdcGaussian) {
    const A scale = gaussian_scale<A>(p.shape.sigma, g.Cg);
    gaussian_similarity_kernel<T><<<elementwise_blocks(g.N * g.KK * g.HW), kThreads, 0, stream>>>(V, S, g, scale);
    SDC_CHECK();
  }
  grad_bias_kernel<T><<<static_cast<unsigned int>(g.Cout), kThreads, 0, stream>>>(G, dB, g);
  SDC_CHECK();
  tap_major_kernel<T><<<elementwise_blocks(static_cast<int64_t>(g.Cout) * g.K), kThreads, 0, stream>>>(Wt, Wtap, g);
  SDC_CHECK();
  if constexpr (use_wmma<T>()) {
    grad_weight_partial_wmma_kernel<T, SIM><<<static_cast<unsigned int>(dw_gx), kThreads, 0, stream>>>(
        G, U, V, S, part, g, inv_s2, l.tiles_o, l.tiles_k, l.blocks_per_image, l.blocks_per_split, l.nblocks);
  } else {
    grad_weight_partial_kernel<T, SIM><<<static_cast<unsigned int>(dw_gx), kThreads, 0, stream>>>(
        G, U, V, S, part, g, inv_s2, l.tiles_o, l.tiles_k, l.blocks_per_image, l.blocks_per_split, l.nblocks);
  }
  SDC_CHECK();
  const int64_t wnumel = static_cast<int64_t>(g.Cout) * g.K;
  grad_weight_reduce_kernel<T><<<elementwise_blocks(wnumel), kThreads, 0, stream>>>(part, dW, wnumel, l.splits);
  SDC_CHECK();
  grad_input_kernel<T, SIM, use_wmma<T>()><<<dim3(static_cast<unsigned int>(du_gx), static_cast<unsigned int>(l.ncb)), kThreads, 0, stream>>>(
      G, U, V, S, Wtap, dU, dV, GS, g, inv_s2, tiles_per_image);
  SDC_CHECK();
  if (SIM == kSdcGaussian) {
    const int64_t nkh = g.N * g.KK * g.HW;
    const A coef = -gaussian_scale<A>(p.shape.sigma, g.Cg) * A(2);
    gaussian_gs_reduce_kernel<A><<<elementwise_blocks(nkh), kThreads, 0, stream>>>(GS, S, nkh, l.ncb, coef);
    SDC_CHECK();
    if (g.Cg > 0) {
      gaussian_grad_guidance_kernel<T><<<elementwise_blocks(g.N * g.Cg * g.HW), kThreads, 0, stream>>>(V, GS, dV, g);
      SDC_CHECK();
    }
  } else if (SIM == kSdcNone) {
    const size_t bytes = static_cast<size_t>(g.N * g.Cg * g.HW) * sizeof(T);
    if (bytes > 0) {
      err = cudaMemsetAsync(dV, 0, bytes, stream);
      if (err != cudaSuccess) return err;
    }
  }
#undef SDC_CHECK
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_backward(const SdcBackwardParams& p, const Geo& g, cudaStream_t stream) {
  switch (p.shape.similarity) {
    case kSdcNone: return launch_backward_sim<T, kSdcNone>(p, g, stream);
    case kSdcCharbonnier: return launch_backward_sim<T, kSdcCharbonnier>(p, g, stream);
    case kSdcGaussian: return launch_backward_sim<T, kSdcGaussian>(p, g, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

size_t semantic_difference_conv2d_forward_workspace_bytes(const SdcForwardParams& p) {
  Geo g;
  if (!make_geo(p.shape, &g) || p.shape.similarity != kSdcGaussian) return 0;
  return static_cast<size_t>(g.N * g.KK * g.HW) * acc_size(p.shape.dtype);
}

size_t semantic_difference_conv2d_backward_workspace_bytes(const SdcBackwardParams& p) {
  Geo g;
  if (!make_geo(p.shape, &g)) return 0;
  WorkspaceCarver ws;
  carve_backward(g, p.shape, ws);
  return ws.used;
}

cudaError_t semantic_difference_conv2d_forward(const SdcForwardParams& p, cudaStream_t stream) {
  Geo g;
  if (!make_geo(p.shape, &g)) return cudaErrorInvalidValue;
  if (g.N == 0 || g.HW == 0 || g.Cout == 0) return cudaSuccess;  // nothing to write
  if (p.shape.similarity == kSdcGaussian && p.workspace == nullptr) return cudaErrorInvalidValue;
  SEGOPS_CUDA_DISPATCH(p.shape.dtype, return launch_forward<scalar_t>(p, g, stream));
  return cudaErrorInvalidValue;
}

cudaError_t semantic_difference_conv2d_backward(const SdcBackwardParams& p, cudaStream_t stream) {
  Geo g;
  if (!make_geo(p.shape, &g)) return cudaErrorInvalidValue;
  if (empty_problem(g)) return cudaSuccess;  // the caller fills the (zero) gradients
  if (p.workspace == nullptr) return cudaErrorInvalidValue;
  SEGOPS_CUDA_DISPATCH(p.shape.dtype, return launch_backward<scalar_t>(p, g, stream));
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace segops
