// Criss-cross attention (docs/operators.md §2.1), CUDA forward and backward (SIMT, all four dtypes).
//
// The algorithm of csrc/cpu/criss_cross_attention.cpp and segops/triton/criss_cross_attention.py:
// every position u attends to its row and its column (centre once) with one joint softmax over the
// H + W - 1 positions. Every kernel here is a "line" kernel: the positions of one line (a row, or a
// column) against the positions of the same line. A row is read straight from the NCHW tensors; a
// column is read from H/W-transposed copies (N, C, W, H) the launcher makes in the workspace, so
// both passes load along contiguous memory. Results are written through the NCHW ("out") geometry.
//
// Saved statistics (N, 2, H, W) in the accumulation type A (fp64 for fp64, else fp32): the maximum
// energy m and log l, l = sum exp(e - m); P = exp((e - m) - log l). The energies are recomputed by
// one routine (tile_dot: channel chunks of kChan in ascending order, one fma per channel), so the
// forward's statistics pass, its output pass and the backward see the same energies.
//
// Forward:  stats  column pass (centre masked) writes (m, log l) of the column;
//           stats  row pass merges the row into them (the joint softmax statistics);
//           out    column pass: column part of out into an A-typed buffer (out itself for fp32/64);
//           out    row pass: out = row part + column part, stored in T.
// Backward: D[u] = <dout[:, u], out[:, u]>; dS = P * (dP - D), dP = <dout[:, u], v[:, i]>;
//           column pass: dq, dk, dv column parts into A-typed buffers (the outputs for fp32/64);
//           row pass: row parts plus the column parts, stored in T. No atomics, deterministic.
//
// Tiles: 256 threads; B x B tiles of a line (B = 64, 32 for fp64); channels staged through shared
// memory kChan at a time as A. Thread t owns, in a dot-product tile, rows t/16 + 16i and columns
// t%16 + 16j; in an accumulator tile, line positions t%16 + 16i and channels t/16 + 16j (so the
// stores along a row are contiguous).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "segops/cuda/criss_cross_attention.h"
#include "segops/cuda/device_utils.cuh"
#include "segops/cuda/tile_dot.cuh"

namespace segops {
namespace cuda {
namespace {

constexpr int kThreads = kTileThreads;  // every kernel but the transpose
constexpr int kChan = 16;      // channels staged per shared-memory chunk in tile_dot

template <typename T> struct Tile { static constexpr int B = 64; };
template <> struct Tile<double> { static constexpr int B = 32; };

template <typename A> __device__ __forceinline__ A amax(A a, A b) { return a > b ? a : b; }
__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Merge the softmax partial (m2, l2) into (m, l) (l relative to m; m = -inf means empty).
template <typename A>
__device__ __forceinline__ void merge_partial(A& m, A& l, A m2, A l2) {
  const A M = amax(m, m2);
  const A a = m == neg_inf<A>() ? A(0) : l * acc_exp(m - M);
  const A b = m2 == neg_inf<A>() ? A(0) : l2 * acc_exp(m2 - M);
  m = M;
  l = a + b;
}

// One line direction. Inputs (q, k, v, dout: "in" geometry) and results, statistics, D ("out"
// geometry, always NCHW) address element e of line r, channel c of sample n as
// n * C * HW + c * HW + r * ls + e * es.
struct Geom {
  int64_t Ck, Cv, HW;
  int64_t R, L;            // lines per sample, line length
  int64_t in_ls, in_es;    // input line / element strides
  int64_t out_ls, out_es;  // output line / element strides
};

// Element e of channel c of a line tile starting at `base` (channel 0, first element) lies at
// c * HW + e * es; elements from `n` on read as zero.
template <typename T, typename A>
struct LineLoader {
  const T* __restrict__ base;
  int n;
  int64_t HW, es;
  __device__ __forceinline__ A operator()(int64_t c, int e) const {
    return e < n ? to_acc<A>(base[c * HW + static_cast<int64_t>(e) * es]) : A(0);
  }
};

// s[i][j] = sum_c a[c, t/16 + 16 i] * b[c, t%16 + 16 j] over C channels of two line tiles of
// na and nb elements (staged_tile_dot, the summation every kernel shares).
template <int B, typename T, typename A>
__device__ __forceinline__ void tile_dot(A (&s)[B / 16][B / 16], const T* __restrict__ a, int na,
                                         const T* __restrict__ b, int nb, int64_t C, int64_t HW,
                                         int64_t es, A* __restrict__ As, A* __restrict__ Bs) {
#pragma unroll
  for (int i = 0; i < B / 16; ++i) {
#pragma unroll
    for (int j = 0; j < B / 16; ++j) s[i][j] = A(0);
  }
  staged_tile_dot<B / 16, kChan, 4, Staging::kPaired>(s, C, LineLoader<T, A>{a, na, HW, es},
                                 LineLoader<T, A>{b, nb, HW, es}, As, Bs);
}

// Softmax statistics of one line direction. Block: B positions of one line (grid x = N * nrt * R,
// line index fastest); it runs over the line's keys in blocks of B, keeping per (thread, position)
// a running max and sum, then merges the 16 partials of a position (the threads t%16 = 0..15 of a
// half warp). kMerge = false (column pass): writes (m, log l) of the column, (-inf, -inf) when the
// column is empty (H == 1). kMerge = true (row pass): merges the row into the stored column
// statistics and writes the joint (m, log l).
template <typename T, bool kMaskCentre, bool kMerge>
__global__ void __launch_bounds__(kThreads)
    cca_stats_kernel(const T* __restrict__ q, const T* __restrict__ k, acc_t<T>* __restrict__ st,
                     Geom g) {
  using A = acc_t<T>;
  constexpr int B = Tile<T>::B, TN = B / 16;
  __shared__ A As[kChan * B];
  __shared__ A Bs[kChan * B];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t nrt = (g.L + B - 1) / B;
  int64_t bid = blockIdx.x;
  const int64_t r = bid % g.R;
  bid /= g.R;
  const int64_t rt = bid % nrt;
  const int64_t n = bid / nrt;
  const int64_t p0 = rt * B;
  const int np = static_cast<int>(imin(B, g.L - p0));
  const int64_t in_base = n * g.Ck * g.HW + r * g.in_ls;
  const T* qa = q + in_base + p0 * g.in_es;

  A m[TN], l[TN];
#pragma unroll
  for (int i = 0; i < TN; ++i) {
    m[i] = neg_inf<A>();
    l[i] = A(0);
  }
  for (int64_t k0 = 0; k0 < g.L; k0 += B) {
    const int nk = static_cast<int>(imin(B, g.L - k0));
    A s[TN][TN];
    tile_dot<B>(s, qa, np, k + in_base + k0 * g.in_es, nk, g.Ck, g.HW, g.in_es, As, Bs);
#pragma unroll
    for (int i = 0; i < TN; ++i) {
      const int64_t p = p0 + ty + 16 * i;
      bool valid[TN];
      A bm = neg_inf<A>();
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int kl = tx + 16 * j;
        valid[j] = kl < nk && !(kMaskCentre && k0 + kl == p);
        if (valid[j]) bm = amax(bm, s[i][j]);
      }
      if (bm != neg_inf<A>()) {
        const A mn = amax(m[i], bm);
        A sum = m[i] == neg_inf<A>() ? A(0) : l[i] * acc_exp(m[i] - mn);
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          if (valid[j]) sum += acc_exp(s[i][j] - mn);
        }
        m[i] = mn;
        l[i] = sum;
      }
    }
  }
  // Merge the partials of the 16 threads holding the same positions (lanes differing in bits 0-3).
#pragma unroll
  for (int i = 0; i < TN; ++i) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {
      const A m2 = __shfl_xor_sync(0xffffffffu, m[i], o);
      const A l2 = __shfl_xor_sync(0xffffffffu, l[i], o);
      merge_partial(m[i], l[i], m2, l2);
    }
  }
  if (tx != 0) return;
#pragma unroll
  for (int i = 0; i < TN; ++i) {
    const int pl = ty + 16 * i;
    if (pl >= np) continue;
    const int64_t so = n * 2 * g.HW + r * g.out_ls + (p0 + pl) * g.out_es;
    A mm = m[i], ll = l[i];
    if (kMerge) {
      const A mc = st[so], lc = st[so + g.HW];  // column statistics (m, log l)
      const A M = amax(mm, mc);
      const A a = mm == neg_inf<A>() ? A(0) : ll * acc_exp(mm - M);
      const A b = mc == neg_inf<A>() ? A(0) : acc_exp((mc - M) + lc);
      mm = M;
      ll = a + b;
    }
    st[so] = mm;
    st[so + g.HW] = acc_log(ll);  // log(0) = -inf for an empty set (then mm = -inf too)
  }
}

enum class Mode { kOut, kDq, kDk, kDv };

template <typename T>
struct LineArgs {
  const T* q;                // in geometry, Ck channels
  const T* k;                // in geometry, Ck channels
  const T* v;                // in geometry, Cv channels
  const T* g;                // dout, in geometry, Cv channels (backward)
  const acc_t<T>* st;        // statistics (N, 2, H, W), out geometry
  const acc_t<T>* D;         // (N, H, W), out geometry (backward)
  acc_t<T>* part;            // column part of the result (X channels, out geometry): written by
                             // the column pass, read by the row pass (may alias dst if T == A)
  T* dst;                    // final result (row pass)
  Geom geo;
  int64_t X;                 // channels of the result: Cv (out, dv) or Ck (dq, dk)
  int64_t nxt;               // ceil(X / B)
};

// One line direction of one result (kMode):
//   kOut: out[c, p] = sum_key P[p, key] v[c, key]         rows = positions, reduce over keys
//   kDq:  dq[c, p]  = sum_key dS[p, key] k[c, key]        rows = positions, reduce over keys
//   kDk:  dk[c, key] = sum_p dS[p, key] q[c, p]           rows = keys, reduce over positions
//   kDv:  dv[c, key] = sum_p P[p, key] dout[c, p]         rows = keys, reduce over positions
// with P = exp((e - m[p]) - logl[p]), dS = P (dP - D[p]), e = <q[:, p], k[:, key]>, dP = <dout[:, p],
// v[:, key]>, zero at the centre (p == key) when kMaskCentre. Block: B rows of one line and B
// result channels (grid x = N * nrt * R * nxt, channel tile fastest, then line). Per block of B
// reduction positions: energies (and dP) into registers by tile_dot, the weights into Ws
// [reduction][row], the right-hand side into Rs [reduction][channel], then the product into the
// accumulator. kFinal = false: part = acc; kFinal = true: dst = T(acc + part).
template <typename T, Mode kMode, bool kMaskCentre, bool kFinal>
__global__ void __launch_bounds__(kThreads) cca_line_kernel(LineArgs<T> a) {
  using A = acc_t<T>;
  constexpr int B = Tile<T>::B, TN = B / 16, BP1 = B + 1;
  constexpr bool kPixRows = kMode == Mode::kOut || kMode == Mode::kDq;
  constexpr bool kGrad = kMode == Mode::kDq || kMode == Mode::kDk;
  __shared__ A As[kChan * B];
  __shared__ A Bs[kChan * B];
  __shared__ A Ws[B * BP1];
  __shared__ A Rs[B * BP1];
  __shared__ A Pm[B], Pl[B], Pd[B];  // statistics (and D) of the positions of the tile

  const Geom& g = a.geo;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t nrt = (g.L + B - 1) / B;
  int64_t bid = blockIdx.x;
  const int64_t xt = bid % a.nxt;
  bid /= a.nxt;
  const int64_t r = bid % g.R;
  bid /= g.R;
  const int64_t rt = bid % nrt;
  const int64_t n = bid / nrt;
  const int64_t row0 = rt * B, x0 = xt * B;
  const int nrow = static_cast<int>(imin(B, g.L - row0));
  const int64_t HW = g.HW;
  const int64_t ck_base = n * g.Ck * HW + r * g.in_ls;  // q, k
  const int64_t cv_base = n * g.Cv * HW + r * g.in_ls;  // v, dout
  const int64_t st_base = n * 2 * HW + r * g.out_ls;
  const int64_t d_base = n * HW + r * g.out_ls;

  // Statistics of line positions e0 .. e0 + ne - 1 into Pm, Pl, Pd.
  auto load_pos = [&](int64_t e0, int ne) {
    for (int t = tid; t < B; t += kThreads) {
      A mm = A(0), ll = A(0), dd = A(0);
      if (t < ne) {
        const int64_t off = (e0 + t) * g.out_es;
        mm = a.st[st_base + off];
        ll = a.st[st_base + HW + off];
        if (kGrad) dd = a.D[d_base + off];
      }
      Pm[t] = mm;
      Pl[t] = ll;
      Pd[t] = dd;
    }
  };
  if (kPixRows) load_pos(row0, nrow);

  const T* rhs;
  const T* rows_a;
  if (kMode == Mode::kOut) {
    rhs = a.v + cv_base;
  } else if (kMode == Mode::kDq) {
    rhs = a.k + ck_base;
  } else if (kMode == Mode::kDk) {
    rhs = a.q + ck_base;
  } else {
    rhs = a.g + cv_base;
  }
  rows_a = (kPixRows ? a.q : a.k) + ck_base + row0 * g.in_es;

  A acc[TN][TN];
#pragma unroll
  for (int i = 0; i < TN; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = A(0);
  }
  for (int64_t e0 = 0; e0 < g.L; e0 += B) {
    const int ne = static_cast<int>(imin(B, g.L - e0));
    if (!kPixRows) load_pos(e0, ne);  // the previous iteration ended with a barrier
    __syncthreads();
    A s[TN][TN];
    tile_dot<B>(s, rows_a, nrow, (kPixRows ? a.k : a.q) + ck_base + e0 * g.in_es, ne, g.Ck, HW,
                g.in_es, As, Bs);
    A dp[TN][TN];
    if (kGrad) {
      if (kPixRows) {
        tile_dot<B>(dp, a.g + cv_base + row0 * g.in_es, nrow, a.v + cv_base + e0 * g.in_es, ne,
                    g.Cv, HW, g.in_es, As, Bs);
      } else {
        tile_dot<B>(dp, a.v + cv_base + row0 * g.in_es, nrow, a.g + cv_base + e0 * g.in_es, ne,
                    g.Cv, HW, g.in_es, As, Bs);
      }
    }
    // Weights: thread owns rows ty + 16 i, reduction positions tx + 16 j.
#pragma unroll
    for (int i = 0; i < TN; ++i) {
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int rl = ty + 16 * i, el = tx + 16 * j;
        const int pl = kPixRows ? rl : el;  // which one is the position (query side)
        const bool valid = rl < nrow && el < ne && !(kMaskCentre && row0 + rl == e0 + el);
        A w = A(0);
        if (valid) {
          w = acc_exp((s[i][j] - Pm[pl]) - Pl[pl]);
          if (kGrad) w *= dp[i][j] - Pd[pl];
        }
        Ws[el * BP1 + rl] = w;
      }
    }
    // Right-hand side: Rs[e][x] = rhs[x0 + x, e0 + e] (zero outside).
    for (int idx = tid; idx < B * B; idx += kThreads) {
      const int el = idx % B, xl = idx / B;
      A val = A(0);
      if (el < ne && x0 + xl < a.X) val = to_acc<A>(rhs[(x0 + xl) * HW + (e0 + el) * g.in_es]);
      Rs[el * BP1 + xl] = val;
    }
    __syncthreads();
    // acc[i][j] += sum_e Ws[e][tx + 16 i] Rs[e][ty + 16 j].
    accumulate_outer<B, 4>(acc, Strided<A>{Ws, BP1, 1}, tx, Strided<A>{Rs, BP1, 1}, ty);
    __syncthreads();
  }
  // Store: line position row0 + tx + 16 i, channel x0 + ty + 16 j.
#pragma unroll
  for (int i = 0; i < TN; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int rl = tx + 16 * i;
      const int64_t c = x0 + ty + 16 * j;
      if (rl >= nrow || c >= a.X) continue;
      const int64_t off = (n * a.X + c) * HW + r * g.out_ls + (row0 + rl) * g.out_es;
      if (kFinal) {
        a.dst[off] = from_acc<T>(acc[i][j] + a.part[off]);
      } else {
        a.part[off] = acc[i][j];
      }
    }
  }
}

// D[n, s] = sum_c dout[n, c, s] out[n, c, s] in A; one thread per (n, s).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    cca_dot_kernel(const T* __restrict__ go, const T* __restrict__ out, acc_t<T>* __restrict__ D,
                   int64_t N, int64_t C, int64_t HW) {
  using A = acc_t<T>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= N * HW) return;
  const int64_t n = i / HW, s = i % HW;
  const int64_t base = n * C * HW + s;
  A acc = A(0);
  for (int64_t c = 0; c < C; ++c) {
    acc = acc_fma(to_acc<A>(go[base + c * HW]), to_acc<A>(out[base + c * HW]), acc);
  }
  D[i] = acc;
}

// (planes, H, W) -> (planes, W, H), on raw bits (U of the element's size). Block 32 x 8, one
// 32 x 32 tile per block (grid x = planes * ceil(H/32) * ceil(W/32)).
template <typename U>
__global__ void __launch_bounds__(256)
    cca_transpose_kernel(const U* __restrict__ src, U* __restrict__ dst, int64_t H, int64_t W) {
  __shared__ U tile[32][33];
  const int64_t ntw = (W + 31) / 32, nth = (H + 31) / 32;
  int64_t bid = blockIdx.x;
  const int64_t tw = bid % ntw;
  bid /= ntw;
  const int64_t th = bid % nth;
  const int64_t pl = bid / nth;
  const U* s = src + pl * H * W;
  U* d = dst + pl * H * W;
  {
    const int64_t x = tw * 32 + threadIdx.x;
    for (int yy = threadIdx.y; yy < 32; yy += 8) {
      const int64_t y = th * 32 + yy;
      if (y < H && x < W) tile[yy][threadIdx.x] = s[y * W + x];
    }
  }
  __syncthreads();
  {
    const int64_t y = th * 32 + threadIdx.x;
    for (int xx = threadIdx.y; xx < 32; xx += 8) {
      const int64_t x = tw * 32 + xx;
      if (x < W && y < H) d[x * H + y] = tile[threadIdx.x][xx];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// The column parts go straight into the outputs when the storage type is the accumulation type.
inline bool needs_part_buffers(DType t) { return t == DType::kFloat16 || t == DType::kBFloat16; }

inline bool grid_ok(int64_t blocks) { return blocks >= 0 && blocks <= kMaxGridX; }

inline cudaError_t transpose(const void* src, void* dst, int64_t planes, int64_t H, int64_t W,
                             size_t elem, cudaStream_t stream) {
  const int64_t blocks = planes * ((H + 31) / 32) * ((W + 31) / 32);
  if (blocks == 0) return cudaSuccess;
  if (!grid_ok(blocks)) return cudaErrorInvalidValue;
  const dim3 block(32, 8);
  const unsigned grid = static_cast<unsigned>(blocks);
  if (elem == 2) {
    cca_transpose_kernel<uint16_t><<<grid, block, 0, stream>>>(
        static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), H, W);
  } else if (elem == 4) {
    cca_transpose_kernel<uint32_t><<<grid, block, 0, stream>>>(
        static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), H, W);
  } else if (elem == 8) {
    cca_transpose_kernel<unsigned long long><<<grid, block, 0, stream>>>(
        static_cast<const unsigned long long*>(src), static_cast<unsigned long long*>(dst), H, W);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Column geometry over the transposed (N, C, W, H) inputs, row geometry over the NCHW inputs.
inline Geom col_geom(const CcaShape& s) {
  const int64_t H = s.H, W = s.W;
  return Geom{s.Ck, s.Cv, H * W, /*R=*/W, /*L=*/H, /*in_ls=*/H, /*in_es=*/1, /*out_ls=*/1, /*out_es=*/W};
}
inline Geom row_geom(const CcaShape& s) {
  const int64_t H = s.H, W = s.W;
  return Geom{s.Ck, s.Cv, H * W, /*R=*/H, /*L=*/W, /*in_ls=*/W, /*in_es=*/1, /*out_ls=*/W, /*out_es=*/1};
}

template <typename T, bool kMaskCentre, bool kMerge>
cudaError_t launch_stats(const T* q, const T* k, acc_t<T>* st, const Geom& g, int64_t N,
                         cudaStream_t stream) {
  constexpr int B = Tile<T>::B;
  const int64_t blocks = N * ((g.L + B - 1) / B) * g.R;
  if (blocks == 0) return cudaSuccess;
  if (!grid_ok(blocks)) return cudaErrorInvalidValue;
  cca_stats_kernel<T, kMaskCentre, kMerge>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(q, k, st, g);
  return cudaGetLastError();
}

template <typename T, Mode kMode, bool kMaskCentre, bool kFinal>
cudaError_t launch_line(LineArgs<T> a, int64_t N, int64_t X, cudaStream_t stream) {
  constexpr int B = Tile<T>::B;
  a.X = X;
  a.nxt = (X + B - 1) / B;
  const int64_t blocks = N * ((a.geo.L + B - 1) / B) * a.geo.R * a.nxt;
  if (blocks == 0) return cudaSuccess;
  if (!grid_ok(blocks)) return cudaErrorInvalidValue;
  cca_line_kernel<T, kMode, kMaskCentre, kFinal>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

#define SEGOPS_CCA_TRY(expr)                  \
  do {                                        \
    const cudaError_t err_ = (expr);          \
    if (err_ != cudaSuccess) return err_;     \
  } while (0)

// Workspace: transposed (N, C, W, H) copies of query, key, value for the column passes and,
// for float16 / bfloat16, accumulation-type buffers for the column parts of the results.
struct Transposed {
  void *q, *k, *v;
};

inline Transposed carve_transposed(const CcaShape& s, WorkspaceCarver& c) {
  const size_t es = dtype_size(s.dtype);
  return {c.take_bytes(static_cast<size_t>(s.N * s.Ck * s.H * s.W) * es),
          c.take_bytes(static_cast<size_t>(s.N * s.Ck * s.H * s.W) * es),
          c.take_bytes(static_cast<size_t>(s.N * s.Cv * s.H * s.W) * es)};
}

// A column-part buffer of `channels` channels (null when the results take the parts directly).
inline void* carve_part(const CcaShape& s, int64_t channels, WorkspaceCarver& c) {
  if (!needs_part_buffers(s.dtype)) return nullptr;
  return c.take_bytes(static_cast<size_t>(s.N * channels * s.H * s.W) * acc_size(s.dtype));
}

struct FwdBuffers {
  Transposed t;
  void* part;
};

inline FwdBuffers carve_forward(const CcaForwardParams& p, WorkspaceCarver& c) {
  const Transposed t = carve_transposed(p.shape, c);
  return {t, carve_part(p.shape, p.shape.Cv, c)};
}

struct BwdBuffers {
  Transposed t;
  void *D, *gt, *pq, *pk, *pv;
};

inline BwdBuffers carve_backward(const CcaBackwardParams& p, WorkspaceCarver& c) {
  const CcaShape& s = p.shape;
  BwdBuffers b{};
  b.t = carve_transposed(s, c);
  b.D = c.take_bytes(static_cast<size_t>(s.N * s.H * s.W) * acc_size(s.dtype));
  b.gt = c.take_bytes(static_cast<size_t>(s.N * s.Cv * s.H * s.W) * dtype_size(s.dtype));
  b.pq = carve_part(s, s.Ck, c);
  b.pk = carve_part(s, s.Ck, c);
  b.pv = carve_part(s, s.Cv, c);
  return b;
}

// Points `a` at one pass's operands: the column pass reads the transposed copies (col_geom), the
// row pass the NCHW tensors (row_geom); g (dout) only in the backward.
template <typename T>
void set_pass(LineArgs<T>& a, const T* q, const T* k, const T* v, const T* g, const Geom& geo) {
  a.q = q;
  a.k = k;
  a.v = v;
  a.g = g;
  a.geo = geo;
}

// Fills the transposed copies of query, key, value.
template <typename T>
cudaError_t transpose_inputs(const CcaShape& s, const T* q, const T* k, const T* v,
                             const Transposed& t, cudaStream_t stream) {
  SEGOPS_CCA_TRY(transpose(q, t.q, s.N * s.Ck, s.H, s.W, sizeof(T), stream));
  SEGOPS_CCA_TRY(transpose(k, t.k, s.N * s.Ck, s.H, s.W, sizeof(T), stream));
  return transpose(v, t.v, s.N * s.Cv, s.H, s.W, sizeof(T), stream);
}

inline bool dims_ok(const CcaShape& s) {
  return s.N >= 0 && s.Ck >= 0 && s.Cv >= 0 && s.H >= 0 && s.W >= 0;
}

template <typename T>
cudaError_t forward_typed(const CcaForwardParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  WorkspaceCarver carve{p.workspace};
  const FwdBuffers wb = carve_forward(p, carve);
  const T* q = static_cast<const T*>(p.query);
  const T* k = static_cast<const T*>(p.key);
  const T* v = static_cast<const T*>(p.value);
  T* out = static_cast<T*>(p.out);
  A* st = static_cast<A*>(p.stats);
  SEGOPS_CCA_TRY(transpose_inputs(p.shape, q, k, v, wb.t, stream));
  const T* qt = static_cast<const T*>(wb.t.q);
  const T* kt = static_cast<const T*>(wb.t.k);
  const Geom gc = col_geom(p.shape), gr = row_geom(p.shape);
  // Statistics: column, then the row merged in.
  SEGOPS_CCA_TRY((launch_stats<T, true, false>(qt, kt, st, gc, p.shape.N, stream)));
  SEGOPS_CCA_TRY((launch_stats<T, false, true>(q, k, st, gr, p.shape.N, stream)));
  // Output: column part (into the fp32 buffer, or out itself when T == A), then row part + it.
  A* part = wb.part != nullptr ? static_cast<A*>(wb.part) : reinterpret_cast<A*>(out);
  LineArgs<T> a{};
  a.st = st;
  a.part = part;
  a.dst = out;
  set_pass<T>(a, qt, kt, static_cast<const T*>(wb.t.v), nullptr, gc);
  SEGOPS_CCA_TRY((launch_line<T, Mode::kOut, true, false>(a, p.shape.N, p.shape.Cv, stream)));
  set_pass<T>(a, q, k, v, nullptr, gr);
  SEGOPS_CCA_TRY((launch_line<T, Mode::kOut, false, true>(a, p.shape.N, p.shape.Cv, stream)));
  return cudaSuccess;
}

template <typename T>
cudaError_t backward_typed(const CcaBackwardParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  WorkspaceCarver carve{p.workspace};
  const BwdBuffers wb = carve_backward(p, carve);
  const T* go = static_cast<const T*>(p.grad_out);
  const T* q = static_cast<const T*>(p.query);
  const T* k = static_cast<const T*>(p.key);
  const T* v = static_cast<const T*>(p.value);
  const T* out = static_cast<const T*>(p.out);
  const A* st = static_cast<const A*>(p.stats);
  T* dq = static_cast<T*>(p.grad_query);
  T* dk = static_cast<T*>(p.grad_key);
  T* dv = static_cast<T*>(p.grad_value);
  A* D = static_cast<A*>(wb.D);
  const int64_t HW = p.shape.H * p.shape.W;
  {
    const int64_t blocks = (p.shape.N * HW + kThreads - 1) / kThreads;
    if (!grid_ok(blocks)) return cudaErrorInvalidValue;
    if (blocks > 0) {
      cca_dot_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(go, out, D, p.shape.N,
                                                                                  p.shape.Cv, HW);
      SEGOPS_CCA_TRY(cudaGetLastError());
    }
  }
  SEGOPS_CCA_TRY(transpose_inputs(p.shape, q, k, v, wb.t, stream));
  SEGOPS_CCA_TRY(transpose(go, wb.gt, p.shape.N * p.shape.Cv, p.shape.H, p.shape.W, sizeof(T), stream));
  const bool own = wb.pq != nullptr;
  A* pq = own ? static_cast<A*>(wb.pq) : reinterpret_cast<A*>(dq);
  A* pk = own ? static_cast<A*>(wb.pk) : reinterpret_cast<A*>(dk);
  A* pv = own ? static_cast<A*>(wb.pv) : reinterpret_cast<A*>(dv);
  const Geom gc = col_geom(p.shape), gr = row_geom(p.shape);
  LineArgs<T> a{};
  a.st = st;
  a.D = D;
  // Column pass on the transposed copies, into the column-part buffers.
  set_pass(a, static_cast<const T*>(wb.t.q), static_cast<const T*>(wb.t.k),
           static_cast<const T*>(wb.t.v), static_cast<const T*>(wb.gt), gc);
  a.part = pq;
  SEGOPS_CCA_TRY((launch_line<T, Mode::kDq, true, false>(a, p.shape.N, p.shape.Ck, stream)));
  a.part = pk;
  SEGOPS_CCA_TRY((launch_line<T, Mode::kDk, true, false>(a, p.shape.N, p.shape.Ck, stream)));
  a.part = pv;
  SEGOPS_CCA_TRY((launch_line<T, Mode::kDv, true, false>(a, p.shape.N, p.shape.Cv, stream)));
  // Row pass on the NCHW tensors: row part + column part -> the gradients.
  set_pass(a, q, k, v, go, gr);
  a.part = pq;
  a.dst = dq;
  SEGOPS_CCA_TRY((launch_line<T, Mode::kDq, false, true>(a, p.shape.N, p.shape.Ck, stream)));
  a.part = pk;
  a.dst = dk;
  SEGOPS_CCA_TRY((launch_line<T, Mode::kDk, false, true>(a, p.shape.N, p.shape.Ck, stream)));
  a.part = pv;
  a.dst = dv;
  SEGOPS_CCA_TRY((launch_line<T, Mode::kDv, false, true>(a, p.shape.N, p.shape.Cv, stream)));
  return cudaSuccess;
}

}  // namespace

size_t criss_cross_attention_forward_workspace_bytes(const CcaForwardParams& p) {
  if (!dims_ok(p.shape)) return 0;
  WorkspaceCarver c;
  carve_forward(p, c);
  return c.used;
}

size_t criss_cross_attention_backward_workspace_bytes(const CcaBackwardParams& p) {
  if (!dims_ok(p.shape)) return 0;
  WorkspaceCarver c;
  carve_backward(p, c);
  return c.used;
}

cudaError_t criss_cross_attention_forward(const CcaForwardParams& p, cudaStream_t stream) {
  if (!dims_ok(p.shape)) return cudaErrorInvalidValue;
  if (p.shape.N * p.shape.H * p.shape.W == 0) return cudaSuccess;
  if (p.workspace == nullptr && criss_cross_attention_forward_workspace_bytes(p) > 0) {
    return cudaErrorInvalidValue;
  }
  SEGOPS_CUDA_DISPATCH(p.shape.dtype, return forward_typed<scalar_t>(p, stream));
  return cudaSuccess;
}

cudaError_t criss_cross_attention_backward(const CcaBackwardParams& p, cudaStream_t stream) {
  if (!dims_ok(p.shape)) return cudaErrorInvalidValue;
  if (p.shape.N * p.shape.H * p.shape.W == 0) return cudaSuccess;
  if (p.workspace == nullptr && criss_cross_attention_backward_workspace_bytes(p) > 0) {
    return cudaErrorInvalidValue;
  }
  SEGOPS_CUDA_DISPATCH(p.shape.dtype, return backward_typed<scalar_t>(p, stream));
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace segops
