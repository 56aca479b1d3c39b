// Disentangled non-local attention (docs/operators.md §2.3), CUDA kernels. Same algorithm, saved statistics
// and output dtypes as csrc/cpu/disentangled_non_local.cpp and segops/triton/disentangled_non_local.py.
//
// Inputs are flattened and contiguous: query (N, Ck, Lq), key (N, Ck, Lk), value (N, Cv, Lk),
// unary (N, Lk) or none; s = scale / temperature. Every operand is channel-major, so every tile
// is read from (C, L) storage coalesced along positions.
//
// Forward (flash-attention style, nothing of size Lq x Lk ever reaches global memory):
//   channel means of query and key when whitening (one block per (n, c) row, saved to scratch);
//   with unary: lse_u (one block per sample) and g = sum_j softmax(u)_j v_j (one block per (n, c));
//   the attention kernel: one block per (sample, 64 queries, chunk of 16*VPT value channels)
//   loops over blocks of 64 keys: S = s q~^T k~ (registers, Ck in chunks of 16 through shared
//   memory), online softmax (running max / sum per query row), acc = acc * alpha + P V^T.
//   It writes out = acc / l + g and (first channel chunk only) lse = m + log(l).
// Backward (recomputes P from lse; deterministic, no atomics):
//   D_i = dout_i . (out_i - g) (one thread per query), dg = sum_i dout_i (with unary);
//   dV kernel: per (sample, 64 keys, value-channel chunk): dv_j = sum_i P_ij dout_i (+ w_j dg);
//   dK kernel: per (sample, 64 keys, key-channel chunk): dS = P (dP - D), dk_j = s sum_i dS_ij q~_i,
//     and (first chunk, whitening) the column sums sum_i dS_ij;
//   whitening: corr = (s / Lq) sum_j colsum_j k~_j = mean_i of dq~ (one block per (n, c));
//     the key side needs no correction: sum_j dS_ij = 0 makes mean_j dk~ vanish;
//   dQ kernel: per (sample, 64 queries, key-channel chunk): dq_i = s sum_j dS_ij k~_j - corr;
//   du_j = w_j (dg . v_j - dg . g) (one thread per key), w = softmax(u).
//
// The attention-tile kernels share two building blocks (256 threads; thread t owns rows
// ty + 16 r (r < 4) and columns tx + 16 k of each tile, ty = t / 16, tx = t % 16, so the 16
// threads of a half warp hold whole rows and row reductions are 16-lane shuffles):
//   score tile:      S (64 x 64) += X~^T Y~ over C channels (X~, Y~: (C, L) operands, optionally
//                    minus per-channel means), 16 channels per shared-memory stage (the
//                    staged_tile_dot of tile_dot.cuh with WhitenedLoader);
//   accumulate_tile: acc (64 x 16*VPT) += T Z~^T, T the 64 x 64 tile in shared memory (P or dS),
//                    Z~ a (C, L) operand (optionally whitened), 16 positions per stage.
// The products go through a tile-ops policy (SimtTiles / WmmaTiles below): fp32 and fp64 use
// SIMT FMA in the accumulation type; fp16 and bf16 use WMMA tensor cores (fp32 accumulators,
// operands and P / dS rounded to the storage type, as in the Triton kernels). Defining
// SEGOPS_DNL_NO_WMMA selects the SIMT policy for every dtype. Statistics are fp32 (fp64).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "segops/cuda/device_utils.cuh"
#include "segops/cuda/disentangled_non_local.h"
#include "segops/cuda/tile_dot.cuh"

namespace segops {
namespace cuda {
namespace {

constexpr int kThreads = kTileThreads;  // threads of every block
constexpr int kTile = 64;             // positions per attention tile (rows and columns)
constexpr int kKC = 16;               // channels per stage of the score tile
constexpr int kPLd = kTile + 1;       // leading dimension of the P / dS tile in shared memory
constexpr int kZC = 16;               // positions per stage of accumulate_tile
constexpr int kZLd = kZC + 1;         // leading dimension of the Z stage

static_assert(kThreads == 16 * 16, "thread layout is 16 x 16");
static_assert(kTile == 4 * 16, "each thread owns 4 rows and 4 columns of a tile");



// Sum over the block (kThreads threads); every thread gets the result. `red` holds 32 values.
template <typename A> __device__ __forceinline__ A block_sum(A v, A* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // `red` may still be read from a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  A r = lane < kThreads / 32 ? red[lane] : A(0);
  return warp_sum(r);
}
template <typename A> __device__ __forceinline__ A block_max(A v, A* red) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  A r = lane < kThreads / 32 ? red[lane] : neg_inf<A>();
  return warp_max(r);
}

// X~[d][start + e] for the score tiles: X~ = X - mu (per channel d, mu may be null) on the
// sample's (C, L) storage X, zero for positions >= L.
template <typename T, typename A>
struct WhitenedLoader {
  const T* __restrict__ X;
  const A* __restrict__ mu;
  int64_t L, start;
  __device__ __forceinline__ A operator()(int64_t d, int e) const {
    const int64_t a = start + e;
    return a < L ? to_acc<A>(X[d * L + a]) - (mu != nullptr ? mu[d] : A(0)) : A(0);
  }
};

// acc[r][k] += sum_{b < 64} Ps[(ty + 16 r) * kPLd + b] * Z~[c0 + tx + 16 k][b0 + b], where
// Z~ = Z - muZ (per channel, muZ may be null) is zero for channels >= C and positions >= LZ.
// Ps (the caller's P / dS tile) must be zero in columns b with b0 + b >= LZ. The caller writes
// Ps before the call without a barrier (the first stage's barrier orders it); the call ends with
// __syncthreads, so Ps may be overwritten afterwards. Zs: [16 * VPT][kZLd] shared stage.
template <int VPT, typename T, typename A>
__device__ __forceinline__ void accumulate_tile(A (&acc)[4][VPT], const A* Ps,
                                                const T* __restrict__ Z, const A* __restrict__ muZ,
                                                int64_t LZ, int64_t b0, int64_t C, int64_t c0,
                                                A* Zs) {
  constexpr int BV = 16 * VPT;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  for (int bc = 0; bc < kTile; bc += kZC) {
    if (b0 + bc >= LZ) break;  // uniform over the block
#pragma unroll
    for (int q = 0; q < BV * kZC / kThreads; ++q) {
      const int e = tid + q * kThreads;
      const int c = e / kZC, p = e % kZC;
      const int64_t cc = c0 + c, b = b0 + bc + p;
      A zv = A(0);
      if (cc < C && b < LZ) zv = to_acc<A>(Z[cc * LZ + b]) - (muZ != nullptr ? muZ[cc] : A(0));
      Zs[c * kZLd + p] = zv;
    }
    __syncthreads();
    accumulate_outer<kZC, kZC>(acc, Strided<A>{Ps + bc, 1, kPLd}, ty, Strided<A>{Zs, 1, kZLd},
                               tx);
    __syncthreads();
  }
}

extern __shared__ __align__(128) unsigned char dnl_smem[];

constexpr size_t round_up128(size_t b) { return (b + 127) / 128 * 128; }

// The attention-tile kernels reach their two products through a tile-ops policy, which also owns
// the shared-memory layout (bytes from the dynamic shared-memory base):
//   p_tile(smem):   the 64 x kPLd accumulation-type tile the kernel writes P / dS into;
//   score(...):     s[r][k] += S[ty + 16 r][tx + 16 k] (staged_tile_dot[_wmma], tile_dot.cuh);
//   accumulate(...): acc[r][k] += (T Z~^T)[ty + 16 r][tx + 16 k] (see accumulate_tile).
// Both end with __syncthreads. SimtTiles: fp32/fp64 FMA (every dtype when SEGOPS_DNL_NO_WMMA).
template <typename T, int VPT>
struct SimtTiles {
  using A = acc_t<T>;
  static constexpr size_t kP = 0;                                        // [kTile][kPLd] A
  static constexpr size_t kX = round_up128(kP + sizeof(A) * kTile * kPLd);  // [kKC][kTile] A
  static constexpr size_t kY = round_up128(kX + sizeof(A) * kKC * kTile);   // [kKC][kTile] A
  static constexpr size_t kZ = round_up128(kY + sizeof(A) * kKC * kTile);   // [16 VPT][kZLd] A
  static constexpr size_t kBytes = round_up128(kZ + sizeof(A) * 16 * VPT * kZLd);

  static __device__ __forceinline__ A* p_tile(unsigned char* sm) {
    return reinterpret_cast<A*>(sm + kP);
  }
  static __device__ __forceinline__ void score(A (&s)[4][4], const T* __restrict__ X,
                                               const A* __restrict__ muX, int64_t LX, int64_t a0,
                                               const T* __restrict__ Y, const A* __restrict__ muY,
                                               int64_t LY, int64_t b0, int64_t C,
                                               unsigned char* sm) {
    staged_tile_dot<4, kKC, kKC, Staging::kUnrolled>(s, C, WhitenedLoader<T, A>{X, muX, LX, a0},
                            WhitenedLoader<T, A>{Y, muY, LY, b0}, reinterpret_cast<A*>(sm + kX),
                            reinterpret_cast<A*>(sm + kY));
  }
  static __device__ __forceinline__ void accumulate(A (&acc)[4][VPT], const A* Ps,
                                                    const T* __restrict__ Z,
                                                    const A* __restrict__ muZ, int64_t LZ,
                                                    int64_t b0, int64_t C, int64_t c0,
                                                    unsigned char* sm) {
    accumulate_tile<VPT>(acc, Ps, Z, muZ, LZ, b0, C, c0, reinterpret_cast<A*>(sm + kZ));
  }
};

// WmmaTiles (fp16 / bf16): both products on tensor cores (nvcuda::wmma 16x16x16, fp32
// accumulator fragments); operands are staged in shared memory in the storage type (whitened
// values and P / dS rounded to it, as the Triton kernels do), the fp32 results go through shared
// memory back into the same per-thread ownership as the SIMT path, so the kernels are shared.
// 8 warps: score() gives warp w the 16 x 32 strip (rows 16 (w / 2), columns 32 (w % 2)) of the
// 64 x 64 tile; accumulate() gives it rows 16 (w % 4) and VPT / 2 column tiles of 16 starting at
// column tile (w / 4) VPT / 2 of the 64 x 16 VPT result. Fragment elements are never addressed
// individually (their layout is unspecified).
template <typename T, int VPT>
struct WmmaTiles {
  using A = float;
  static_assert(VPT % 2 == 0, "accumulate() splits 16 VPT columns over 2 warp columns");
  static constexpr int kHLd = kTile + 8;        // leading dim of the storage-type 64-wide tiles
  static constexpr int kSLd = kTile + 4;        // leading dim of the fp32 score result
  static constexpr int kFLd = 16 * VPT + 4;     // leading dim of the fp32 product result
  static constexpr int kFElems = kTile * (kSLd > kFLd ? kSLd : kFLd);
  static constexpr size_t kP = 0;                                           // [kTile][kPLd] f32
  static constexpr size_t kXh = round_up128(kP + sizeof(float) * kTile * kPLd);  // [kKC][kTile] T
  static constexpr size_t kYh = round_up128(kXh + sizeof(T) * kKC * kTile);       // [kKC][kTile] T
  static constexpr size_t kPh = round_up128(kYh + sizeof(T) * kKC * kTile);       // [kTile][kHLd] T
  static constexpr size_t kZh = round_up128(kPh + sizeof(T) * kTile * kHLd);      // [16VPT][kHLd] T
  static constexpr size_t kF = round_up128(kZh + sizeof(T) * 16 * VPT * kHLd);    // fp32 results
  static constexpr size_t kBytes = round_up128(kF + sizeof(float) * kFElems);

  static __device__ __forceinline__ float* p_tile(unsigned char* sm) {
    return reinterpret_cast<float*>(sm + kP);
  }

  static __device__ __forceinline__ void score(float (&s)[4][4], const T* __restrict__ X,
                                               const float* __restrict__ muX, int64_t LX,
                                               int64_t a0, const T* __restrict__ Y,
                                               const float* __restrict__ muY, int64_t LY,
                                               int64_t b0, int64_t C, unsigned char* sm) {
    staged_tile_dot_wmma<kKC, kSLd, Staging::kUnrolled>(s, C, WhitenedLoader<T, float>{X, muX, LX, a0},
                                    WhitenedLoader<T, float>{Y, muY, LY, b0},
                                    reinterpret_cast<T*>(sm + kXh), reinterpret_cast<T*>(sm + kYh),
                                    reinterpret_cast<float*>(sm + kF));
  }

  static __device__ __forceinline__ void accumulate(float (&acc)[4][VPT], const float* Ps,
                                                    const T* __restrict__ Z,
                                                    const float* __restrict__ muZ, int64_t LZ,
                                                    int64_t b0, int64_t C, int64_t c0,
                                                    unsigned char* sm) {
    namespace wmma = nvcuda::wmma;
    constexpr int BV = 16 * VPT;
    T* Ph = reinterpret_cast<T*>(sm + kPh);
    T* Zh = reinterpret_cast<T*>(sm + kZh);
    float* F = reinterpret_cast<float*>(sm + kF);
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4, warp = tid >> 5;
    // Stage T (the caller's fp32 tile, written by other threads just before the call: hence
    // the barrier) and Z~ in the storage type.
    __syncthreads();
#pragma unroll 4
    for (int q = 0; q < kTile * kTile / kThreads; ++q) {
      const int e = tid + q * kThreads;
      const int a = e / kTile, b = e % kTile;
      Ph[a * kHLd + b] = from_acc<T>(Ps[a * kPLd + b]);
    }
#pragma unroll 4
    for (int q = 0; q < BV * kTile / kThreads; ++q) {
      const int e = tid + q * kThreads;
      const int c = e / kTile, p = e % kTile;
      const int64_t cc = c0 + c, b = b0 + p;
      float zv = 0.0f;
      if (cc < C && b < LZ) zv = to_acc<float>(Z[cc * LZ + b]) - (muZ != nullptr ? muZ[cc] : 0.0f);
      Zh[c * kHLd + p] = from_acc<T>(zv);
    }
    __syncthreads();
    const int rt = warp & 3, ct0 = (warp >> 2) * (VPT / 2);
#pragma unroll
    for (int t = 0; t < VPT / 2; ++t) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
      wmma::fill_fragment(fc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < kTile / 16; ++kk) {
        // A = T (64 x 64): element (a, b) at Ph[a * kHLd + b], row-major.
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, Ph + rt * 16 * kHLd + kk * 16, kHLd);
        // B = Z~^T (64 x BV): element (b, c) at Zh[c * kHLd + b], column-major.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, Zh + (ct0 + t) * 16 * kHLd + kk * 16, kHLd);
        wmma::mma_sync(fc, fa, fb, fc);
      }
      wmma::store_matrix_sync(F + rt * 16 * kFLd + (ct0 + t) * 16, fc, kFLd, wmma::mem_row_major);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int k = 0; k < VPT; ++k) acc[r][k] += F[(ty + 16 * r) * kFLd + tx + 16 * k];
    __syncthreads();
  }
};

template <typename T, int VPT>
struct TileOps {
  using type = SimtTiles<T, VPT>;
};
#ifndef SEGOPS_DNL_NO_WMMA
template <int VPT>
struct TileOps<__half, VPT> {
  using type = WmmaTiles<__half, VPT>;
};
template <int VPT>
struct TileOps<__nv_bfloat16, VPT> {
  using type = WmmaTiles<__nv_bfloat16, VPT>;
};
#endif
template <typename T, int VPT>
using tile_ops_t = typename TileOps<T, VPT>::type;

// ---------------------------------------------------------------------------------------------
// Small kernels (row reductions and per-position loops).

// sum_{j < L} term(j) over the block (each j taken by one thread); every thread gets it.
template <typename A, typename Term>
__device__ __forceinline__ A block_sum_of(int64_t L, const Term& term) {
  __shared__ A red[32];
  A acc = A(0);
  for (int64_t j = threadIdx.x; j < L; j += kThreads) acc += term(j);
  return block_sum(acc, red);
}

// out[r] = sum (mean: the mean) of row r of a (rows, L) tensor; one block per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) row_sum_kernel(const T* __restrict__ x, int64_t L,
                                                           bool mean, acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * L;
  const A acc = block_sum_of<A>(L, [&](int64_t i) { return to_acc<A>(xr[i]); });
  if (threadIdx.x == 0) out[row] = !mean ? acc : L > 0 ? acc / static_cast<A>(L) : A(0);
}

// lse_u[n] = log sum_j exp(u[n, j]); one block per sample.
template <typename T>
__global__ void __launch_bounds__(kThreads) unary_lse_kernel(const T* __restrict__ u, int64_t Lk,
                                                             acc_t<T>* __restrict__ lse_u) {
  using A = acc_t<T>;
  __shared__ A red[32];
  const int64_t n = blockIdx.x;
  const T* un = u + n * Lk;
  A mx = neg_inf<A>();
  for (int64_t j = threadIdx.x; j < Lk; j += kThreads) mx = max(mx, to_acc<A>(un[j]));
  mx = block_max(mx, red);
  const A sum = block_sum_of<A>(Lk, [&](int64_t j) { return acc_exp(to_acc<A>(un[j]) - mx); });
  if (threadIdx.x == 0) lse_u[n] = mx + acc_log(sum);
}

// g[n, c] = sum_j exp(u[n, j] - lse_u[n]) v[n, c, j]; one block per (n, c) row.
template <typename T>
__global__ void __launch_bounds__(kThreads) unary_g_kernel(const T* __restrict__ u,
                                                           const T* __restrict__ v,
                                                           const acc_t<T>* __restrict__ lse_u,
                                                           int64_t Cv, int64_t Lk,
                                                           acc_t<T>* __restrict__ g) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x, n = row / Cv;
  const T* un = u + n * Lk;
  const T* vr = v + row * Lk;
  const A lu = lse_u[n];
  const A acc = block_sum_of<A>(
      Lk, [&](int64_t j) { return acc_exp(to_acc<A>(un[j]) - lu) * to_acc<A>(vr[j]); });
  if (threadIdx.x == 0) g[row] = acc;
}

// D[n, i] = sum_c dout[n, c, i] (out[n, c, i] - g[n, c]); one thread per (n, i).
template <typename T>
__global__ void __launch_bounds__(kThreads) delta_kernel(const T* __restrict__ go,
                                                         const T* __restrict__ out,
                                                         const acc_t<T>* __restrict__ g,
                                                         int64_t N, int64_t Cv, int64_t Lq,
                                                         acc_t<T>* __restrict__ D) {
  using A = acc_t<T>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= N * Lq) return;
  const int64_t n = idx / Lq, i = idx % Lq;
  const T* gon = go + n * Cv * Lq + i;
  const T* on = out + n * Cv * Lq + i;
  A acc = A(0);
  for (int64_t c = 0; c < Cv; ++c) {
    const A gc = g != nullptr ? g[n * Cv + c] : A(0);
    acc += to_acc<A>(gon[c * Lq]) * (to_acc<A>(on[c * Lq]) - gc);
  }
  D[idx] = acc;
}

// du[n, j] = w_j (sum_c dg[n, c] (v[n, c, j] - g[n, c])), w_j = exp(u[n, j] - lse_u[n]);
// one thread per (n, j).
template <typename T>
__global__ void __launch_bounds__(kThreads) unary_grad_kernel(
    const T* __restrict__ u, const T* __restrict__ v, const acc_t<T>* __restrict__ g,
    const acc_t<T>* __restrict__ lse_u, const acc_t<T>* __restrict__ dg, int64_t N, int64_t Cv,
    int64_t Lk, T* __restrict__ du) {
  using A = acc_t<T>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= N * Lk) return;
  const int64_t n = idx / Lk, j = idx % Lk;
  const T* vn = v + n * Cv * Lk + j;
  A t = A(0);
  for (int64_t c = 0; c < Cv; ++c) t += dg[n * Cv + c] * (to_acc<A>(vn[c * Lk]) - g[n * Cv + c]);
  const A w = acc_exp(to_acc<A>(u[idx]) - lse_u[n]);
  du[idx] = from_acc<T>(w * t);
}

// corr[n, c] = (s / Lq) sum_j colsum[n, j] (k[n, c, j] - mk[n, c]) = mean over queries of
// s * sum_j dS_ij k~_j (whitening's correction of dq); one block per (n, c) row.
template <typename T>
__global__ void __launch_bounds__(kThreads) dq_correction_kernel(
    const T* __restrict__ k, const acc_t<T>* __restrict__ mk,
    const acc_t<T>* __restrict__ colsum, int64_t Ck, int64_t Lq, int64_t Lk, acc_t<T> s,
    acc_t<T>* __restrict__ corr) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x, n = row / Ck;
  const T* kr = k + row * Lk;
  const A* cs = colsum + n * Lk;
  const A mu = mk[row];
  const A acc = block_sum_of<A>(Lk, [&](int64_t j) { return cs[j] * (to_acc<A>(kr[j]) - mu); });
  if (threadIdx.x == 0) corr[row] = acc * s / static_cast<A>(Lq > 0 ? Lq : 1);
}

// ---------------------------------------------------------------------------------------------
// Attention-tile kernels. Blocks are numbered n-major, then position block, then channel chunk
// (fastest), so the blocks sharing one position tile run together.

// What the attention-tile kernels read and write (device pointers, by value): operands are
// (N, C, L) tensors, means and per-channel terms (N, C), per-query statistics (N, Lq). Unused
// pointers are null.
template <typename T>
struct TileArgs {
  using A = acc_t<T>;
  const T *q, *k, *v, *go, *u;
  const A *mq, *mk, *g, *lse, *D, *dg, *lse_u, *corr;
  T* dst;         // out, grad_value, grad_key or grad_query
  A* lse_out;     // forward
  A* colsum;      // dK with whitening
  int64_t Ck, Cv, Lq, Lk;
  A s;
  int64_t nrb, ncb;  // position blocks (the kernel's rows) and channel chunks per sample
};

// Sample n's block: its views of the operands, its first row (query or key) and channel.
template <typename T>
struct TileBlock {
  using A = acc_t<T>;
  int64_t n, r0, c0;
  const T *q, *k, *v, *go;
  const A *mq, *mk, *lse, *D;

  template <int BC>
  __device__ __forceinline__ static TileBlock at(const TileArgs<T>& a) {
    const int64_t bid = blockIdx.x, n = bid / (a.ncb * a.nrb);
    const auto per = [n](auto* p, int64_t size) { return p != nullptr ? p + n * size : nullptr; };
    return {n, (bid / a.ncb) % a.nrb * kTile, bid % a.ncb * BC,
            per(a.q, a.Ck * a.Lq), per(a.k, a.Ck * a.Lk), per(a.v, a.Cv * a.Lk), per(a.go, a.Cv * a.Lq),
            per(a.mq, a.Ck), per(a.mk, a.Ck), per(a.lse, a.Lq), per(a.D, a.Lq)};
  }
};

template <typename A, int R, int C>
__device__ __forceinline__ void zero(A (&x)[R][C]) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) x[r][c] = A(0);
}

// Forward: block = (n, query block, value-channel chunk).
template <typename T, int VPT>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(TileArgs<T> a) {
  using A = acc_t<T>;
  using Tiles = tile_ops_t<T, VPT>;
  const TileBlock<T> b = TileBlock<T>::template at<16 * VPT>(a);
  A* Ps = Tiles::p_tile(dnl_smem);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

  A m[4], l[4], acc[4][VPT];
  zero(acc);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    m[r] = neg_inf<A>();
    l[r] = A(0);
  }
  for (int64_t j0 = 0; j0 < a.Lk; j0 += kTile) {
    A sc[4][4];
    zero(sc);
    Tiles::score(sc, b.q, b.mq, a.Lq, b.r0, b.k, b.mk, a.Lk, j0, a.Ck, dnl_smem);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      A mx = neg_inf<A>();
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t j = j0 + tx + 16 * c;
        sc[r][c] = j < a.Lk ? sc[r][c] * a.s : neg_inf<A>();
        mx = max(mx, sc[r][c]);
      }
      mx = warp_max<16>(mx);  // finite: key j0 < Lk is in this block
      const A mnew = max(m[r], mx);
      const A alpha = acc_exp(m[r] - mnew);  // exp(-inf) = 0 on the first block
      A sum = A(0);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const A p = acc_exp(sc[r][c] - mnew);  // 0 for masked keys
        sum += p;
        Ps[(ty + 16 * r) * kPLd + tx + 16 * c] = p;
      }
      sum = warp_sum<16>(sum);
      l[r] = l[r] * alpha + sum;
      m[r] = mnew;
#pragma unroll
      for (int c = 0; c < VPT; ++c) acc[r][c] *= alpha;
    }
    Tiles::accumulate(acc, Ps, b.v, static_cast<const A*>(nullptr), a.Lk, j0, a.Cv, b.c0, dnl_smem);
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t i = b.r0 + ty + 16 * r;
    if (i >= a.Lq) continue;
    const A inv = A(1) / l[r];
#pragma unroll
    for (int c = 0; c < VPT; ++c) {
      const int64_t cc = b.c0 + tx + 16 * c;
      if (cc < a.Cv) {
        const A gc = a.g != nullptr ? a.g[b.n * a.Cv + cc] : A(0);
        a.dst[(b.n * a.Cv + cc) * a.Lq + i] = from_acc<T>(acc[r][c] * inv + gc);
      }
    }
    if (b.c0 == 0 && tx == 0) a.lse_out[b.n * a.Lq + i] = m[r] + acc_log(l[r]);
  }
}

// dV: block = (n, key block, value-channel chunk); rows are keys, columns queries.
// dv[c, j] = sum_i P_ij dout[c, i] (+ w_j dg_c with unary).
template <typename T, int VPT>
__global__ void __launch_bounds__(kThreads) attention_dv_kernel(TileArgs<T> a) {
  using A = acc_t<T>;
  using Tiles = tile_ops_t<T, VPT>;
  const TileBlock<T> b = TileBlock<T>::template at<16 * VPT>(a);
  A* Ps = Tiles::p_tile(dnl_smem);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

  A acc[4][VPT];
  zero(acc);
  for (int64_t i0 = 0; i0 < a.Lq; i0 += kTile) {
    A st[4][4];
    zero(st);
    Tiles::score(st, b.k, b.mk, a.Lk, b.r0, b.q, b.mq, a.Lq, i0, a.Ck, dnl_smem);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t i = i0 + tx + 16 * c;
      const bool valid = i < a.Lq;
      const A li = valid ? b.lse[i] : A(0);
#pragma unroll
      for (int r = 0; r < 4; ++r)  // keys j >= Lk masked too (their P could overflow)
        Ps[(ty + 16 * r) * kPLd + tx + 16 * c] =
            valid && b.r0 + ty + 16 * r < a.Lk ? acc_exp(st[r][c] * a.s - li) : A(0);
    }
    Tiles::accumulate(acc, Ps, b.go, static_cast<const A*>(nullptr), a.Lq, i0, a.Cv, b.c0, dnl_smem);
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t j = b.r0 + ty + 16 * r;
    if (j >= a.Lk) continue;
    const A w = a.u != nullptr ? acc_exp(to_acc<A>(a.u[b.n * a.Lk + j]) - a.lse_u[b.n]) : A(0);
#pragma unroll
    for (int c = 0; c < VPT; ++c) {
      const int64_t cc = b.c0 + tx + 16 * c;
      if (cc < a.Cv) {
        const A extra = a.u != nullptr ? w * a.dg[b.n * a.Cv + cc] : A(0);
        a.dst[(b.n * a.Cv + cc) * a.Lk + j] = from_acc<T>(acc[r][c] + extra);
      }
    }
  }
}

// dK: block = (n, key block, key-channel chunk); rows are keys, columns queries.
// dS^T[j][i] = P_ij (dP_ij - D_i), dP_ij = dout_i . v_j; dk[c, j] = s sum_i dS_ij q~[c, i];
// colsum[n, j] = sum_i dS_ij (written by the first chunk when colsum is not null).
template <typename T, int VPT>
__global__ void __launch_bounds__(kThreads) attention_dk_kernel(TileArgs<T> a) {
  using A = acc_t<T>;
  using Tiles = tile_ops_t<T, VPT>;
  const TileBlock<T> b = TileBlock<T>::template at<16 * VPT>(a);
  A* Ps = Tiles::p_tile(dnl_smem);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

  A acc[4][VPT], cs[4];
  zero(acc);
#pragma unroll
  for (int r = 0; r < 4; ++r) cs[r] = A(0);
  for (int64_t i0 = 0; i0 < a.Lq; i0 += kTile) {
    A st[4][4], dpt[4][4];
    zero(st);
    zero(dpt);
    Tiles::score(st, b.k, b.mk, a.Lk, b.r0, b.q, b.mq, a.Lq, i0, a.Ck, dnl_smem);
    Tiles::score(dpt, b.v, static_cast<const A*>(nullptr), a.Lk, b.r0, b.go,
                 static_cast<const A*>(nullptr), a.Lq, i0, a.Cv, dnl_smem);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t i = i0 + tx + 16 * c;
      const bool valid = i < a.Lq;
      const A li = valid ? b.lse[i] : A(0);
      const A di = valid ? b.D[i] : A(0);
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const A ds = valid && b.r0 + ty + 16 * r < a.Lk
                         ? acc_exp(st[r][c] * a.s - li) * (dpt[r][c] - di) : A(0);
        cs[r] += ds;
        Ps[(ty + 16 * r) * kPLd + tx + 16 * c] = ds;
      }
    }
    Tiles::accumulate(acc, Ps, b.q, b.mq, a.Lq, i0, a.Ck, b.c0, dnl_smem);
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const A csr = warp_sum<16>(cs[r]);  // all lanes take part
    const int64_t j = b.r0 + ty + 16 * r;
    if (j >= a.Lk) continue;
#pragma unroll
    for (int c = 0; c < VPT; ++c) {
      const int64_t cc = b.c0 + tx + 16 * c;
      if (cc < a.Ck) a.dst[(b.n * a.Ck + cc) * a.Lk + j] = from_acc<T>(acc[r][c] * a.s);
    }
    if (a.colsum != nullptr && b.c0 == 0 && tx == 0) a.colsum[b.n * a.Lk + j] = csr;
  }
}

// dQ: block = (n, query block, key-channel chunk); rows are queries, columns keys.
// dS[i][j] = P_ij (dP_ij - D_i); dq[c, i] = s sum_j dS_ij k~[c, j] - corr[n, c].
template <typename T, int VPT>
__global__ void __launch_bounds__(kThreads) attention_dq_kernel(TileArgs<T> a) {
  using A = acc_t<T>;
  using Tiles = tile_ops_t<T, VPT>;
  const TileBlock<T> b = TileBlock<T>::template at<16 * VPT>(a);
  A* Ps = Tiles::p_tile(dnl_smem);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

  A acc[4][VPT], li[4], di[4];
  zero(acc);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t i = b.r0 + ty + 16 * r;
    li[r] = i < a.Lq ? b.lse[i] : A(0);
    di[r] = i < a.Lq ? b.D[i] : A(0);
  }
  for (int64_t j0 = 0; j0 < a.Lk; j0 += kTile) {
    A sc[4][4], dp[4][4];
    zero(sc);
    zero(dp);
    Tiles::score(sc, b.q, b.mq, a.Lq, b.r0, b.k, b.mk, a.Lk, j0, a.Ck, dnl_smem);
    Tiles::score(dp, b.go, static_cast<const A*>(nullptr), a.Lq, b.r0, b.v,
                 static_cast<const A*>(nullptr), a.Lk, j0, a.Cv, dnl_smem);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const bool valid = j0 + tx + 16 * c < a.Lk;
#pragma unroll
      for (int r = 0; r < 4; ++r)
        Ps[(ty + 16 * r) * kPLd + tx + 16 * c] =
            valid ? acc_exp(sc[r][c] * a.s - li[r]) * (dp[r][c] - di[r]) : A(0);
    }
    Tiles::accumulate(acc, Ps, b.k, b.mk, a.Lk, j0, a.Ck, b.c0, dnl_smem);
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t i = b.r0 + ty + 16 * r;
    if (i >= a.Lq) continue;
#pragma unroll
    for (int c = 0; c < VPT; ++c) {
      const int64_t cc = b.c0 + tx + 16 * c;
      if (cc < a.Ck) {
        const A cr = a.corr != nullptr ? a.corr[b.n * a.Ck + cc] : A(0);
        a.dst[(b.n * a.Ck + cc) * a.Lq + i] = from_acc<T>(acc[r][c] * a.s - cr);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Launches `kernel` on `blocks` blocks of kThreads threads (nothing when blocks == 0).
template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), int64_t blocks, size_t smem, cudaStream_t stream,
                   Args... args) {
  if (blocks <= 0) return cudaSuccess;
  if (blocks > kMaxGridX) return cudaErrorInvalidValue;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned int>(blocks), kThreads, smem, stream>>>(args...);
  return cudaGetLastError();
}

// Workspace (accumulation type A): the channel means mq (N Ck), mk (N Ck) when whitening; the
// backward adds D (N Lq), dg (N Cv), colsum (N Lk), corr (N Ck). The *_workspace_bytes functions
// run the same carving with a null base.
template <typename A> struct Scratch { A *mq, *mk, *D, *dg, *colsum, *corr; };
template <typename A>
Scratch<A> carve_scratch(const DnlShape& s, bool backward, WorkspaceCarver& ws) {
  Scratch<A> r{};
  if (s.whiten) {
    r.mq = ws.take<A>(s.N * s.Ck);
    r.mk = ws.take<A>(s.N * s.Ck);
  }
  if (backward) {
    r.D = ws.take<A>(s.N * s.Lq);
    r.dg = ws.take<A>(s.N * s.Cv);
    if (s.whiten) {
      r.colsum = ws.take<A>(s.N * s.Lk);
      r.corr = ws.take<A>(s.N * s.Ck);
    }
  }
  return r;
}

// Runs f(std::integral_constant<int, VPT>) with the channel chunk width 16 * VPT of a tile
// kernel: VPT = 8 for more than 64 channels, else 4; fp64 always 4 (register budget: its
// VPT = 8 variants are never instantiated).
template <typename T, typename F>
cudaError_t with_vpt(int64_t C, F f) {
  if constexpr (!std::is_same<T, double>::value) {
    if (C > 64) return f(std::integral_constant<int, 8>());
  }
  return f(std::integral_constant<int, 4>());
}

template <typename T, int VPT>
size_t tile_smem() { return tile_ops_t<T, VPT>::kBytes; }

// The operands of the attention-tile launches of one call; with whitening, first the channel
// means of query and key into the scratch.
template <typename T>
cudaError_t tile_args(const DnlShape& shape, const void* query, const void* key, const void* value,
                      const Scratch<acc_t<T>>& scratch, cudaStream_t stream, TileArgs<T>& a) {
  a = TileArgs<T>{};
  a.q = static_cast<const T*>(query);
  a.k = static_cast<const T*>(key);
  a.v = static_cast<const T*>(value);
  if (shape.whiten) {
    a.mq = scratch.mq;
    a.mk = scratch.mk;
    cudaError_t err = launch(row_sum_kernel<T>, shape.N * shape.Ck, 0, stream, a.q, shape.Lq, true, scratch.mq);
    if (err != cudaSuccess) return err;
    err = launch(row_sum_kernel<T>, shape.N * shape.Ck, 0, stream, a.k, shape.Lk, true, scratch.mk);
    if (err != cudaSuccess) return err;
  }
  a.Ck = shape.Ck;
  a.Cv = shape.Cv;
  a.Lq = shape.Lq;
  a.Lk = shape.Lk;
  a.s = static_cast<acc_t<T>>(shape.s);
  return cudaSuccess;
}

enum TileKernel : int { kForwardTiles = 0, kGradValueTiles, kGradKeyTiles, kGradQueryTiles };

// Launches one attention-tile kernel (VPT chosen for `channels` by with_vpt) over
// N x ceil(rows / kTile) x ceil(channels / (16 VPT)) blocks, at least one channel chunk when
// `one_chunk` (the forward's lse needs it).
template <typename T>
cudaError_t launch_tiles(TileArgs<T> a, TileKernel kind, int64_t N, int64_t rows, int64_t channels,
                         bool one_chunk, cudaStream_t stream) {
  return with_vpt<T>(channels, [&](auto vpt) {
    constexpr int VPT = decltype(vpt)::value;
    using Kernel = void (*)(TileArgs<T>);
    const Kernel kernels[] = {attention_forward_kernel<T, VPT>, attention_dv_kernel<T, VPT>,
                              attention_dk_kernel<T, VPT>, attention_dq_kernel<T, VPT>};
    a.nrb = cdiv(rows, kTile);
    a.ncb = channels > 0 ? cdiv(channels, 16 * VPT) : (one_chunk ? 1 : 0);
    if (a.nrb > 0 && a.ncb > 0 && a.nrb > kMaxGridX / (N * a.ncb)) return cudaErrorInvalidValue;
    return launch(kernels[kind], N * a.nrb * a.ncb, tile_smem<T, VPT>(), stream, a);
  });
}
template <typename T>
cudaError_t forward_impl(const DnlForwardParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  if (p.shape.N <= 0) return cudaSuccess;
  if (p.shape.Lk <= 0) return p.shape.Lq > 0 ? cudaErrorInvalidValue : cudaSuccess;
  WorkspaceCarver ws{p.workspace};
  TileArgs<T> a;
  cudaError_t err = tile_args<T>(p.shape, p.query, p.key, p.value,
                                 carve_scratch<A>(p.shape, false, ws), stream, a);
  if (err != cudaSuccess) return err;
  const A* g = nullptr;
  if (p.unary != nullptr) {
    err = launch(unary_lse_kernel<T>, p.shape.N, 0, stream, static_cast<const T*>(p.unary), p.shape.Lk,
                 static_cast<A*>(p.lse_u));
    if (err != cudaSuccess) return err;
    err = launch(unary_g_kernel<T>, p.shape.N * p.shape.Cv, 0, stream, static_cast<const T*>(p.unary),
                 static_cast<const T*>(p.value), static_cast<const A*>(p.lse_u), p.shape.Cv, p.shape.Lk,
                 static_cast<A*>(p.g));
    if (err != cudaSuccess) return err;
    g = static_cast<const A*>(p.g);
  }
  if (p.shape.Lq <= 0) return cudaSuccess;
  a.g = g;
  a.dst = static_cast<T*>(p.out);
  a.lse_out = static_cast<A*>(p.lse);
  return launch_tiles(a, kForwardTiles, p.shape.N, p.shape.Lq, p.shape.Cv, true, stream);
}

template <typename T>
cudaError_t backward_impl(const DnlBackwardParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  if (p.shape.N <= 0) return cudaSuccess;
  if (p.shape.Lk <= 0) return p.shape.Lq > 0 ? cudaErrorInvalidValue : cudaSuccess;
  const bool has_u = p.unary != nullptr;
  WorkspaceCarver ws{p.workspace};
  const Scratch<A> scratch = carve_scratch<A>(p.shape, true, ws);
  A *mk = scratch.mk, *D = scratch.D, *colsum = scratch.colsum, *corr = scratch.corr;
  A* dg = has_u ? scratch.dg : nullptr;
  const T* go = static_cast<const T*>(p.grad_out);
  const A* g = has_u ? static_cast<const A*>(p.g) : nullptr;

  TileArgs<T> a;
  cudaError_t err = tile_args<T>(p.shape, p.query, p.key, p.value, scratch, stream, a);
  if (err != cudaSuccess) return err;
  err = launch(delta_kernel<T>, cdiv(p.shape.N * p.shape.Lq, kThreads), 0, stream, go,
               static_cast<const T*>(p.out), g, p.shape.N, p.shape.Cv, p.shape.Lq, D);
  if (err != cudaSuccess) return err;
  if (has_u) {
    err = launch(row_sum_kernel<T>, p.shape.N * p.shape.Cv, 0, stream, go, p.shape.Lq, false, dg);
    if (err != cudaSuccess) return err;
  }
  // With Lq == 0 the attention loops are empty: dv = w dg = 0, dk = 0, du = 0 come out anyway.
  a.go = go;
  a.u = static_cast<const T*>(p.unary);
  a.lse = static_cast<const A*>(p.lse);
  a.D = D;
  a.dg = dg;
  a.lse_u = static_cast<const A*>(p.lse_u);
  a.dst = static_cast<T*>(p.grad_value);
  err = launch_tiles(a, kGradValueTiles, p.shape.N, p.shape.Lk, p.shape.Cv, false, stream);
  if (err != cudaSuccess) return err;
  a.dst = static_cast<T*>(p.grad_key);
  a.colsum = colsum;
  err = launch_tiles(a, kGradKeyTiles, p.shape.N, p.shape.Lk, p.shape.Ck, false, stream);
  if (err != cudaSuccess) return err;
  if (p.shape.whiten && p.shape.Lq > 0) {
    err = launch(dq_correction_kernel<T>, p.shape.N * p.shape.Ck, 0, stream, static_cast<const T*>(p.key),
                 static_cast<const A*>(mk), static_cast<const A*>(colsum), p.shape.Ck, p.shape.Lq, p.shape.Lk,
                 static_cast<A>(p.shape.s), corr);
    if (err != cudaSuccess) return err;
  }
  if (p.shape.Lq > 0) {
    a.dst = static_cast<T*>(p.grad_query);
    a.corr = corr;
    err = launch_tiles(a, kGradQueryTiles, p.shape.N, p.shape.Lq, p.shape.Ck, false, stream);
    if (err != cudaSuccess) return err;
  }
  if (has_u) {
    err = launch(unary_grad_kernel<T>, cdiv(p.shape.N * p.shape.Lk, kThreads), 0, stream,
                 static_cast<const T*>(p.unary), static_cast<const T*>(p.value), g,
                 static_cast<const A*>(p.lse_u), static_cast<const A*>(dg), p.shape.N, p.shape.Cv, p.shape.Lk,
                 static_cast<T*>(p.grad_unary));
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

size_t disentangled_non_local_forward_workspace_bytes(const DnlForwardParams& p) {
  return workspace_size(p.shape.dtype,
                        [&](WorkspaceCarver& ws, auto a) { carve_scratch<decltype(a)>(p.shape, false, ws); });
}

size_t disentangled_non_local_backward_workspace_bytes(const DnlBackwardParams& p) {
  return workspace_size(p.shape.dtype,
                        [&](WorkspaceCarver& ws, auto a) { carve_scratch<decltype(a)>(p.shape, true, ws); });
}

cudaError_t disentangled_non_local_forward(const DnlForwardParams& p,
                                           cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  SEGOPS_CUDA_DISPATCH(p.shape.dtype, err = forward_impl<scalar_t>(p, stream));
  return err;
}

cudaError_t disentangled_non_local_backward(const DnlBackwardParams& p,
                                            cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  SEGOPS_CUDA_DISPATCH(p.shape.dtype, err = backward_impl<scalar_t>(p, stream));
  return err;
}

}  // namespace cuda
}  // namespace segops
