// The staged products of the tiled kernels: accumulate_outer, the register-blocked step every
// SIMT product shares, and the score tile S = X^T Y of the attention kernels
// (criss_cross_attention, interlaced_sparse_attention, disentangled_non_local). CUDA headers only.
//
// A 256-thread block is a 16 x 16 grid (ty = threadIdx.x / 16, tx = threadIdx.x % 16); for a
// (16 TN) x (16 TN) tile the thread owns s[i][j] = S[ty + 16 i][tx + 16 j]. The operands come
// through loaders, so one routine serves every addressing (a line of a feature map, the members
// of a group, whitened positions): load(c, e) is the value of channel c (< C) at tile element
// e (< 16 TN) in the accumulation type, 0 outside the operand. Channels are staged kChunk at a
// time, channel-major ([kChunk][16 TN]), in shared memory.
//
// One precision policy: the SIMT form sums the channels in ascending order with one acc_fma
// each, and the tensor-core form in ascending 16-channel steps with fp32 accumulators, the same
// in every kernel of an op, so the backward recomputes the forward's energies bit for bit.
#pragma once
#include <mma.h>

#include <cstdint>

#include "segops/cuda/device_utils.cuh"

namespace segops::cuda {

constexpr int kTileThreads = 256;  // 16 x 16

// A shared-memory stage read as x(k, r) = p[k * k_stride + r * r_stride].
template <typename A>
struct Strided {
  const A* p;
  int k_stride, r_stride;
  __device__ __forceinline__ A operator()(int k, int r) const { return p[k * k_stride + r * r_stride]; }
};

// acc[i][j] = acc_fma(x(k, row + 16 i), y(k, col + 16 j), acc[i][j]) for k = 0 .. K - 1 in
// ascending order: the register-blocked step of every staged SIMT product. kUnroll: how far the
// k loop unrolls (each kernel keeps the factor its register budget was tuned for).
template <int K, int kUnroll, int TI, int TJ, typename A>
__device__ __forceinline__ void accumulate_outer(A (&acc)[TI][TJ], Strided<A> x, int row,
                                                 Strided<A> y, int col) {
#pragma unroll kUnroll
  for (int k = 0; k < K; ++k) {
    A xa[TI], yb[TJ];
#pragma unroll
    for (int i = 0; i < TI; ++i) xa[i] = x(k, row + 16 * i);
#pragma unroll
    for (int j = 0; j < TJ; ++j) yb[j] = y(k, col + 16 * j);
#pragma unroll
    for (int i = 0; i < TI; ++i) {
#pragma unroll
      for (int j = 0; j < TJ; ++j) acc[i][j] = acc_fma(xa[i], yb[j], acc[i][j]);
    }
  }
}

// How a stage is loaded (each kernel keeps the form its register budget was tuned with): both
// operands per strided step, one operand after the other, or both in a fixed, unrolled number of
// steps per thread.
enum class Staging { kPaired, kSeparate, kUnrolled };

// Stages channels c0 .. c0 + kChunk - 1 of both operands into xs, ys ([kChunk][B], zero past C),
// converted to Stage (the accumulation type, or the storage type for tensor cores).
template <int B, int kChunk, Staging kStaging, typename Stage, typename LoadX, typename LoadY>
__device__ __forceinline__ void stage_operands(int64_t c0, int64_t C, const LoadX& load_x,
                                               const LoadY& load_y, Stage* xs, Stage* ys) {
  using A = decltype(load_x(0, 0));
  const int nc = C - c0 < kChunk ? static_cast<int>(C - c0) : kChunk;  // channels in this stage
  const auto put = [&](Stage* dst, const auto& load, int idx) {
    const int c = idx / B, e = idx % B;
    dst[idx] = from_acc<Stage>(c < nc ? load(c0 + c, e) : A(0));
  };
  if constexpr (kStaging == Staging::kUnrolled) {
    static_assert(kChunk * B % kTileThreads == 0, "the stage splits evenly over the threads");
#pragma unroll
    for (int q = 0; q < kChunk * B / kTileThreads; ++q) {
      put(xs, load_x, threadIdx.x + q * kTileThreads);
      put(ys, load_y, threadIdx.x + q * kTileThreads);
    }
  } else if constexpr (kStaging == Staging::kPaired) {
    for (int idx = threadIdx.x; idx < kChunk * B; idx += kTileThreads) {
      put(xs, load_x, idx);
      put(ys, load_y, idx);
    }
  } else {
    for (int idx = threadIdx.x; idx < kChunk * B; idx += kTileThreads) put(xs, load_x, idx);
    for (int idx = threadIdx.x; idx < kChunk * B; idx += kTileThreads) put(ys, load_y, idx);
  }
}

// s[i][j] += sum_{c < C} X(c, ty + 16 i) * Y(c, tx + 16 j). xs, ys: kChunk * 16 TN values each.
// kUnroll as for accumulate_outer. Ends with __syncthreads (the stages may be reused at once).
template <int TN, int kChunk, int kUnroll, Staging kStaging, typename A, typename LoadX,
          typename LoadY>
__device__ __forceinline__ void staged_tile_dot(A (&s)[TN][TN], int64_t C, const LoadX& load_x,
                                                const LoadY& load_y, A* __restrict__ xs,
                                                A* __restrict__ ys) {
  constexpr int B = 16 * TN;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    stage_operands<B, kChunk, kStaging>(c0, C, load_x, load_y, xs, ys);
    __syncthreads();
    accumulate_outer<kChunk, kUnroll>(s, Strided<A>{xs, B, 1}, ty, Strided<A>{ys, B, 1}, tx);
    __syncthreads();
  }
}

// The same product of a 64 x 64 tile on tensor cores (nvcuda::wmma 16x16x16, fp32 accumulators,
// T = __half or __nv_bfloat16): the loaded values are rounded to T in xs, ys (kChunk * 64 each,
// 32-byte aligned), and the fp32 result goes through `stage` (64 rows of kStageLd floats) into the
// SIMT ownership above. Warp w owns the output tiles (row w / 2, columns 2 (w % 2) + {0, 1}).
// Ends with __syncthreads.
template <int kChunk, int kStageLd, Staging kStaging, typename T, typename LoadX, typename LoadY>
__device__ __forceinline__ void staged_tile_dot_wmma(float (&s)[4][4], int64_t C,
                                                     const LoadX& load_x, const LoadY& load_y,
                                                     T* xs, T* ys, float* stage) {
  namespace wmma = nvcuda::wmma;
  static_assert(kChunk % 16 == 0, "whole 16-channel steps");
  constexpr int B = 64;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16, warp = tid / 32;
  const int row = warp / 2, col0 = (warp % 2) * 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    stage_operands<B, kChunk, kStaging>(c0, C, load_x, load_y, xs, ys);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kChunk; k += 16) {
      // X^T (64 x 16) is column-major in xs, Y (16 x 64) row-major in ys, both with ld 64.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
      wmma::load_matrix_sync(fa, xs + k * B + row * 16, B);
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, ys + k * B + (col0 + t) * 16, B);
        wmma::mma_sync(acc[t], fa, fb, acc[t]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    wmma::store_matrix_sync(stage + row * 16 * kStageLd + (col0 + t) * 16, acc[t], kStageLd,
                            wmma::mem_row_major);
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) s[i][j] += stage[(ty + 16 * i) * kStageLd + tx + 16 * j];
  }
  __syncthreads();
}

}  // namespace segops::cuda
