// QCO texture histograms (docs/operators.md §2.5, STLNet): qco_1d / qco_2d and texture_reconstruct, CUDA
// forward and backward. A port of csrc/cpu/qco.cpp: the same saved tensors (hist, levels, sim,
// rnorm, mean, stats), the same band rule (three candidates round(u) − 1 .. round(u) + 1 around
// u = (sim − L_0)/Δ, tested with |L − sim| < Δ), the 1e-6 histogram epsilon, gradient through
// min/max split evenly between ties. No dense encoding is built: no (N, P, K) and no
// (N, K, K, h, w) tensor. Histograms are per-warp copies in shared memory (or, when they do not
// fit, in a per-block slice of the workspace), filled lane by lane and summed in warp order: no
// atomics anywhere, every output is bitwise reproducible.
//
// The levels L_k = (2k+1)/(2K)·(hi − lo) + lo are computed with explicitly rounded operations
// (no FMA contraction), so the forward's band decisions, the levels it returns and the
// backward's recomputation agree bit for bit (and with the CPU formula).
//
// qco forward (R = grid² regions per sample, hw pixels per region):
//   1. region_sum_kernel    one block per (n, r, c): mean[n, r, c] = Σ x / hw
//   2. mean_norm_kernel     one block per (n, r): gn = mean / max(|mean|, 1e-12)
//   3. similarity_kernel    32 pixels × 8 channel slices per block: sim, rnorm
//   4. region_hist_kernel   one block per (n, r): lo/hi, levels, the (co-occurrence) histogram,
//                           its normalisation, stats
// qco backward:
//   1. region_grad_kernel   one block per (n, r): d(sim) through E (and both pairs for qco_2d), the
//                           levels' gradient, ties at min/max -> per-pixel coefficients a, b
//   2. region_sum_kernel    dgn[n, r, c] = Σ a_i x_i
//   3. mean_norm_kernel     gn and dg = d(mean) through the normalisation, / hw
//   4. input_grad_kernel    gx = a_i gn − b_i x_i + dg
// texture_reconstruct: per-sample lo/hi (lohi_kernel), then per pixel the ≤ 2 features it hits;
// the backward's d(features) and the levels' gradient are per-(n, c) histograms weighted by
// grad_out (recon_feat_kernel) and a small reduction over channels (recon_glev_kernel).
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "segops/cuda/device_utils.cuh"
#include "segops/cuda/qco.h"

namespace segops {
namespace cuda {
namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's eps
constexpr double kHistEps = 1e-6;   // histogram normaliser (docs/operators.md §2.5)

constexpr int kRegionThreads = 512;   // region kernels (one block per region)
constexpr int kRegionWarps = kRegionThreads / 32;
constexpr int kSumThreads = 256;      // region_sum / mean_norm / lohi
constexpr int kSumWarps = kSumThreads / 32;
constexpr int kPixTile = 32;          // similarity / recon-gsim: pixels per block (x)
constexpr int kChanSlices = 8;        // ... channel slices per block (y)
constexpr int kElemThreads = 256;     // elementwise kernels: pixels per block
constexpr int kElemChannels = 32;     // ... channels per block
constexpr size_t kSmemBinsMax = 40 * 1024;  // dynamic shared memory for histogram bins (<48 KiB
                                            // in total with the static reduction scratch)

extern __shared__ __align__(16) unsigned char qco_dyn_smem[];

// ----------------------------------------------------------------------------------------------
// small device helpers
// ----------------------------------------------------------------------------------------------
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float abs_acc(float a) { return fabsf(a); }
__device__ __forceinline__ double abs_acc(double a) { return fabs(a); }
__device__ __forceinline__ float sqrt_acc(float a) { return sqrtf(a); }
__device__ __forceinline__ double sqrt_acc(double a) { return sqrt(a); }

// L_i = (2i+1)/(2K)·(hi − lo) + lo, evaluated as the CPU does, without contraction.
template <typename A>
__device__ __forceinline__ A level_value(int i, int k, A lo, A hi) {
  const A c = A(2 * i + 1) / A(2 * static_cast<int64_t>(k));
  return add_rn(mul_rn(c, sub_rn(hi, lo)), lo);
}

// The (up to) three levels a pixel can hit: m − 1 + j for j < 3.
template <typename A>
struct Enc {
  int m;
  A w[3];   // E (0 outside the band or the level range)
  A sg[3];  // dE/dsim = sign(L − sim) inside the band, else 0
};

// `lev(i)` returns level i (0 <= i < k). Same arithmetic as the CPU's encode().
template <typename A, typename LevelFn>
__device__ __forceinline__ Enc<A> encode(A sim, const LevelFn& lev, int k, A delta) {
  Enc<A> e;
  e.m = 0;
#pragma unroll
  for (int j = 0; j < 3; ++j) e.w[j] = e.sg[j] = A(0);
  if (!(delta > A(0))) return e;  // constant region: no pixel is in any band
  const A q = (sim - lev(0)) / delta;
  double u = rint(static_cast<double>(q));  // round half to even, as std::nearbyint
  if (!(u >= 0.0)) u = 0.0;                 // also NaN
  if (u > static_cast<double>(k - 1)) u = static_cast<double>(k - 1);
  e.m = static_cast<int>(u);
#pragma unroll
  for (int j = 0; j < 3; ++j) {
    const int l = e.m - 1 + j;
    if (l < 0 || l >= k) continue;
    const A diff = lev(l) - sim;
    const A d = abs_acc(diff);
    if (d < delta) {
      e.w[j] = A(1) - d;
      e.sg[j] = diff > A(0) ? A(1) : (diff < A(0) ? A(-1) : A(0));
    }
  }
  return e;
}

template <typename A>
__device__ __forceinline__ A warp_min_acc(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u < v ? u : v;
  }
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max_acc(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

// Block-wide reductions (NT threads, a multiple of 32): every thread gets the result; the
// partials are combined in a fixed order (deterministic). Must be reached by all threads.
template <int NT, typename A>
__device__ __forceinline__ A block_sum(A v) {
  __shared__ A red[NT / 32];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  if (lane == 0) red[wid] = v;
  __syncthreads();
  A tot = red[0];
#pragma unroll
  for (int i = 1; i < NT / 32; ++i) tot += red[i];
  __syncthreads();
  return tot;
}

template <int NT, typename A>
__device__ __forceinline__ void block_min_max(A& lo, A& hi) {
  __shared__ A rlo[NT / 32];
  __shared__ A rhi[NT / 32];
  lo = warp_min_acc(lo);
  hi = warp_max_acc(hi);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  if (lane == 0) {
    rlo[wid] = lo;
    rhi[wid] = hi;
  }
  __syncthreads();
  lo = rlo[0];
  hi = rhi[0];
#pragma unroll
  for (int i = 1; i < NT / 32; ++i) {
    lo = rlo[i] < lo ? rlo[i] : lo;
    hi = rhi[i] > hi ? rhi[i] : hi;
  }
  __syncthreads();
}

constexpr unsigned kFull = 0xffffffffu;

template <typename V>
__device__ __forceinline__ V bcast(V v, int src) {
  return __shfl_sync(kFull, v, src);
}

template <typename A>
__device__ __forceinline__ A pick3(int j, A a0, A a1, A a2) {
  return j == 0 ? a0 : (j == 1 ? a1 : a2);
}

// Deterministic histograms: every warp owns a private copy of the bins (`nwarps` copies of `nb`
// bins, warp w at w·nb). A warp adds its 32 pixels' contributions lane by lane (each lane's
// values broadcast with shuffles, the <= 9 distinct bins of one pixel written by distinct
// lanes), so each bin receives its terms in pixel order; the copies are then summed in warp
// order (bin_total). No atomics, bitwise reproducible. All 32 lanes of a warp must take part.
template <typename A>
__device__ __forceinline__ A bin_total(const A* bins, int64_t nb, int nwarps, int64_t i) {
  A v = bins[i];
  for (int w = 1; w < nwarps; ++w) v += bins[w * nb + i];
  return v;
}

// Adds w[j] to wbins[m − 1 + j] (j < 3, levels in [0, k), zero values skipped) for every lane's
// (m, w), in lane order.
template <typename A>
__device__ __forceinline__ void warp_add3(A* wbins, int k, int m, A w0, A w1, A w2) {
  const int lane = threadIdx.x & 31;
  for (int src = 0; src < 32; ++src) {
    const int ms = bcast(m, src);
    const A v0 = bcast(w0, src), v1 = bcast(w1, src), v2 = bcast(w2, src);
    if (lane < 3) {
      const int l = ms - 1 + lane;
      const A v = pick3(lane, v0, v1, v2);
      if (l >= 0 && l < k && v != A(0)) wbins[l] += v;
    }
    __syncwarp();
  }
}

// Geometry of the regions: sample-flat pixel index of region-local pixel t of region (ry, rx).
struct Geo {
  int64_t c, w, p, s, r, bh, bw;
  int hw;  // bh * bw (checked to fit in int by the launchers)
  __device__ __forceinline__ int64_t origin(int64_t rr) const {
    return (rr / s) * bh * w + (rr % s) * bw;
  }
  __device__ __forceinline__ int64_t pixel(int64_t org, int t) const {
    if (s == 1) return t;  // one region: the whole image, row-major
    const int ty = t / static_cast<int>(bw);
    const int tx = t - ty * static_cast<int>(bw);
    return org + static_cast<int64_t>(ty) * w + tx;
  }
  // region of a sample-flat pixel index
  __device__ __forceinline__ int64_t region_of(int64_t pix) const {
    if (s == 1) return 0;
    const int64_t y = pix / w, x = pix - y * w;
    return (y / bh) * s + x / bw;
  }
};

// ----------------------------------------------------------------------------------------------
// qco kernels
// ----------------------------------------------------------------------------------------------
// out[(n·R + r)·C + c] = Σ_{i in region r} x[n, c, i] · (weight ? weight[n, i] : 1) (/ hw).
// One block per output element; weight rows are `weight_stride` apart per sample.
template <typename T, typename A, int NT>
__global__ void __launch_bounds__(NT)
region_sum_kernel(const T* __restrict__ x, const A* __restrict__ weight, int64_t weight_stride,
                  A* __restrict__ out, Geo g, bool divide) {
  const int64_t b = blockIdx.x;
  const int64_t ci = b % g.c, nr = b / g.c;
  const int64_t ni = nr / g.r, rr = nr % g.r;
  const T* row = x + (ni * g.c + ci) * g.p;
  const A* wrow = weight ? weight + ni * weight_stride : nullptr;
  const int64_t org = g.origin(rr);
  A acc = A(0);
  for (int t = threadIdx.x; t < g.hw; t += NT) {
    const int64_t pix = g.pixel(org, t);
    A v = to_acc<A>(row[pix]);
    if (wrow) v *= wrow[pix];
    acc += v;
  }
  acc = block_sum<NT>(acc);
  if (threadIdx.x == 0) out[b] = divide ? acc / A(g.hw) : acc;
}

// One block per (n, r) row of C means: gn = mean / max(|mean|, eps). With dgn (backward) also
// dg = (clamped ? dgn / den : (dgn − gn·<gn, dgn>) / den) / hw.
template <typename A, int NT>
__global__ void __launch_bounds__(NT)
mean_norm_kernel(const A* __restrict__ mean, const A* __restrict__ dgn, A* __restrict__ gn,
                 A* __restrict__ dg, int64_t c, A hw) {
  const int64_t b = blockIdx.x;
  const A* mv = mean + b * c;
  A sq = A(0);
  for (int64_t i = threadIdx.x; i < c; i += NT) sq += mv[i] * mv[i];
  sq = block_sum<NT>(sq);
  const A nrm = sqrt_acc(sq);
  const bool clamped = nrm < A(kNormEps);
  const A den = clamped ? A(kNormEps) : nrm;
  A proj = A(0);
  for (int64_t i = threadIdx.x; i < c; i += NT) {
    const A v = mv[i] / den;
    gn[b * c + i] = v;
    if (dgn) proj += v * dgn[b * c + i];
  }
  if (!dgn) return;
  proj = block_sum<NT>(proj);
  for (int64_t i = threadIdx.x; i < c; i += NT) {
    const A d = dgn[b * c + i];
    const A v = mv[i] / den;
    const A dgc = clamped ? d / den : (d - v * proj) / den;
    dg[b * c + i] = dgc / hw;
  }
}

// sim = <x_i, gn_r(i)> / max(|x_i|, eps), rnorm = ±1 / max(|x_i|, eps) (negative when clamped).
// Block (kPixTile, kChanSlices): 32 consecutive pixels of one sample, channels split in 8 slices.
template <typename T, typename A>
__global__ void __launch_bounds__(kPixTile* kChanSlices)
similarity_kernel(const T* __restrict__ x, const A* __restrict__ gn, A* __restrict__ sim,
                  A* __restrict__ rnorm, Geo g, int64_t pix_blocks) {
  __shared__ A sdot[kChanSlices][kPixTile];
  __shared__ A ssq[kChanSlices][kPixTile];
  const int64_t ni = blockIdx.x / pix_blocks;
  const int64_t p = (blockIdx.x % pix_blocks) * kPixTile + threadIdx.x;
  A dot = A(0), sq = A(0);
  if (p < g.p) {
    const A* gr = gn + (ni * g.r + g.region_of(p)) * g.c;
    for (int64_t ci = threadIdx.y; ci < g.c; ci += kChanSlices) {
      const A v = to_acc<A>(x[(ni * g.c + ci) * g.p + p]);
      dot += v * gr[ci];
      sq += v * v;
    }
  }
  sdot[threadIdx.y][threadIdx.x] = dot;
  ssq[threadIdx.y][threadIdx.x] = sq;
  __syncthreads();
  if (threadIdx.y == 0 && p < g.p) {
    dot = sdot[0][threadIdx.x];
    sq = ssq[0][threadIdx.x];
#pragma unroll
    for (int i = 1; i < kChanSlices; ++i) {
      dot += sdot[i][threadIdx.x];
      sq += ssq[i][threadIdx.x];
    }
    const A nrm = sqrt_acc(sq);
    const bool clamped = nrm < A(kNormEps);
    const A den = clamped ? A(kNormEps) : nrm;
    sim[ni * g.p + p] = dot / den;
    rnorm[ni * g.p + p] = clamped ? -(A(1) / den) : A(1) / den;
  }
}

// One block per (n, r): lo/hi, levels, the (co-occurrence) histogram, its normalisation, stats.
// Bins (NT/32 per-warp copies of nb): dynamic shared memory when use_smem, else the region's
// slice of gbins.
template <typename A, int NT>
__global__ void __launch_bounds__(NT)
region_hist_kernel(const A* __restrict__ sim, A* __restrict__ hist, A* __restrict__ levels,
                   A* __restrict__ stats, A* __restrict__ gbins, Geo g, int k, bool cooc,
                   bool use_smem) {
  const int64_t nr = blockIdx.x;
  const int64_t ni = nr / g.r, rr = nr % g.r;
  const int64_t org = g.origin(rr);
  const A* sn = sim + ni * g.p;
  const int64_t nb = cooc ? static_cast<int64_t>(k) * k : k;
  constexpr int kWarps = NT / 32;
  A* bins = use_smem ? reinterpret_cast<A*>(qco_dyn_smem) : gbins + nr * kWarps * nb;

  A lo = sn[g.pixel(org, 0)], hi = lo;
  for (int t = threadIdx.x; t < g.hw; t += NT) {
    const A v = sn[g.pixel(org, t)];
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  block_min_max<NT>(lo, hi);
  const A delta = (hi - lo) / A(k);
  auto lev = [&](int i) { return level_value<A>(i, k, lo, hi); };

  for (int64_t i = threadIdx.x; i < k; i += NT) levels[nr * k + i] = lev(static_cast<int>(i));
  for (int64_t i = threadIdx.x; i < kWarps * nb; i += NT) bins[i] = A(0);
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  A* wbins = bins + warp * nb;
  // warp-uniform loop: lane t = t0 + lane, lanes past the region contribute nothing
  for (int t0 = warp * 32; t0 < g.hw; t0 += NT) {
    const int t = t0 + lane;
    Enc<A> e, q;
    e.m = q.m = 0;
#pragma unroll
    for (int j = 0; j < 3; ++j) e.w[j] = e.sg[j] = q.w[j] = q.sg[j] = A(0);
    if (t < g.hw) {
      const int64_t pix = g.pixel(org, t);
      if (!cooc) {
        e = encode(sn[pix], lev, k, delta);
      } else {
        const int ty = t / static_cast<int>(g.bw), tx = t - ty * static_cast<int>(g.bw);
        if (ty + 1 < g.bh && tx + 1 < g.bw) {  // pair (pixel, its (+1, +1) neighbour)
          e = encode(sn[pix], lev, k, delta);
          q = encode(sn[pix + g.w + 1], lev, k, delta);
        }
      }
    }
    if (!cooc) {
      warp_add3(wbins, k, e.m, e.w[0], e.w[1], e.w[2]);
    } else {
      // lane j·3 + jj (< 9) adds the pair of levels (a, b) = (m_e − 1 + j, m_q − 1 + jj)
      const int j = lane / 3, jj = lane - 3 * (lane / 3);
      for (int src = 0; src < 32; ++src) {
        const int me = bcast(e.m, src), mq = bcast(q.m, src);
        const A e0 = bcast(e.w[0], src), e1 = bcast(e.w[1], src), e2 = bcast(e.w[2], src);
        const A q0 = bcast(q.w[0], src), q1 = bcast(q.w[1], src), q2 = bcast(q.w[2], src);
        if (lane < 9) {
          const int a = me - 1 + j, bq = mq - 1 + jj;
          const A wa = pick3(j, e0, e1, e2), wq = pick3(jj, q0, q1, q2);
          if (a >= 0 && a < k && bq >= 0 && bq < k && wa != A(0) && wq != A(0))
            wbins[static_cast<int64_t>(a) * k + bq] += wa * wq;
        }
        __syncwarp();
      }
    }
  }
  __syncthreads();
  A part = A(0);
  for (int64_t i = threadIdx.x; i < nb; i += NT) part += bin_total(bins, nb, kWarps, i);
  const A total = block_sum<NT>(part);
  const A den = total + A(kHistEps);
  for (int64_t i = threadIdx.x; i < nb; i += NT)
    hist[nr * nb + i] = bin_total(bins, nb, kWarps, i) / den;
  if (threadIdx.x == 0) {
    stats[nr * 3 + 0] = lo;
    stats[nr * 3 + 1] = hi;
    stats[nr * 3 + 2] = total;
  }
}

// One block per (n, r): each pixel's d(sim) through E (and, for qco_2d, through both pairs it is
// part of), the levels' gradient (bins, shared memory or gbins), the ties at min/max; writes the
// per-pixel coefficients coef[n, 0, i] = a = gsim·r and coef[n, 1, i] = b = gsim·r²·sim (0 where
// the norm was clamped). The grid (N·R blocks) is usually smaller than the GPU, so a second
// resident block per SM gains nothing: asking for one lets ptxas use the registers it needs
// (88 for fp32) instead of spilling 48-56 B at the 64 its own choice allowed.
template <typename A, int NT>
__global__ void __launch_bounds__(NT, 1)
region_grad_kernel(const A* __restrict__ grad_hist, const A* __restrict__ grad_levels,
                   const A* __restrict__ grad_sim, const A* __restrict__ hist,
                   const A* __restrict__ sim, const A* __restrict__ rnorm,
                   const A* __restrict__ stats, A* __restrict__ coef, A* __restrict__ gbins, Geo g,
                   int k, bool cooc, bool use_smem) {
  const int64_t nr = blockIdx.x;
  const int64_t ni = nr / g.r, rr = nr % g.r;
  const int64_t org = g.origin(rr);
  const A* sn = sim + ni * g.p;
  const A lo = stats[nr * 3 + 0], hi = stats[nr * 3 + 1], total = stats[nr * 3 + 2];
  const A delta = (hi - lo) / A(k);
  auto lev = [&](int i) { return level_value<A>(i, k, lo, hi); };

  // d(hist)/d(unnormalised histogram): dh = (gh − <gh, hist>) / (total + eps)
  const int64_t kk = cooc ? static_cast<int64_t>(k) * k : k;
  const A* gh = grad_hist + nr * kk;  // qco_1d has R = 1, so nr = n
  const A* hh = hist + nr * kk;
  A part = A(0);
  for (int64_t i = threadIdx.x; i < kk; i += NT) part += gh[i] * hh[i];
  const A dot = block_sum<NT>(part);
  const A den = total + A(kHistEps);
  // dh of levels (a, b) (or a), 0 outside the level range (the CPU's zero padding)
  auto dh2 = [&](int a, int b) {
    return (a >= 0 && a < k && b >= 0 && b < k) ? (gh[static_cast<int64_t>(a) * k + b] - dot) / den
                                                : A(0);
  };

  constexpr int kWarps = NT / 32;
  A* bins = use_smem ? reinterpret_cast<A*>(qco_dyn_smem) : gbins + nr * kWarps * k;
  for (int64_t i = threadIdx.x; i < kWarps * static_cast<int64_t>(k); i += NT) bins[i] = A(0);
  __syncthreads();

  A* ca = coef + ni * 2 * g.p;
  A* cb = ca + g.p;
  long long cnt_min = 0, cnt_max = 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // warp-uniform loop; lane t = t0 + lane (= threadIdx.x + i·NT, as in the loop further down)
  for (int t0 = warp * 32; t0 < g.hw; t0 += NT) {
    const int t = t0 + lane;
    int m = 0;
    A v3[3] = {A(0), A(0), A(0)};
    if (t < g.hw) {
      const int64_t pix = g.pixel(org, t);
      const A sv = sn[pix];
      const Enc<A> e = encode(sv, lev, k, delta);
      A de[3] = {A(0), A(0), A(0)};
      if (!cooc) {
#pragma unroll
        for (int j = 0; j < 3; ++j) {
          const int l = e.m - 1 + j;
          de[j] = (l >= 0 && l < k) ? (gh[l] - dot) / den : A(0);
        }
      } else {
        const int ty = t / static_cast<int>(g.bw), tx = t - ty * static_cast<int>(g.bw);
        if (ty + 1 < g.bh && tx + 1 < g.bw) {  // pixel as the left element of a pair
          const Enc<A> q = encode(sn[pix + g.w + 1], lev, k, delta);
#pragma unroll
          for (int j = 0; j < 3; ++j) {
            const int a = e.m - 1 + j;
            de[j] += dh2(a, q.m - 1) * q.w[0] + dh2(a, q.m) * q.w[1] + dh2(a, q.m + 1) * q.w[2];
          }
        }
        if (ty > 0 && tx > 0) {  // pixel as the right element
          const Enc<A> o = encode(sn[pix - g.w - 1], lev, k, delta);
#pragma unroll
          for (int j = 0; j < 3; ++j) {
            const int a = e.m - 1 + j;
#pragma unroll
            for (int jj = 0; jj < 3; ++jj) de[j] += dh2(o.m - 1 + jj, a) * o.w[jj];
          }
        }
      }
      A gs = grad_sim ? grad_sim[ni * g.p + pix] : A(0);
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        v3[j] = de[j] * e.sg[j];
        gs += v3[j];
      }
      m = e.m;
      ca[pix] = gs;  // partial; ties added below (read back by this same thread)
      cnt_min += sv == lo;
      cnt_max += sv == hi;
    }
    warp_add3(bins + warp * static_cast<int64_t>(k), k, m, v3[0], v3[1], v3[2]);
  }
  __syncthreads();  // bins complete
  const long long nmin = block_sum<NT>(cnt_min);
  const long long nmax = block_sum<NT>(cnt_max);
  // levels: L = c·(hi − lo) + lo; dE/dL = −sign(L − sim), hence gl − bins
  const A* gl = grad_levels + nr * k;
  A glo = A(0), ghi = A(0);
  for (int64_t i = threadIdx.x; i < k; i += NT) {
    const A gtot = gl[i] - bin_total(bins, k, kWarps, i);
    const A c = A(2 * i + 1) / A(2 * static_cast<int64_t>(k));
    ghi += c * gtot;
    glo += gtot - c * gtot;
  }
  glo = block_sum<NT>(glo);
  ghi = block_sum<NT>(ghi);
  const A wlo = glo / A(nmin > 1 ? nmin : 1);
  const A whi = ghi / A(nmax > 1 ? nmax : 1);
  for (int t = threadIdx.x; t < g.hw; t += NT) {
    const int64_t pix = g.pixel(org, t);
    const A sv = sn[pix];
    A gs = ca[pix];
    if (sv == lo) gs += wlo;
    if (sv == hi) gs += whi;
    const A rs = rnorm[ni * g.p + pix];
    const A r = abs_acc(rs);
    ca[pix] = gs * r;
    cb[pix] = rs < A(0) ? A(0) : gs * r * r * sv;
  }
}

// gx[n, c, i] = a_i · gn[n, r(i), c] − b_i · x[n, c, i] + dg[n, r(i), c].
// Block: kElemThreads pixels × kElemChannels channels of one sample.
template <typename T, typename A>
__global__ void __launch_bounds__(kElemThreads)
input_grad_kernel(const T* __restrict__ x, const A* __restrict__ coef, const A* __restrict__ gn,
                  const A* __restrict__ dg, T* __restrict__ gx, Geo g, int64_t pix_blocks,
                  int64_t chan_blocks) {
  const int64_t b = blockIdx.x;
  const int64_t cb = b % chan_blocks, rest = b / chan_blocks;
  const int64_t pb = rest % pix_blocks, ni = rest / pix_blocks;
  const int64_t p = pb * kElemThreads + threadIdx.x;
  if (p >= g.p) return;
  const A a = coef[ni * 2 * g.p + p];
  const A bb = coef[ni * 2 * g.p + g.p + p];
  const int64_t vrow = (ni * g.r + g.region_of(p)) * g.c;
  const int64_t c0 = cb * kElemChannels;
  const int64_t c1 = c0 + kElemChannels < g.c ? c0 + kElemChannels : g.c;
  for (int64_t ci = c0; ci < c1; ++ci) {
    const int64_t off = (ni * g.c + ci) * g.p + p;
    const A v = to_acc<A>(x[off]);
    gx[off] = from_acc<T>(a * gn[vrow + ci] - bb * v + dg[vrow + ci]);
  }
}

// ----------------------------------------------------------------------------------------------
// texture_reconstruct kernels
// ----------------------------------------------------------------------------------------------
// lohi[n] = (min, max) of sim[n] (one block per sample).
template <typename T, typename A, int NT>
__global__ void __launch_bounds__(NT)
lohi_kernel(const T* __restrict__ sim, A* __restrict__ lohi, int64_t p) {
  const int64_t ni = blockIdx.x;
  const T* sn = sim + ni * p;
  A lo = to_acc<A>(sn[0]), hi = lo;
  for (int64_t i = threadIdx.x; i < p; i += NT) {
    const A v = to_acc<A>(sn[i]);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  block_min_max<NT>(lo, hi);
  if (threadIdx.x == 0) {
    lohi[2 * ni] = lo;
    lohi[2 * ni + 1] = hi;
  }
}

template <typename T, typename A>
__device__ __forceinline__ Enc<A> recon_encode(const T* __restrict__ sim,
                                               const T* __restrict__ levels,
                                               const A* __restrict__ lohi, int64_t ni, int64_t p,
                                               int64_t np, int k) {
  const A delta = (lohi[2 * ni + 1] - lohi[2 * ni]) / A(k);
  const T* lv = levels + ni * k;
  auto lev = [&](int i) { return to_acc<A>(lv[i]); };
  return encode(to_acc<A>(sim[ni * np + p]), lev, k, delta);
}

// out[n, c, i] = Σ_j E_j(i) · f[n, c, m − 1 + j]. Block: kElemThreads pixels × kElemChannels.
template <typename T, typename A>
__global__ void __launch_bounds__(kElemThreads)
recon_forward_kernel(const T* __restrict__ sim, const T* __restrict__ levels,
                     const T* __restrict__ features, const A* __restrict__ lohi,
                     T* __restrict__ out, int64_t np, int64_t cf, int k, int64_t pix_blocks,
                     int64_t chan_blocks) {
  const int64_t b = blockIdx.x;
  const int64_t cb = b % chan_blocks, rest = b / chan_blocks;
  const int64_t pb = rest % pix_blocks, ni = rest / pix_blocks;
  const int64_t p = pb * kElemThreads + threadIdx.x;
  if (p >= np) return;
  const Enc<A> e = recon_encode(sim, levels, lohi, ni, p, np, k);
  const int64_t c0 = cb * kElemChannels;
  const int64_t c1 = c0 + kElemChannels < cf ? c0 + kElemChannels : cf;
  for (int64_t ci = c0; ci < c1; ++ci) {
    const T* f = features + (ni * cf + ci) * k;
    A o = A(0);
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      const int l = e.m - 1 + j;
      if (l >= 0 && l < k) o += e.w[j] * to_acc<A>(f[l]);
    }
    out[(ni * cf + ci) * np + p] = from_acc<T>(o);
  }
}

// gsim[n, i] = Σ_j sg_j(i) · Σ_c g[n, c, i] · f[n, c, m − 1 + j].
// Block (kPixTile, kChanSlices): 32 pixels, channels split in 8 slices.
template <typename T, typename A>
__global__ void __launch_bounds__(kPixTile* kChanSlices)
recon_gsim_kernel(const T* __restrict__ grad_out, const T* __restrict__ sim,
                  const T* __restrict__ levels, const T* __restrict__ features,
                  const A* __restrict__ lohi, T* __restrict__ grad_sim, int64_t np, int64_t cf,
                  int k, int64_t pix_blocks) {
  __shared__ A sde[3][kChanSlices][kPixTile];
  const int64_t ni = blockIdx.x / pix_blocks;
  const int64_t p = (blockIdx.x % pix_blocks) * kPixTile + threadIdx.x;
  Enc<A> e;
  e.m = 0;
#pragma unroll
  for (int j = 0; j < 3; ++j) e.w[j] = e.sg[j] = A(0);
  A de[3] = {A(0), A(0), A(0)};
  if (p < np) {
    e = recon_encode(sim, levels, lohi, ni, p, np, k);
    for (int64_t ci = threadIdx.y; ci < cf; ci += kChanSlices) {
      const A gv = to_acc<A>(grad_out[(ni * cf + ci) * np + p]);
      const T* f = features + (ni * cf + ci) * k;
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        const int l = e.m - 1 + j;
        if (l >= 0 && l < k) de[j] += gv * to_acc<A>(f[l]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 3; ++j) sde[j][threadIdx.y][threadIdx.x] = de[j];
  __syncthreads();
  if (threadIdx.y == 0 && p < np) {
    A acc = A(0);
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      A d = sde[j][0][threadIdx.x];
#pragma unroll
      for (int i = 1; i < kChanSlices; ++i) d += sde[j][i][threadIdx.x];
      acc += d * e.sg[j];
    }
    grad_sim[ni * np + p] = from_acc<T>(acc);
  }
}

// One block per (n, c): gfeat[n, c, l] = Σ_i g[n, c, i] · E_l(i) and, for the levels' gradient,
// hs[n, c, l] = Σ_i g[n, c, i] · sign_l(i). Bins (NT/32 per-warp copies of 2K): shared memory or
// the block's gbins slice.
template <typename T, typename A, int NT>
__global__ void __launch_bounds__(NT)
recon_feat_kernel(const T* __restrict__ grad_out, const T* __restrict__ sim,
                  const T* __restrict__ levels, const A* __restrict__ lohi,
                  T* __restrict__ grad_features, A* __restrict__ hs, A* __restrict__ gbins,
                  int64_t np, int64_t cf, int k, bool use_smem) {
  const int64_t b = blockIdx.x;  // n · Cf + c
  const int64_t ni = b / cf;
  constexpr int kWarps = NT / 32;
  const int64_t nb = 2 * static_cast<int64_t>(k);  // per warp: k E-weighted, then k sign bins
  A* bins = use_smem ? reinterpret_cast<A*>(qco_dyn_smem) : gbins + b * kWarps * nb;
  for (int64_t i = threadIdx.x; i < kWarps * nb; i += NT) bins[i] = A(0);
  __syncthreads();
  const T* g = grad_out + b * np;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  A* wb = bins + warp * nb;
  for (int64_t p0 = warp * 32; p0 < np; p0 += NT) {  // warp-uniform loop
    const int64_t p = p0 + lane;
    int m = 0;
    A vw[3] = {A(0), A(0), A(0)}, vs[3] = {A(0), A(0), A(0)};
    if (p < np) {
      const Enc<A> e = recon_encode(sim, levels, lohi, ni, p, np, k);
      const A gv = to_acc<A>(g[p]);
      m = e.m;
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        vw[j] = gv * e.w[j];
        vs[j] = gv * e.sg[j];
      }
    }
    // lane j (< 3) adds vw[j] to bin m − 1 + j, lane 3 + j adds vs[j] to the sign bin
    const int j = lane < 3 ? lane : lane - 3;
    for (int src = 0; src < 32; ++src) {
      const int ms = bcast(m, src);
      const A w0 = bcast(vw[0], src), w1 = bcast(vw[1], src), w2 = bcast(vw[2], src);
      const A s0 = bcast(vs[0], src), s1 = bcast(vs[1], src), s2 = bcast(vs[2], src);
      if (lane < 6) {
        const int l = ms - 1 + j;
        const A v = lane < 3 ? pick3(j, w0, w1, w2) : pick3(j, s0, s1, s2);
        if (l >= 0 && l < k && v != A(0)) wb[(lane < 3 ? 0 : k) + l] += v;
      }
      __syncwarp();
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < k; i += NT) {
    grad_features[b * k + i] = from_acc<T>(bin_total(bins, nb, kWarps, i));
    hs[b * k + i] = bin_total(bins, nb, kWarps, k + i);
  }
}

// glev[n, l] = −Σ_c f[n, c, l] · hs[n, c, l] (one thread per (n, l)).
template <typename T, typename A>
__global__ void __launch_bounds__(kElemThreads)
recon_glev_kernel(const T* __restrict__ features, const A* __restrict__ hs,
                  T* __restrict__ grad_levels, int64_t n, int64_t cf, int k) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kElemThreads + threadIdx.x;
  if (idx >= n * k) return;
  const int64_t ni = idx / k, l = idx % k;
  A acc = A(0);
  for (int64_t ci = 0; ci < cf; ++ci) {
    const int64_t off = (ni * cf + ci) * k + l;
    acc += to_acc<A>(features[off]) * hs[off];
  }
  grad_levels[idx] = from_acc<T>(A(0) - acc);
}

// ----------------------------------------------------------------------------------------------
// launchers
// ----------------------------------------------------------------------------------------------
inline cudaError_t last_error() { return cudaGetLastError(); }

// Shared sizes check for qco; fills the geometry.
template <typename P>
bool qco_geometry(const P& p, Geo& g) {
  if (p.shape.N < 0 || p.shape.C < 0 || p.shape.H <= 0 || p.shape.W <= 0 || p.shape.num_levels < 1 || p.shape.grid < 1) return false;
  if (p.shape.H % p.shape.grid != 0 || p.shape.W % p.shape.grid != 0) return false;
  if (!p.shape.cooc && p.shape.grid != 1) return false;
  if (p.shape.num_levels > (p.shape.cooc ? 46340 : INT_MAX / 2)) return false;  // K·K and 2K fit in int
  g.c = p.shape.C;
  g.w = p.shape.W;
  g.p = p.shape.H * p.shape.W;
  g.s = p.shape.grid;
  g.r = p.shape.grid * p.shape.grid;
  g.bh = p.shape.H / p.shape.grid;
  g.bw = p.shape.W / p.shape.grid;
  if (g.bh * g.bw > INT_MAX - 1024) return false;  // region-local pixel indices (+ NT) are int
  g.hw = static_cast<int>(g.bh * g.bw);
  return true;
}

// Bins per region and whether the kRegionThreads/32 per-warp copies fit in shared memory (else
// they are carved from the workspace).
struct RegionBins {
  int64_t count;
  bool in_smem;
  template <typename A> A* carve(int64_t regions, WorkspaceCarver& ws) const {
    return in_smem ? nullptr : ws.take<A>(regions * kRegionWarps * count);
  }
  size_t smem_bytes(size_t acc) const { return in_smem ? kRegionWarps * count * acc : 0; }
};

template <typename P>
RegionBins qco_bins(const P& p, bool forward) {
  const int64_t k = p.shape.num_levels;
  const int64_t count = forward ? (p.shape.cooc ? k * k : k) : k;
  return {count, static_cast<size_t>(kRegionWarps * count) * acc_size(p.shape.dtype) <= kSmemBinsMax};
}

// Workspace slices of each launcher (A: the accumulation type). The *_workspace_bytes functions
// run the same carving with a null base.
template <typename A> struct QcoForwardScratch { A *gn, *gbins; };
template <typename A>
QcoForwardScratch<A> carve_qco_forward(const QcoForwardParams& p, const Geo& g, WorkspaceCarver& ws) {
  const int64_t nr = p.shape.N * g.r;
  return {ws.take<A>(nr * g.c), qco_bins(p, true).template carve<A>(nr, ws)};
}

template <typename A> struct QcoBackwardScratch { A *coef, *gn, *dg, *dgn, *gbins; };
template <typename A>
QcoBackwardScratch<A> carve_qco_backward(const QcoBackwardParams& p, const Geo& g, WorkspaceCarver& ws) {
  const int64_t nr = p.shape.N * g.r;
  // coef, gn, dg, dgn, gbins (braced initialisers run in order)
  return {ws.take<A>(p.shape.N * 2 * g.p), ws.take<A>(nr * g.c), ws.take<A>(nr * g.c),
          ws.take<A>(nr * g.c), qco_bins(p, false).template carve<A>(nr, ws)};
}

template <typename T>
cudaError_t qco_forward_impl(const QcoForwardParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  Geo g;
  if (!qco_geometry(p, g)) return cudaErrorInvalidValue;
  if (p.shape.N == 0) return cudaSuccess;
  const RegionBins bins = qco_bins(p, true);
  const int k = static_cast<int>(p.shape.num_levels);
  const int64_t nr = p.shape.N * g.r;
  const int64_t pix_blocks = cdiv(g.p, kPixTile);
  if (nr * g.c > kMaxGridX || p.shape.N * pix_blocks > kMaxGridX) return cudaErrorInvalidValue;
  if (p.workspace == nullptr) return cudaErrorInvalidValue;
  WorkspaceCarver ws{p.workspace};
  const auto [gn, gbins] = carve_qco_forward<A>(p, g, ws);
  const T* x = static_cast<const T*>(p.x);
  A* mean = static_cast<A*>(p.mean);

  if (g.c > 0) {
    region_sum_kernel<T, A, kSumThreads><<<static_cast<unsigned>(nr * g.c), kSumThreads, 0, stream>>>(
        x, nullptr, 0, mean, g, true);
    if (cudaError_t e = last_error()) return e;
    mean_norm_kernel<A, kSumThreads><<<static_cast<unsigned>(nr), kSumThreads, 0, stream>>>(
        mean, nullptr, gn, nullptr, g.c, A(g.hw));
    if (cudaError_t e = last_error()) return e;
  }
  similarity_kernel<T, A><<<static_cast<unsigned>(p.shape.N * pix_blocks), dim3(kPixTile, kChanSlices),
                            0, stream>>>(x, gn, static_cast<A*>(p.sim), static_cast<A*>(p.rnorm),
                                         g, pix_blocks);
  if (cudaError_t e = last_error()) return e;
  const size_t smem = bins.smem_bytes(sizeof(A));
  region_hist_kernel<A, kRegionThreads><<<static_cast<unsigned>(nr), kRegionThreads, smem, stream>>>(
      static_cast<const A*>(p.sim), static_cast<A*>(p.hist), static_cast<A*>(p.levels),
      static_cast<A*>(p.stats), gbins, g, k, p.shape.cooc, bins.in_smem);
  return last_error();
}

template <typename T>
cudaError_t qco_backward_impl(const QcoBackwardParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  Geo g;
  if (!qco_geometry(p, g)) return cudaErrorInvalidValue;
  if (p.shape.N == 0 || p.shape.C == 0) return cudaSuccess;  // grad_x is empty
  const RegionBins bins = qco_bins(p, false);
  const int k = static_cast<int>(p.shape.num_levels);
  const int64_t nr = p.shape.N * g.r;
  const int64_t pix_blocks = cdiv(g.p, kElemThreads);
  const int64_t chan_blocks = cdiv(g.c, kElemChannels);
  if (nr * g.c > kMaxGridX || p.shape.N * pix_blocks * chan_blocks > kMaxGridX)
    return cudaErrorInvalidValue;
  if (p.workspace == nullptr) return cudaErrorInvalidValue;
  WorkspaceCarver ws{p.workspace};
  const auto [coef, gn, dg, dgn, gbins] = carve_qco_backward<A>(p, g, ws);
  const T* x = static_cast<const T*>(p.x);

  const size_t smem = bins.smem_bytes(sizeof(A));
  region_grad_kernel<A, kRegionThreads><<<static_cast<unsigned>(nr), kRegionThreads, smem, stream>>>(
      static_cast<const A*>(p.grad_hist), static_cast<const A*>(p.grad_levels),
      static_cast<const A*>(p.grad_sim), static_cast<const A*>(p.hist),
      static_cast<const A*>(p.sim), static_cast<const A*>(p.rnorm),
      static_cast<const A*>(p.stats), coef, gbins, g, k, p.shape.cooc, bins.in_smem);
  if (cudaError_t e = last_error()) return e;
  region_sum_kernel<T, A, kSumThreads><<<static_cast<unsigned>(nr * g.c), kSumThreads, 0, stream>>>(
      x, coef, 2 * g.p, dgn, g, false);
  if (cudaError_t e = last_error()) return e;
  mean_norm_kernel<A, kSumThreads><<<static_cast<unsigned>(nr), kSumThreads, 0, stream>>>(
      static_cast<const A*>(p.mean), dgn, gn, dg, g.c, A(g.hw));
  if (cudaError_t e = last_error()) return e;
  input_grad_kernel<T, A><<<static_cast<unsigned>(p.shape.N * pix_blocks * chan_blocks), kElemThreads, 0,
                            stream>>>(x, coef, gn, dg, static_cast<T*>(p.grad_x), g, pix_blocks,
                                      chan_blocks);
  return last_error();
}

bool recon_bins_in_smem(const TextureReconstructParams& p) {
  return static_cast<size_t>(kSumWarps * 2 * p.shape.num_levels) * acc_size(p.shape.dtype) <= kSmemBinsMax;
}

template <typename A> struct ReconScratch { A *lohi, *hs, *gbins; };
template <typename A>
ReconScratch<A> carve_recon(const TextureReconstructParams& p, bool backward, WorkspaceCarver& ws) {
  ReconScratch<A> s{};
  s.lohi = ws.take<A>(2 * p.shape.N);
  if (backward) {
    s.hs = ws.take<A>(p.shape.N * p.shape.Cf * p.shape.num_levels);
    if (!recon_bins_in_smem(p)) s.gbins = ws.take<A>(p.shape.N * p.shape.Cf * kSumWarps * 2 * p.shape.num_levels);
  }
  return s;
}

bool recon_sizes_ok(const TextureReconstructParams& p) {
  return p.shape.N >= 1 && p.shape.H >= 1 && p.shape.W >= 1 && p.shape.Cf >= 0 && p.shape.num_levels >= 1 &&
         p.shape.num_levels <= INT_MAX / 2;
}

template <typename T>
cudaError_t recon_forward_impl(const TextureReconstructParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  if (!recon_sizes_ok(p)) return cudaErrorInvalidValue;
  if (p.shape.Cf == 0) return cudaSuccess;
  const int64_t np = p.shape.H * p.shape.W;
  const int k = static_cast<int>(p.shape.num_levels);
  const int64_t pix_blocks = cdiv(np, kElemThreads);
  const int64_t chan_blocks = cdiv(p.shape.Cf, kElemChannels);
  if (p.shape.N * pix_blocks * chan_blocks > kMaxGridX || p.shape.N > kMaxGridX) return cudaErrorInvalidValue;
  if (p.workspace == nullptr) return cudaErrorInvalidValue;
  WorkspaceCarver ws{p.workspace};
  A* lohi = carve_recon<A>(p, false, ws).lohi;
  const T* sim = static_cast<const T*>(p.sim);
  lohi_kernel<T, A, kSumThreads><<<static_cast<unsigned>(p.shape.N), kSumThreads, 0, stream>>>(sim, lohi, np);
  if (cudaError_t e = last_error()) return e;
  recon_forward_kernel<T, A><<<static_cast<unsigned>(p.shape.N * pix_blocks * chan_blocks), kElemThreads,
                               0, stream>>>(sim, static_cast<const T*>(p.levels),
                                            static_cast<const T*>(p.features), lohi,
                                            static_cast<T*>(p.out), np, p.shape.Cf, k, pix_blocks,
                                            chan_blocks);
  return last_error();
}


template <typename T>
cudaError_t recon_backward_impl(const TextureReconstructParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  if (!recon_sizes_ok(p)) return cudaErrorInvalidValue;
  const int64_t np = p.shape.H * p.shape.W;
  const int k = static_cast<int>(p.shape.num_levels);
  const int64_t pix_blocks = cdiv(np, kPixTile);
  const int64_t glev_blocks = cdiv(p.shape.N * p.shape.num_levels, kElemThreads);
  if (p.shape.N * pix_blocks > kMaxGridX || p.shape.N * p.shape.Cf > kMaxGridX || glev_blocks > kMaxGridX)
    return cudaErrorInvalidValue;
  if (p.workspace == nullptr) return cudaErrorInvalidValue;
  const bool use_smem = recon_bins_in_smem(p);
  WorkspaceCarver ws{p.workspace};
  const auto [lohi, hs, gbins] = carve_recon<A>(p, true, ws);
  const T* sim = static_cast<const T*>(p.sim);
  const T* levels = static_cast<const T*>(p.levels);
  const T* features = static_cast<const T*>(p.features);
  const T* grad_out = static_cast<const T*>(p.grad_out);

  lohi_kernel<T, A, kSumThreads><<<static_cast<unsigned>(p.shape.N), kSumThreads, 0, stream>>>(sim, lohi, np);
  if (cudaError_t e = last_error()) return e;
  recon_gsim_kernel<T, A><<<static_cast<unsigned>(p.shape.N * pix_blocks), dim3(kPixTile, kChanSlices), 0,
                            stream>>>(grad_out, sim, levels, features, lohi,
                                      static_cast<T*>(p.grad_sim), np, p.shape.Cf, k, pix_blocks);
  if (cudaError_t e = last_error()) return e;
  if (p.shape.Cf > 0) {
    const size_t smem = use_smem ? static_cast<size_t>(kSumWarps * 2 * p.shape.num_levels) * sizeof(A) : 0;
    recon_feat_kernel<T, A, kSumThreads><<<static_cast<unsigned>(p.shape.N * p.shape.Cf), kSumThreads, smem,
                                           stream>>>(grad_out, sim, levels, lohi,
                                                     static_cast<T*>(p.grad_features), hs, gbins,
                                                     np, p.shape.Cf, k, use_smem);
    if (cudaError_t e = last_error()) return e;
  }
  recon_glev_kernel<T, A><<<static_cast<unsigned>(glev_blocks), kElemThreads, 0, stream>>>(
      features, hs, static_cast<T*>(p.grad_levels), p.shape.N, p.shape.Cf, k);
  return last_error();
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// public entry points
// ----------------------------------------------------------------------------------------------
size_t qco_forward_workspace_bytes(const QcoForwardParams& p) {
  Geo g;
  if (!qco_geometry(p, g)) return 0;
  return workspace_size(p.shape.dtype, [&](WorkspaceCarver& ws, auto a) {
    carve_qco_forward<decltype(a)>(p, g, ws);
  });
}

cudaError_t qco_forward(const QcoForwardParams& p, cudaStream_t stream) {
  SEGOPS_CUDA_DISPATCH(p.shape.dtype, return qco_forward_impl<scalar_t>(p, stream));
  return cudaErrorInvalidValue;
}

size_t qco_backward_workspace_bytes(const QcoBackwardParams& p) {
  Geo g;
  if (!qco_geometry(p, g)) return 0;
  return workspace_size(p.shape.dtype, [&](WorkspaceCarver& ws, auto a) {
    carve_qco_backward<decltype(a)>(p, g, ws);
  });
}

cudaError_t qco_backward(const QcoBackwardParams& p, cudaStream_t stream) {
  SEGOPS_CUDA_DISPATCH(p.shape.dtype, return qco_backward_impl<scalar_t>(p, stream));
  return cudaErrorInvalidValue;
}

size_t texture_reconstruct_forward_workspace_bytes(const TextureReconstructParams& p) {
  if (!recon_sizes_ok(p)) return 0;
  return workspace_size(p.shape.dtype,
                        [&](WorkspaceCarver& ws, auto a) { carve_recon<decltype(a)>(p, false, ws); });
}

cudaError_t texture_reconstruct_forward(const TextureReconstructParams& p, cudaStream_t stream) {
  SEGOPS_CUDA_DISPATCH(p.shape.dtype, return recon_forward_impl<scalar_t>(p, stream));
  return cudaErrorInvalidValue;
}

size_t texture_reconstruct_backward_workspace_bytes(const TextureReconstructParams& p) {
  if (!recon_sizes_ok(p)) return 0;
  return workspace_size(p.shape.dtype,
                        [&](WorkspaceCarver& ws, auto a) { carve_recon<decltype(a)>(p, true, ws); });
}

cudaError_t texture_reconstruct_backward(const TextureReconstructParams& p, cudaStream_t stream) {
  SEGOPS_CUDA_DISPATCH(p.shape.dtype, return recon_backward_impl<scalar_t>(p, stream));
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace segops
