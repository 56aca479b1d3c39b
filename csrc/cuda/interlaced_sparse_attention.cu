// Interlaced sparse self-attention (docs/operators.md §2.2), CUDA forward and backward.
//
// The algorithm of csrc/cpu/interlaced_sparse_attention.cpp and
// segops/triton/interlaced_sparse_attention.py: flash-style dense attention inside each group,
// the groups read and written in place in the (N, C, H, W) tensors by index arithmetic
// (member_offset), no permuted copies and nothing of size (groups, L, L) in global memory.
//
// Tiles: a thread block owns a tile of M "rows" (group members) of one group (or, for groups
// smaller than M / 2, several whole groups packed into one tile: a row then only attends to the
// rows of its own group) and one chunk of M output channels. The logits of a (row tile x key
// tile) pair are built by looping over the Ck channels in chunks of D, so any Ck / Cv works; a
// block with a later output-channel chunk recomputes the logits (as the Triton kernels do).
//
// Forward: online softmax over key tiles (natural exp, like the CPU backend), out = acc / l and
// the per-position log-sum-exp lse = m + log(l) (accumulation dtype).
// Backward: delta = <dO, O> per position (scratch), then three launches of one kernel template:
// dQ (own rows = queries), dK and dV (own rows = keys), each recomputing the probabilities
// p = exp(scale q.k - lse) from the saved lse. Every element of dQ, dK, dV is written by
// exactly one thread: no atomics, deterministic (grad_bias, below, is summed with atomics).
//
// Optional logit terms (window attention, IsaShape): bias[n % nb] + mask[g % nm] added to the
// scaled logits of attending pairs, in kernels instantiated with kTerms (without them the
// kernels are those of before); each (row tile x key tile) pair stages its terms in shared
// memory. grad_bias: the dQ blocks of channel chunk 0 add their dS into accumulation-dtype sums
// with atomicAdd (every group of a head adds into the same L x L entries; the order, and so the
// last bits, vary from run to run), converted to the data dtype at the end.
//
// Threads: 256 per block as a 16 x 16 grid (tx = threadIdx.x % 16, ty = threadIdx.x / 16); a
// thread owns rows ty + 16 a and columns (keys or channels) tx + 16 b, a, b < M / 16. A row's 16
// owners are the 16 lanes of one half-warp, so row reductions are 4 shuffles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>

#include "segops/cuda/device_utils.cuh"
#include "segops/cuda/interlaced_sparse_attention.h"
#include "segops/cuda/tile_dot.cuh"

namespace segops {
namespace cuda {
namespace {

constexpr int kThreads = kTileThreads;  // 16 x 16

// M: rows per tile (queries = keys = output channels per block), D: channel chunk of the
// logits. fp64 uses smaller tiles so that everything fits in 48 KiB of static shared memory.
template <typename T> struct TileCfg { static constexpr int M = 64, D = 32; };
template <> struct TileCfg<double> { static constexpr int M = 32, D = 16; };

// fp16 / bf16 run the four matrix products on tensor cores (nvcuda::wmma 16x16x16, fp32
// accumulators, sm_80+); fp32 / fp64 use the SIMT products.
template <typename T> struct UseWmma { static constexpr bool value = false; };
template <> struct UseWmma<__half> { static constexpr bool value = true; };
template <> struct UseWmma<__nv_bfloat16> { static constexpr bool value = true; };

// Geometry of one call (host-computed, passed by value).
struct Geom {
  int64_t NG;    // N * G: groups of all samples
  int64_t G;     // groups per sample
  int64_t L;     // members per group
  int64_t Ck, Cv, HW, W, GW, PH, PW;
  int64_t LP;    // packed tiles: members slots per group (next power of two >= L)
  int64_t MT;    // unpacked: member tiles per group (ceil(L / M)); packed: 1
  bool long_range, packed;
};

// Pixel offset y * W + x of member m of group grp (the one place that knows the mapping).
// long:  group (ly, lx) = (grp / PW, grp % PW), members (gy, gx) row-major over (H/PH, W/PW);
// short: group (gy, gx) = (grp / GW, grp % GW), members (ly, lx) row-major over (PH, PW);
// y = gy * PH + ly, x = gx * PW + lx.
__device__ __forceinline__ int64_t member_offset(const Geom& g, int64_t grp, int64_t m) {
  int64_t gy, gx, ly, lx;
  if (g.long_range) {
    ly = grp / g.PW; lx = grp % g.PW; gy = m / g.GW; gx = m % g.GW;
  } else {
    gy = grp / g.GW; gx = grp % g.GW; ly = m / g.PW; lx = m % g.PW;
  }
  return (gy * g.PH + ly) * g.W + gx * g.PW + lx;
}

// The M rows of a tile: flat group index (-1: padding row), sample, member, pixel offset.
template <int M> struct Rows {
  int64_t ng[M];
  int64_t n[M];
  int64_t m[M];
  int64_t pix[M];
};

// Rows of tile `tile` starting at member `start`. Unpacked: tile = flat group, members start ..
// start + M. Packed: rows r -> group tile * (M / LP) + r / LP, member r % LP.
template <int M>
__device__ __forceinline__ void fill_rows(Rows<M>& rows, const Geom& g, int64_t tile, int64_t start) {
  for (int r = threadIdx.x; r < M; r += kThreads) {
    int64_t ng, m;
    if (g.packed) {
      ng = tile * (M / g.LP) + r / g.LP;
      m = r % g.LP;
    } else {
      ng = tile;
      m = start + r;
    }
    if (m < g.L && ng < g.NG) {
      rows.ng[r] = ng;
      rows.n[r] = ng / g.G;
      rows.m[r] = m;
      rows.pix[r] = member_offset(g, ng % g.G, m);
    } else {
      rows.ng[r] = -1;
      rows.n[r] = 0;
      rows.m[r] = 0;
      rows.pix[r] = 0;
    }
  }
}

// The optional logit terms: bias (nb, L, L), mask (nm, L, L), null when absent.
template <typename T> struct LogitTerms {
  const T* bias;
  const T* mask;
  int64_t nb, nm;
};

// Each own row's line of the matrices bias[n % nb] and mask[g % nm] of its group: the offset of
// entry (m_r, 0) when the own rows are the queries (kOwnQuery), else of entry (0, m_r). Thread r
// fills row r, as fill_rows did (no barrier needed in between).
template <bool kOwnQuery, typename T, int M>
__device__ __forceinline__ void fill_term_lines(int64_t (&lines)[2][M], const LogitTerms<T>& t,
                                                const Geom& g, const Rows<M>& own) {
  for (int r = threadIdx.x; r < M; r += kThreads) {
    const int64_t ng = own.ng[r] < 0 ? 0 : own.ng[r], size = g.L * g.L;
    const int64_t at = kOwnQuery ? own.m[r] * g.L : own.m[r];
    lines[0][r] = own.n[r] % t.nb * size + at;
    lines[1][r] = ng % g.G % t.nm * size + at;
  }
}

// terms_tile[i * PLD + j] = bias + mask of the pair (own row i, other row j) where the two attend
// (one group), 0 elsewhere. Staged in shared memory so that the softmax loop holds no pointers
// or pending loads of the terms (read there directly, they spilled at the 128-register cap of
// the tensor-core kernels). kOwnQuery: the own rows are the queries. Consecutive threads take
// consecutive key members (coalesced reads).
template <bool kOwnQuery, typename T, int M, int PLD>
__device__ __forceinline__ void stage_terms(acc_t<T>* terms_tile, const LogitTerms<T>& t,
                                            const int64_t (&lines)[2][M], const Geom& g,
                                            const Rows<M>& own, const Rows<M>& oth) {
#pragma unroll 1  // unrolled, its loads in flight spilled the accumulators of the dK kernel
  for (int idx = threadIdx.x; idx < M * M; idx += kThreads) {
    const int i = kOwnQuery ? idx / M : idx % M, j = kOwnQuery ? idx % M : idx / M;
    acc_t<T> v = acc_t<T>(0);
    if (own.ng[i] >= 0 && own.ng[i] == oth.ng[j]) {
      const int64_t e = kOwnQuery ? oth.m[j] : oth.m[j] * g.L;
      if (t.bias != nullptr) v += to_acc<acc_t<T>>(t.bias[lines[0][i] + e]);
      if (t.mask != nullptr) v += to_acc<acc_t<T>>(t.mask[lines[1][i] + e]);
    }
    terms_tile[i * PLD + j] = v;
  }
}

// gbias[n % nb, m_i, m_j] += ds[i * PLD + j] for the attending pairs of a (query tile x key
// tile) pair, lines from fill_term_lines<true>. Outside the pair loop, whose registers are
// full; consecutive threads add into consecutive entries.
template <typename T, int M, int PLD>
__device__ __forceinline__ void add_bias_grads(acc_t<T>* gbias, const acc_t<T>* ds,
                                               const int64_t (&lines)[2][M], const Rows<M>& own,
                                               const Rows<M>& oth) {
  for (int idx = threadIdx.x; idx < M * M; idx += kThreads) {
    const int i = idx / M, j = idx % M;
    if (own.ng[i] >= 0 && own.ng[i] == oth.ng[j])
      atomicAdd(gbias + lines[0][i] + oth.m[j], ds[i * PLD + j]);
  }
}

// Channel c of tile row e: X[n_e, c, pix_e] (0 for padding rows).
template <typename T, int M>
struct GroupLoader {
  const T* X;
  const Rows<M>& rows;
  int64_t C, HW;
  __device__ __forceinline__ acc_t<T> operator()(int64_t c, int e) const {
    return rows.ng[e] >= 0 ? to_acc<acc_t<T>>(X[(rows.n[e] * C + c) * HW + rows.pix[e]])
                           : acc_t<T>(0);
  }
};

// dst[r * ld_r + d * ld_d] = X[n_r, d0 + d, pix_r] for rows r < M, channels d < DC (0 outside the
// tensor or for padding rows), as Dst: the accumulation type, or T for the tensor-core operands.
// Consecutive threads take consecutive rows (neighbouring pixels).
template <int M, int DC, typename Dst, typename T>
__device__ __forceinline__ void load_tile(Dst* dst, int ld_r, int ld_d, const T* X, int64_t C,
                                          int64_t HW, const Rows<M>& rows, int64_t d0) {
  const GroupLoader<T, M> load{X, rows, C, HW};
  for (int idx = threadIdx.x; idx < DC * M; idx += kThreads) {
    const int d = idx / M, r = idx % M;
    dst[r * ld_r + d * ld_d] = from_acc<Dst>(d0 + d < C ? load(d0 + d, r) : acc_t<T>(0));
  }
}

// s[a][b] += sum_c X[c, row ty+16a] * Y[c, row tx+16b] over all C channels, in chunks of D
// staged channel-major in buf (2 * D * M values). Ends with a barrier (buf free again).
template <typename T, int M, int D>
__device__ __forceinline__ void tile_dot(acc_t<T> (&s)[M / 16][M / 16], acc_t<T>* buf, const T* X,
                                         const Rows<M>& rx, const T* Y, const Rows<M>& ry,
                                         int64_t C, int64_t HW) {
  staged_tile_dot<M / 16, D, 4, Staging::kSeparate>(s, C, GroupLoader<T, M>{X, rx, C, HW},
                                GroupLoader<T, M>{Y, ry, C, HW}, buf, buf + D * M);
}

// Tensor-core forms (fp16 / bf16). The 16 (16 x 16) output tiles of an M x M product (M = 64)
// are split over the 8 warps, 2 each: warp w owns tiles f = 2 w, 2 w + 1 at (row block f / 4,
// column block f % 4). The fp32 result goes through `stage` (M x SLD floats) into the SIMT
// ownership (rows ty + 16 a, columns tx + 16 b), so that the softmax code is shared.
template <int M> struct WmmaTiles {
  static constexpr int kPerWarp = (M / 16) * (M / 16) / (kThreads / 32);
  static_assert(kPerWarp * (kThreads / 32) == (M / 16) * (M / 16), "tiles must split over warps");
  __device__ static int row(int u) { return ((threadIdx.x / 32) * kPerWarp + u) / (M / 16); }
  __device__ static int col(int u) { return ((threadIdx.x / 32) * kPerWarp + u) % (M / 16); }
};

// Same contract as tile_dot on tensor cores (M = 64); buf holds 2 * D * M values of T (32-byte
// aligned), stage M * SLD floats.
template <typename T, int M, int D, int SLD>
__device__ __forceinline__ void tile_dot_wmma(float (&s)[M / 16][M / 16], T* buf, float* stage,
                                              const T* X, const Rows<M>& rx, const T* Y,
                                              const Rows<M>& ry, int64_t C, int64_t HW) {
  static_assert(M == 64, "the tensor-core tile is 64 x 64");
  staged_tile_dot_wmma<D, SLD, Staging::kSeparate>(s, C, GroupLoader<T, M>{X, rx, C, HW},
                               GroupLoader<T, M>{Y, ry, C, HW}, buf, buf + D * M, stage);
}

// acc[a][c] += sum_j ph[row ty+16a][j] * ms[j][col tx+16c] on tensor cores; ph and ms are
// (M x HLD) row-major T, stage M * SLD floats. Call after a barrier that publishes ph and ms;
// returns without a final barrier (the caller's next barrier frees stage).
template <typename T, int M, int HLD, int SLD>
__device__ __forceinline__ void tile_pv_wmma(float (&acc)[M / 16][M / 16], const T* ph,
                                             const T* ms, float* stage, int tx, int ty) {
  namespace wmma = nvcuda::wmma;
  constexpr int TM = M / 16, NF = WmmaTiles<M>::kPerWarp;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> cf[NF];
#pragma unroll
  for (int u = 0; u < NF; ++u) wmma::fill_fragment(cf[u], 0.0f);
#pragma unroll
  for (int kk = 0; kk < M; kk += 16) {
#pragma unroll
    for (int u = 0; u < NF; ++u) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
      wmma::load_matrix_sync(af, ph + WmmaTiles<M>::row(u) * 16 * HLD + kk, HLD);
      wmma::load_matrix_sync(bf, ms + kk * HLD + WmmaTiles<M>::col(u) * 16, HLD);
      wmma::mma_sync(cf[u], af, bf, cf[u]);
    }
  }
#pragma unroll
  for (int u = 0; u < NF; ++u)
    wmma::store_matrix_sync(stage + WmmaTiles<M>::row(u) * 16 * SLD + WmmaTiles<M>::col(u) * 16,
                            cf[u], SLD, wmma::mem_row_major);
  __syncthreads();
#pragma unroll
  for (int a = 0; a < TM; ++a)
#pragma unroll
    for (int b = 0; b < TM; ++b) acc[a][b] += stage[(ty + 16 * a) * SLD + tx + 16 * b];
}

// acc[a][c] += sum_j ps[row ty+16a][j] * ms[j][col tx+16c].
template <typename A, int M, int PLD, int ULD>
__device__ __forceinline__ void tile_pv(A (&acc)[M / 16][M / 16], const A* ps, const A* ms,
                                        int tx, int ty) {
  accumulate_outer<M, 4>(acc, Strided<A>{ps, 1, PLD}, ty, Strided<A>{ms, ULD, 1}, tx);
}



// Writes the block's (rows x M channels) result, staged channel-major through buf (M * (M + 1)
// values) so that global stores run along the rows: out[n_i, c0 + c, pix_i] = acc[a][c] * mul[a].
template <typename T, int M>
__device__ __forceinline__ void store_tile(T* out, int64_t C, int64_t HW, const Rows<M>& rows, int64_t c0,
                           acc_t<T>* buf, const acc_t<T> (&acc)[M / 16][M / 16],
                           const acc_t<T> (&mul)[M / 16], int tx, int ty) {
  constexpr int TM = M / 16, ULD = M + 1;
  __syncthreads();  // buf may still be read by the last product
#pragma unroll
  for (int a = 0; a < TM; ++a)
#pragma unroll
    for (int b = 0; b < TM; ++b) buf[(tx + 16 * b) * ULD + ty + 16 * a] = acc[a][b] * mul[a];
  __syncthreads();
  for (int idx = threadIdx.x; idx < M * M; idx += kThreads) {
    const int c = idx / M, r = idx % M;
    const int64_t ch = c0 + c;
    if (ch < C && rows.ng[r] >= 0)
      out[(rows.n[r] * C + ch) * HW + rows.pix[r]] = from_acc<T>(buf[c * ULD + r]);
  }
}

// Own tile of block x: (tile index for fill_rows, first member).
__device__ __forceinline__ void own_tile(const Geom& g, int64_t bx, int M, int64_t& tile,
                                         int64_t& start) {
  if (g.packed) {
    tile = bx;
    start = 0;
  } else {
    tile = bx / g.MT;
    start = (bx % g.MT) * M;
  }
}

// ------------------------------------------------------------------------------ forward
// grid (own tiles, ceil(Cv / M)). lse written by the blocks of channel chunk 0.
template <typename T, bool kTerms>
__global__ void __launch_bounds__(kThreads, 2)
    isa_forward_kernel(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                       T* __restrict__ O, acc_t<T>* __restrict__ LSE, Geom g, acc_t<T> scale,
                       LogitTerms<T> terms) {
  using A = acc_t<T>;
  constexpr int M = TileCfg<T>::M, D = TileCfg<T>::D, TM = M / 16;
  constexpr bool kTC = UseWmma<T>::value;
  constexpr int PLD = M + 16, ULD = M + 1, HLD = M + 8;
  // ubuf: the logit operands (2 x D x M), the multiplied tile (M x ULD values, or for tensor
  // cores two M x HLD tiles of T: the tile and the probabilities), the output staging.
  constexpr int UBUF = (2 * D * M > M * HLD) ? 2 * D * M : M * HLD;
  __shared__ Rows<M> own, oth;
  __shared__ __align__(32) A ubuf[UBUF];
  __shared__ __align__(32) A ps[M * PLD];  // probabilities (SIMT) / fp32 staging (tensor cores)
  T* const ms_h = reinterpret_cast<T*>(ubuf);  // tensor cores: multiplied tile, M x HLD
  T* const ph = ms_h + M * HLD;                // tensor cores: probabilities, M x HLD

  __shared__ int64_t lines[2][M];  // kTerms: fill_term_lines

  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t c0 = int64_t(blockIdx.y) * M;
  int64_t tile, start;
  own_tile(g, blockIdx.x, M, tile, start);
  fill_rows<M>(own, g, tile, start);
  if constexpr (kTerms) fill_term_lines<true>(lines, terms, g, own);

  const A neg_inf = -INFINITY;
  A m_i[TM], l_i[TM], acc[TM][TM];
#pragma unroll
  for (int a = 0; a < TM; ++a) {
    m_i[a] = neg_inf;
    l_i[a] = A(0);
#pragma unroll
    for (int b = 0; b < TM; ++b) acc[a][b] = A(0);
  }

  for (int64_t t = 0; t < g.MT; ++t) {
    __syncthreads();  // the previous tile is done with oth, ubuf, ps
    fill_rows<M>(oth, g, tile, g.packed ? 0 : t * M);
    __syncthreads();
    A s[TM][TM];
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
      for (int b = 0; b < TM; ++b) s[a][b] = A(0);
    if constexpr (kTC)
      tile_dot_wmma<T, M, D, PLD>(s, ms_h, ps, Q, own, K, oth, g.Ck, g.HW);
    else
      tile_dot<T, M, D>(s, ubuf, Q, own, K, oth, g.Ck, g.HW);
    if constexpr (kTerms) {  // into ps, free until the probabilities are written
      stage_terms<true, T, M, PLD>(ps, terms, lines, g, own, oth);
      __syncthreads();
    }

    A alpha[TM];
#pragma unroll
    for (int a = 0; a < TM; ++a) {
      const int64_t ngi = own.ng[ty + 16 * a];
      A mx = neg_inf;
#pragma unroll
      for (int b = 0; b < TM; ++b) {
        const int64_t ngj = oth.ng[tx + 16 * b];
        if (ngj >= 0 && ngj == ngi) {
          s[a][b] *= scale;
          if constexpr (kTerms) s[a][b] += ps[(ty + 16 * a) * PLD + tx + 16 * b];
        } else {
          s[a][b] = neg_inf;
        }
        mx = max(mx, s[a][b]);
      }
      A m_new = max(m_i[a], warp_max<16>(mx));
      if (m_new == neg_inf) m_new = A(0);  // no key yet (padding row): keep everything finite
      alpha[a] = acc_exp(m_i[a] - m_new);  // 0 on the first key tile (m_i = -inf)
      A sum = A(0);
#pragma unroll
      for (int b = 0; b < TM; ++b) {
        const A p = acc_exp(s[a][b] - m_new);  // exp(-inf) = 0 for masked keys
        sum += p;
        if constexpr (kTC)
          ph[(ty + 16 * a) * HLD + tx + 16 * b] = from_acc<T>(p);
        else
          ps[(ty + 16 * a) * PLD + tx + 16 * b] = p;
      }
      l_i[a] = l_i[a] * alpha[a] + warp_sum<16>(sum);
      m_i[a] = m_new;
#pragma unroll
      for (int b = 0; b < TM; ++b) acc[a][b] *= alpha[a];
    }
    // values of the key tile, row-major (key x channel), channels c0 .. c0 + M
    if constexpr (kTC)
      load_tile<M, M>(ms_h, HLD, 1, V, g.Cv, g.HW, oth, c0);
    else
      load_tile<M, M>(ubuf, ULD, 1, V, g.Cv, g.HW, oth, c0);
    __syncthreads();
    if constexpr (kTC)
      tile_pv_wmma<T, M, HLD, PLD>(acc, ph, ms_h, ps, tx, ty);
    else
      tile_pv<A, M, PLD, ULD>(acc, ps, ubuf, tx, ty);
  }

  A inv[TM];
#pragma unroll
  for (int a = 0; a < TM; ++a) inv[a] = l_i[a] > A(0) ? A(1) / l_i[a] : A(0);
  if (blockIdx.y == 0 && tx == 0) {
#pragma unroll
    for (int a = 0; a < TM; ++a) {
      const int r = ty + 16 * a;
      if (own.ng[r] >= 0) LSE[own.n[r] * g.HW + own.pix[r]] = m_i[a] + acc_log(l_i[a]);
    }
  }
  store_tile<T, M>(O, g.Cv, g.HW, own, c0, ubuf, acc, inv, tx, ty);
}

// ------------------------------------------------------------------------------ backward
// delta[n, p] = sum_c dO[n, c, p] * O[n, c, p], one thread per position.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    isa_delta_kernel(const T* __restrict__ O, const T* __restrict__ dO,
                     acc_t<T>* __restrict__ delta, int64_t NHW, int64_t Cv, int64_t HW) {
  using A = acc_t<T>;
  const int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (p >= NHW) return;
  const int64_t base = (p / HW) * Cv * HW + p % HW;
  A sum = A(0);
  for (int64_t c = 0; c < Cv; ++c)
    sum += to_acc<A>(O[base + c * HW]) * to_acc<A>(dO[base + c * HW]);
  delta[p] = sum;
}

enum BwdMode : int { kGradQ = 0, kGradK = 1, kGradV = 2 };

// One chunk of M channels of dQ, dK or dV for a tile of own rows (queries for dQ, keys for
// dK / dV), looping over the group's other tiles (keys for dQ, queries for dK / dV):
//   dQ[:, i] = scale sum_j P_ij (dP_ij - delta_i) K[:, j]
//   dK[:, j] = scale sum_i P_ij (dP_ij - delta_i) Q[:, i]
//   dV[:, j] =       sum_i P_ij dO[:, i]
// with P_ij = exp(scale q_i.k_j + terms_ij - lse_i), dP_ij = dO_i.v_j. grid (own tiles,
// ceil(C_out / M)). dQ with a non-null GBIAS: chunk 0 also adds dS_ij = P_ij (dP_ij - delta_i)
// into GBIAS[n % nb, i, j].
template <typename T, int MODE, bool kTerms>
__global__ void __launch_bounds__(kThreads, 2)
    isa_backward_kernel(const T* __restrict__ Q, const T* __restrict__ K,
                        const T* __restrict__ V, const T* __restrict__ dO,
                        const acc_t<T>* __restrict__ LSE, const acc_t<T>* __restrict__ DELTA,
                        T* __restrict__ OUT, Geom g, acc_t<T> scale, LogitTerms<T> terms,
                        acc_t<T>* __restrict__ GBIAS) {
  using A = acc_t<T>;
  constexpr int M = TileCfg<T>::M, D = TileCfg<T>::D, TM = M / 16;
  constexpr bool kTC = UseWmma<T>::value;
  constexpr int PLD = M + 16, ULD = M + 1, HLD = M + 8;
  // ubuf: the logit operands (2 x D x M), the multiplied tile (M x ULD values, or for tensor
  // cores two M x HLD tiles of T: the tile and the probabilities), the output staging.
  constexpr int UBUF = (2 * D * M > M * HLD) ? 2 * D * M : M * HLD;
  __shared__ Rows<M> own, oth;
  __shared__ __align__(32) A ubuf[UBUF];
  __shared__ __align__(32) A ps[M * PLD];  // probabilities (SIMT) / fp32 staging (tensor cores)
  T* const ms_h = reinterpret_cast<T*>(ubuf);  // tensor cores: multiplied tile, M x HLD
  T* const ph = ms_h + M * HLD;                // tensor cores: probabilities, M x HLD
  __shared__ A st_lse[M], st_delta[M];  // statistics of the query-side rows

  // own-side / other-side tensors of the two products, the multiplied tensor, output channels
  const T* X1 = MODE == kGradQ ? Q : K;   // own, Ck
  const T* Y1 = MODE == kGradQ ? K : Q;   // other, Ck
  const T* X2 = MODE == kGradQ ? dO : V;  // own, Cv
  const T* Y2 = MODE == kGradQ ? V : dO;  // other, Cv
  const T* Mt = MODE == kGradQ ? K : (MODE == kGradK ? Q : dO);
  const int64_t Cm = MODE == kGradV ? g.Cv : g.Ck;
  const A out_scale = MODE == kGradV ? A(1) : scale;
  constexpr bool kBiasGrad = kTerms && MODE == kGradQ;  // adds dS into GBIAS (when set)

  __shared__ int64_t lines[2][M];  // kTerms: fill_term_lines

  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t c0 = int64_t(blockIdx.y) * M;
  int64_t tile, start;
  own_tile(g, blockIdx.x, M, tile, start);
  fill_rows<M>(own, g, tile, start);
  if constexpr (kTerms) fill_term_lines<MODE == kGradQ>(lines, terms, g, own);

  A acc[TM][TM];
#pragma unroll
  for (int a = 0; a < TM; ++a)
#pragma unroll
    for (int b = 0; b < TM; ++b) acc[a][b] = A(0);

  for (int64_t t = 0; t < g.MT; ++t) {
    __syncthreads();  // the previous tile is done with oth, st_*, ubuf, ps (and own is filled)
    fill_rows<M>(oth, g, tile, g.packed ? 0 : t * M);
    __syncthreads();
    const Rows<M>& qrows = MODE == kGradQ ? own : oth;
    if (MODE != kGradQ || t == 0) {
      for (int r = threadIdx.x; r < M; r += kThreads) {
        A l = A(0), d = A(0);
        if (qrows.ng[r] >= 0) {
          const int64_t off = qrows.n[r] * g.HW + qrows.pix[r];
          l = LSE[off];
          d = DELTA[off];
        }
        st_lse[r] = l;
        st_delta[r] = d;
      }
    }
    A s[TM][TM], dp[TM][TM];
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
      for (int b = 0; b < TM; ++b) s[a][b] = dp[a][b] = A(0);
    // (both end with a barrier; the first also publishes st_*)
    if constexpr (kTC) {
      tile_dot_wmma<T, M, D, PLD>(s, ms_h, ps, X1, own, Y1, oth, g.Ck, g.HW);
      if (MODE != kGradV)
        tile_dot_wmma<T, M, D, PLD>(dp, ms_h, ps, X2, own, Y2, oth, g.Cv, g.HW);
    } else {
      tile_dot<T, M, D>(s, ubuf, X1, own, Y1, oth, g.Ck, g.HW);
      if (MODE != kGradV) tile_dot<T, M, D>(dp, ubuf, X2, own, Y2, oth, g.Cv, g.HW);
    }
    if constexpr (kTerms) {  // into ps, free until the probabilities are written
      stage_terms<MODE == kGradQ, T, M, PLD>(ps, terms, lines, g, own, oth);
      __syncthreads();
    }

#pragma unroll
    for (int a = 0; a < TM; ++a) {
      const int i = ty + 16 * a;
      const int64_t ngi = own.ng[i];
#pragma unroll
      for (int b = 0; b < TM; ++b) {
        const int j = tx + 16 * b;
        const int64_t ngj = oth.ng[j];
        const int q = MODE == kGradQ ? i : j;  // the query of the pair (i own, j other)
        A v = A(0);
        if (ngj >= 0 && ngj == ngi) {
          A logit = s[a][b] * scale;
          if constexpr (kTerms) logit += ps[i * PLD + j];
          const A p = acc_exp(logit - st_lse[q]);
          v = MODE == kGradV ? p : p * (dp[a][b] - st_delta[q]);
        }
        if constexpr (kTC) {
          ph[i * HLD + j] = from_acc<T>(v);
          if constexpr (kBiasGrad) ps[i * PLD + j] = v;  // dS in full precision
        } else {
          ps[i * PLD + j] = v;
        }
      }
    }
    // the multiplied tensor's other-side rows, row-major (row x channel), channels c0 .. c0 + M
    if constexpr (kTC)
      load_tile<M, M>(ms_h, HLD, 1, Mt, Cm, g.HW, oth, c0);
    else
      load_tile<M, M>(ubuf, ULD, 1, Mt, Cm, g.HW, oth, c0);
    __syncthreads();
    if constexpr (kBiasGrad) {
      if (GBIAS != nullptr && blockIdx.y == 0)
        add_bias_grads<T, M, PLD>(GBIAS, ps, lines, own, oth);
      if constexpr (kTC) __syncthreads();  // ps is the tensor-core staging next
    }
    if constexpr (kTC)
      tile_pv_wmma<T, M, HLD, PLD>(acc, ph, ms_h, ps, tx, ty);
    else
      tile_pv<A, M, PLD, ULD>(acc, ps, ubuf, tx, ty);
  }

  A mul[TM];
#pragma unroll
  for (int a = 0; a < TM; ++a) mul[a] = out_scale;
  store_tile<T, M>(OUT, Cm, g.HW, own, c0, ubuf, acc, mul, tx, ty);
}

// ------------------------------------------------------------------------------ launchers
bool make_geom(const IsaShape& s, Geom& g, int M) {
  if (s.N <= 0 || s.Ck <= 0 || s.Cv <= 0 || s.H <= 0 || s.W <= 0 || s.ph <= 0 || s.pw <= 0)
    return false;
  if (s.H % s.ph != 0 || s.W % s.pw != 0) return false;
  const int64_t inner = s.ph * s.pw, outer = (s.H / s.ph) * (s.W / s.pw);
  g.G = s.long_range ? inner : outer;
  g.L = s.long_range ? outer : inner;
  g.NG = s.N * g.G;
  g.Ck = s.Ck;
  g.Cv = s.Cv;
  g.HW = s.H * s.W;
  g.W = s.W;
  g.GW = s.W / s.pw;
  g.PH = s.ph;
  g.PW = s.pw;
  g.long_range = s.long_range;
  int64_t lp = 1;
  while (lp < g.L) lp *= 2;
  g.LP = lp;
  g.packed = 2 * lp <= M;
  g.MT = g.packed ? 1 : (g.L + M - 1) / M;
  return true;
}

// Number of own tiles (grid x).
int64_t own_tiles(const Geom& g, int M) {
  return g.packed ? (g.NG + M / g.LP - 1) / (M / g.LP) : g.NG * g.MT;
}

bool grid_ok(int64_t x, int64_t y) { return x >= 1 && x <= kMaxGridX && y >= 1 && y <= kMaxGridYZ; }

// The logit terms of a call (IsaShape), or false when their counts cannot index the groups.
template <typename T>
bool make_terms(const IsaShape& s, const Geom& g, const void* bias, const void* mask,
                LogitTerms<T>& terms) {
  terms = {static_cast<const T*>(bias), static_cast<const T*>(mask), s.nb, s.nm};
  if (bias != nullptr && (s.nb <= 0 || s.N % s.nb != 0)) return false;
  return mask == nullptr || (s.nm > 0 && g.G % s.nm == 0);
}

// Members per group of a shape whose block size divides the map (else 0).
int64_t members(const IsaShape& s) {
  if (s.ph <= 0 || s.pw <= 0 || s.H % s.ph != 0 || s.W % s.pw != 0) return 0;
  return s.long_range ? (s.H / s.ph) * (s.W / s.pw) : s.ph * s.pw;
}

// The backward's workspace: delta = <dO, O> per position and, with a bias, the accumulation-
// dtype sums of its gradient.
template <typename A> struct BackwardScratch {
  A* delta;
  A* bias_sums;
  int64_t bias_count;
};

template <typename A>
BackwardScratch<A> carve_scratch(const IsaBackwardParams& p, WorkspaceCarver& ws) {
  const IsaShape& s = p.shape;
  const int64_t bias_count = p.bias != nullptr ? s.nb * members(s) * members(s) : 0;
  A* delta = ws.take<A>(s.N * s.H * s.W);
  return {delta, bias_count > 0 ? ws.take<A>(bias_count) : nullptr, bias_count};
}

template <typename T, bool kTerms>
cudaError_t run_forward(const IsaForwardParams& p, const Geom& g, const LogitTerms<T>& terms,
                        int64_t gx, int64_t gy, cudaStream_t stream) {
  using A = acc_t<T>;
  isa_forward_kernel<T, kTerms><<<dim3(unsigned(gx), unsigned(gy)), kThreads, 0, stream>>>(
      static_cast<const T*>(p.query), static_cast<const T*>(p.key),
      static_cast<const T*>(p.value), static_cast<T*>(p.out), static_cast<A*>(p.lse), g,
      static_cast<A>(p.shape.scale), terms);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_forward(const IsaForwardParams& p, cudaStream_t stream) {
  constexpr int M = TileCfg<T>::M;
  Geom g;
  LogitTerms<T> terms;
  if (!make_geom(p.shape, g, M) || !make_terms(p.shape, g, p.bias, p.mask, terms))
    return cudaErrorInvalidValue;
  const int64_t gx = own_tiles(g, M), gy = (g.Cv + M - 1) / M;
  if (!grid_ok(gx, gy)) return cudaErrorInvalidValue;
  if (p.bias != nullptr || p.mask != nullptr)
    return run_forward<T, true>(p, g, terms, gx, gy, stream);
  return run_forward<T, false>(p, g, terms, gx, gy, stream);
}

// grad_bias = its accumulation-dtype sums, in T.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    isa_grad_bias_kernel(const acc_t<T>* __restrict__ sums, T* __restrict__ grad_bias,
                         int64_t count) {
  const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e < count) grad_bias[e] = from_acc<T>(sums[e]);
}

// The dQ, dK, dV launches (delta is ready; with a bias its sums are zeroed).
template <typename T, bool kTerms>
cudaError_t run_backward(const IsaBackwardParams& p, const Geom& g, const LogitTerms<T>& terms,
                         const BackwardScratch<acc_t<T>>& scratch, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int M = TileCfg<T>::M;
  const int64_t gx = own_tiles(g, M);
  const dim3 grid_k(unsigned(gx), unsigned((g.Ck + M - 1) / M));
  const dim3 grid_v(unsigned(gx), unsigned((g.Cv + M - 1) / M));
  const T* Q = static_cast<const T*>(p.query);
  const T* K = static_cast<const T*>(p.key);
  const T* V = static_cast<const T*>(p.value);
  const T* dO = static_cast<const T*>(p.grad_out);
  const A* lse = static_cast<const A*>(p.lse);
  const A scale = static_cast<A>(p.shape.scale);
  isa_backward_kernel<T, kGradQ, kTerms><<<grid_k, kThreads, 0, stream>>>(
      Q, K, V, dO, lse, scratch.delta, static_cast<T*>(p.grad_query), g, scale, terms,
      scratch.bias_sums);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  isa_backward_kernel<T, kGradK, kTerms><<<grid_k, kThreads, 0, stream>>>(
      Q, K, V, dO, lse, scratch.delta, static_cast<T*>(p.grad_key), g, scale, terms, nullptr);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  isa_backward_kernel<T, kGradV, kTerms><<<grid_v, kThreads, 0, stream>>>(
      Q, K, V, dO, lse, scratch.delta, static_cast<T*>(p.grad_value), g, scale, terms, nullptr);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const IsaBackwardParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int M = TileCfg<T>::M;
  Geom g;
  LogitTerms<T> terms;
  if (!make_geom(p.shape, g, M) || !make_terms(p.shape, g, p.bias, p.mask, terms))
    return cudaErrorInvalidValue;
  if (p.workspace == nullptr || (p.bias != nullptr && p.grad_bias == nullptr))
    return cudaErrorInvalidValue;
  const int64_t nhw = p.shape.N * g.HW;
  const int64_t gx = own_tiles(g, M);
  const int64_t gy_k = (g.Ck + M - 1) / M, gy_v = (g.Cv + M - 1) / M;
  const int64_t bias_blocks = (p.bias != nullptr ? p.shape.nb * g.L * g.L : 0) / kThreads + 1;
  if (!grid_ok((nhw + kThreads - 1) / kThreads, 1) || !grid_ok(gx, gy_k) || !grid_ok(gx, gy_v) ||
      !grid_ok(bias_blocks, 1))
    return cudaErrorInvalidValue;
  WorkspaceCarver ws{p.workspace};
  const BackwardScratch<A> scratch = carve_scratch<A>(p, ws);

  isa_delta_kernel<T><<<unsigned((nhw + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(p.out), static_cast<const T*>(p.grad_out), scratch.delta, nhw, g.Cv,
      g.HW);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (p.bias == nullptr && p.mask == nullptr)
    return run_backward<T, false>(p, g, terms, scratch, stream);
  if (scratch.bias_count > 0) {
    err = cudaMemsetAsync(scratch.bias_sums, 0, size_t(scratch.bias_count) * sizeof(A), stream);
    if (err != cudaSuccess) return err;
  }
  if ((err = run_backward<T, true>(p, g, terms, scratch, stream)) != cudaSuccess) return err;
  if (scratch.bias_count == 0) return cudaSuccess;
  isa_grad_bias_kernel<T><<<unsigned(bias_blocks), kThreads, 0, stream>>>(
      scratch.bias_sums, static_cast<T*>(p.grad_bias), scratch.bias_count);
  return cudaGetLastError();
}

}  // namespace

cudaError_t interlaced_sparse_attention_forward(const IsaForwardParams& p, cudaStream_t stream) {
  SEGOPS_CUDA_DISPATCH(p.shape.dtype, return launch_forward<scalar_t>(p, stream));
  return cudaErrorInvalidValue;
}

size_t interlaced_sparse_attention_forward_workspace_bytes(const IsaForwardParams&) { return 0; }

size_t interlaced_sparse_attention_backward_workspace_bytes(const IsaBackwardParams& p) {
  if (p.shape.N * p.shape.H * p.shape.W <= 0) return 0;
  return workspace_size(p.shape.dtype,
                        [&](WorkspaceCarver& ws, auto a) { carve_scratch<decltype(a)>(p, ws); });
}

cudaError_t interlaced_sparse_attention_backward(const IsaBackwardParams& p, cudaStream_t stream) {
  SEGOPS_CUDA_DISPATCH(p.shape.dtype, return launch_backward<scalar_t>(p, stream));
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace segops
