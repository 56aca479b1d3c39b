// Criss-cross attention (docs/operators.md §2.1), CPU forward and backward.
//
// Every position u = (y, x) attends to its row y and its column x (centre once) with one joint
// softmax. Both branches are small GEMMs, laid out so that none needs a copy of the inputs:
//   * a row of an NCHW tensor is a (C x W) matrix with leading dimension H*W, so the row branch
//     is GEMMs straight on the inputs and outputs, one per (n, y): BLAS (gemm_rm), and for the
//     products with a W x W block the short-row kernel (segops/cpu/short_row_gemm.h) where it
//     applies (fp32, 16 <= W <= 64, AVX-512);
//   * the column x is strided in both directions, but the W columns of a map are W independent
//     products whose operands sit side by side in memory (x is the contiguous index). The
//     column branch therefore runs as "lane GEMMs": one product per column x, vectorised across
//     the columns, register-blocked like a GEMM microkernel (LaneKernel below).
// The column probabilities are kept as (N, H, H, W) = [n][y][i][x] and the row ones as
// (N, H, W, W) = [n][y][x][j]: a few MiB at most, never the (N, H, W, H+W) attention of the
// reference, and the softmax passes over them run on whole vectors (per-lane statistics).
//
// Saved statistics (N, 2, H, W): the maximum energy m[u] and log l[u], l[u] = sum exp(e - m),
// so P = exp((e - m) - log l): the energies are recomputed bit-identically in the backward,
// and e - m stays exact where a single log-sum-exp would lose digits for large energies.
// Each pass is one parallel region of three stages of tasks, handed out in order
// (parallel_stages):
// Forward:  column energies (lane GEMM tasks); per (n, y): row energies, row and column
//           statistics merged into the joint ones, both probability blocks, and out = the row
//           part (one GEMM); per (n, block of channels): out += column part (lane GEMM).
// Backward: column energies and column dP (lane GEMM tasks); per (n, y): the probabilities,
//           row dP = <dout[:, u], value[:, j]>, D[u] = sum over the keys of P dP (which is
//           <dout[:, u], out[:, u]>), dS = P * (dP - D) of both branches, and the row parts of
//           dq, dk and dv; per (n, block of channels) of dv, dq and dk: += column part.
#include "segops/cpu/gemm.h"
#include "segops/cpu/guards.h"
#include "segops/cpu/short_row_gemm.h"
#include "segops/cpu/softmax_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEGOPS_LANE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SEGOPS_LANE_CLONES
#endif

namespace segops {
namespace {

using cpu::gemm_rm;

template <typename T>
inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ---- Lane GEMMs: C[m, n] (+)= sum_k A[m, k] B[k, n], one product per lane x < L. ----

// Element (r, s) of sample b, lane x, sits at p[b * sample + r * row + s * col + x].
template <typename P>
struct LaneOperand {
  P p;
  int64_t sample, row, col;
};

template <typename T>
struct LaneGemm {
  int64_t M, N, K, L;
  LaneOperand<const T*> A, B;
  LaneOperand<T*> C;
  bool accumulate;  // false: C is overwritten
};

constexpr int kBlockM = 4;      // register block: kBlockM x kBlockN vectors of accumulators
constexpr int kBlockN = 6;
constexpr int64_t kTileK = 64;  // K is walked in tiles so that a B tile stays in L2
constexpr int64_t kTaskM = 64;  // rows of C per task of a whole lane GEMM

// One lane vector: 64 bytes (an AVX-512 register; two or four on narrower targets), or a plain
// scalar for maps narrower than a vector.
template <typename T>
struct LaneVecOf;
template <>
struct LaneVecOf<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct LaneVecOf<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using LaneVec = typename LaneVecOf<T>::type;

template <typename T, typename V>
struct LaneKernel {
  static constexpr int64_t kWidth = sizeof(V) / sizeof(T);

  // The (RM x RN) block of C at c (rows m, columns n) from the packed tiles ap[k * RM + r] and
  // bp[k * N + s], k < kc; only the lanes from `own` on are stored (the last vector of a row
  // overlaps the one before).
  template <int RM, int RN>
  __attribute__((always_inline)) static inline void block(const LaneGemm<T>& g, const V* ap,
                                                          const V* bp, int64_t kc, T* c,
                                                          int64_t own, bool accumulate) {
    V acc[RM][RN];
    for (int r = 0; r < RM; ++r)
      for (int s = 0; s < RN; ++s) acc[r][s] = V{};
    for (int64_t k = 0; k < kc; ++k) {
      const V* a = ap + k * RM;
      const V* bk = bp + k * g.N;
      for (int r = 0; r < RM; ++r)
        for (int s = 0; s < RN; ++s) acc[r][s] += a[r] * bk[s];
    }
    for (int r = 0; r < RM; ++r) {
      for (int s = 0; s < RN; ++s) {
        T* cp = c + r * g.C.row + s * g.C.col;
        if (own == 0) {
          V out = acc[r][s];
          if (accumulate) {
            V old;
            std::memcpy(&old, cp, sizeof(V));
            out = old + out;
          }
          std::memcpy(cp, &out, sizeof(V));
        } else {
          for (int64_t l = own; l < kWidth; ++l) {
            const T v = lane(acc[r][s], l);
            cp[l] = accumulate ? cp[l] + v : v;
          }
        }
      }
    }
  }

  static T lane(const V& v, int64_t l) {
    if constexpr (kWidth == 1) {
      return v;
    } else {
      return v[l];
    }
  }

  // Rows [m, m + RM) of C against all its columns, k in [k0, k0 + kc): packs the A rows, then
  // walks the packed B tile.
  template <int RM>
  __attribute__((always_inline)) static inline void rows(const LaneGemm<T>& g, int64_t b,
                                                         int64_t m, int64_t k0, int64_t kc,
                                                         int64_t x, int64_t own, bool accumulate,
                                                         const V* bpack, V* apack) {
    const T* a = g.A.p + b * g.A.sample + m * g.A.row + k0 * g.A.col + x;
    for (int64_t k = 0; k < kc; ++k)
      for (int r = 0; r < RM; ++r)
        std::memcpy(&apack[k * RM + r], a + r * g.A.row + k * g.A.col, sizeof(V));
    T* c = g.C.p + b * g.C.sample + m * g.C.row + x;
    int64_t n = 0;
    for (; n + kBlockN <= g.N; n += kBlockN)
      block<RM, kBlockN>(g, apack, bpack + n, kc, c + n * g.C.col, own, accumulate);
    for (; n < g.N; ++n) block<RM, 1>(g, apack, bpack + n, kc, c + n * g.C.col, own, accumulate);
  }

  // First lane of lane vector `index` and the first of its lanes that it owns: the last,
  // partial vector is shifted back to end at L, overlapping the one before.
  static void lane_start(const LaneGemm<T>& g, int64_t index, int64_t& x, int64_t& own) {
    x = index * kWidth;
    own = 0;
    if (x + kWidth > g.L) {
      own = x + kWidth - g.L;
      x = g.L - kWidth;
    }
  }

  // Rows [m0, m1) of C for the lane vectors [v0, v1). The operands are packed per K tile into
  // aligned vectors (BLAS-style), so the inner loop streams them from L1/L2 without split loads;
  // every lane vector's B tile is packed first, so that each block of rows of C is finished
  // for all lanes while it is in cache.
  __attribute__((always_inline)) static inline void run(const LaneGemm<T>& g, int64_t b,
                                                        int64_t m0, int64_t m1, int64_t v0,
                                                        int64_t v1) {
    const int64_t vectors = v1 - v0, tile = std::min(kTileK, g.K) * g.N;
    // Aligned to 64 bytes by hand: the AVX-512 clone loads these with aligned moves, while
    // alignof(V) follows the baseline target (16).
    std::unique_ptr<T[]> buffer(
        new T[(vectors * tile + kTileK * kBlockM) * kWidth + 64 / sizeof(T)]);
    const auto base = reinterpret_cast<std::uintptr_t>(buffer.get());
    V* bpack = reinterpret_cast<V*>((base + 63) / 64 * 64);
    V* apack = bpack + vectors * tile;
    // At least one tile, so that K == 0 still overwrites C with zeros.
    for (int64_t k0 = 0; k0 == 0 || k0 < g.K; k0 += kTileK) {
      const int64_t kc = std::min(kTileK, g.K - k0);
      const bool accumulate = g.accumulate || k0 > 0;
      for (int64_t v = 0; v < vectors; ++v) {
        int64_t x, own;
        lane_start(g, v0 + v, x, own);
        const T* bsrc = g.B.p + b * g.B.sample + k0 * g.B.row + x;
        V* bv = bpack + v * tile;
        for (int64_t k = 0; k < kc; ++k)
          for (int64_t n = 0; n < g.N; ++n)
            std::memcpy(&bv[k * g.N + n], bsrc + k * g.B.row + n * g.B.col, sizeof(V));
      }
      for (int64_t m = m0; m < m1; m += kBlockM) {
        for (int64_t v = 0; v < vectors; ++v) {
          int64_t x, own;
          lane_start(g, v0 + v, x, own);
          if (m + kBlockM <= m1) {
            rows<kBlockM>(g, b, m, k0, kc, x, own, accumulate, bpack + v * tile, apack);
          } else {
            for (int64_t r = m; r < m1; ++r)
              rows<1>(g, b, r, k0, kc, x, own, accumulate, bpack + v * tile, apack);
          }
        }
      }
    }
  }
};

SEGOPS_LANE_CLONES void lane_gemm_vec(const LaneGemm<float>& g, int64_t b, int64_t m0,
                                      int64_t m1, int64_t v0, int64_t v1) {
  LaneKernel<float, LaneVec<float>>::run(g, b, m0, m1, v0, v1);
}
SEGOPS_LANE_CLONES void lane_gemm_vec(const LaneGemm<double>& g, int64_t b, int64_t m0,
                                      int64_t m1, int64_t v0, int64_t v1) {
  LaneKernel<double, LaneVec<double>>::run(g, b, m0, m1, v0, v1);
}

// Runs task(stage, t) for every t < counts[stage] of every stage, in one parallel region:
// the tasks are handed out one at a time and in order, and those of a stage start once every
// task of the stages before it has finished. On a busy machine a thread that loses its core
// holds the others up by one task, not by a fixed share of the work, and a pass wakes its
// threads once, not once per stage.
template <typename F>
void parallel_stages(std::initializer_list<int64_t> counts, const F& task) {
  std::vector<int64_t> ends;  // ends[s]: one past the last task of stage s, counted overall
  for (const int64_t count : counts) ends.push_back((ends.empty() ? 0 : ends.back()) + count);
  const int64_t total = ends.back();
  // Tasks are taken in order, so all tasks below index i have finished when `finished` >= i:
  // a task of stage s only finishes after `finished` has reached the start of stage s.
  std::atomic<int64_t> next{0}, finished{0};
  std::atomic<bool> failed{false};
  at::parallel_for(0, std::min<int64_t>(total, at::get_num_threads()), 1, [&](int64_t,
                                                                             int64_t) {
    for (int64_t t = next++; t < total && !failed; t = next++) {
      const int64_t stage = std::upper_bound(ends.begin(), ends.end(), t) - ends.begin();
      const int64_t begin = stage == 0 ? 0 : ends[stage - 1];
      while (finished.load(std::memory_order_acquire) < begin && !failed) {
        std::this_thread::yield();
      }
      try {
        task(static_cast<int>(stage), t - begin);
      } catch (...) {
        failed = true;  // the other threads stop waiting for this task
        throw;
      }
      finished.fetch_add(1, std::memory_order_release);
    }
  });
}

// Lane vectors of a lane GEMM: whole vectors, or single lanes for maps narrower than one.
template <typename T>
int64_t lane_vectors(const LaneGemm<T>& g) {
  constexpr int64_t kVecWidth = LaneKernel<T, LaneVec<T>>::kWidth;
  return g.L < kVecWidth ? g.L : (g.L + kVecWidth - 1) / kVecWidth;
}

// Rows [m0, m1) of C in sample b, for the lane vectors [v0, v1).
template <typename T>
void lane_gemm(const LaneGemm<T>& g, int64_t b, int64_t m0, int64_t m1, int64_t v0, int64_t v1) {
  if (g.L < LaneKernel<T, LaneVec<T>>::kWidth) {
    LaneKernel<T, T>::run(g, b, m0, m1, v0, v1);
  } else {
    lane_gemm_vec(g, b, m0, m1, v0, v1);
  }
}

// A whole lane GEMM over `batch` samples as tasks (sample, lane vector, block of rows of C).
template <typename T>
struct LaneTasks {
  LaneGemm<T> g;
  int64_t batch;

  int64_t row_blocks() const { return (g.M + kTaskM - 1) / kTaskM; }
  int64_t count() const { return g.N == 0 ? 0 : batch * lane_vectors(g) * row_blocks(); }
  void run(int64_t t) const {
    const int64_t blocks = row_blocks(), vectors = lane_vectors(g);
    const int64_t block = t % blocks;
    const int64_t v = t / blocks % vectors;
    lane_gemm(g, t / (blocks * vectors), block * g.M / blocks, (block + 1) * g.M / blocks, v,
              v + 1);
  }
};

// ---- Softmax statistics ----

// Merge softmax statistics (m, log l) of two disjoint sets; the second may be empty (-inf).
template <typename T>
inline void merge_stats(T& m, T& ll, T m2, T ll2) {
  if (m2 == neg_inf<T>()) return;
  const T mx = std::max(m, m2);
  ll = std::log(std::exp(m - mx + ll) + std::exp(m2 - mx + ll2));
  m = mx;
}

// Row-wise softmax statistics of a (R x L) matrix: m[r * stride] = max, ll[r * stride] = log of
// the sum of exp(e - max) (both -inf for an all -inf row).
template <typename T>
inline void row_stats(T* e, int64_t R, int64_t L, T* m_out, T* ll_out, int64_t stride) {
  for (int64_t r = 0; r < R; ++r) {
    T* er = e + r * L;
    const T m = cpu::scale_and_max(er, L, T(1));
    m_out[r * stride] = m;
    ll_out[r * stride] = m == neg_inf<T>() ? m : std::log(cpu::exp_sum(er, L, m));
  }
}

// The row task's products of a map's rows with a W x W block, on the short-row kernel where it
// applies (fp32, 16 <= W <= 64, AVX-512), else on BLAS:
// C (M x W, ld) = A (M x W, ld) op(P), P a contiguous W x W block, op(P) = P^T when trans.
template <typename T>
void rows_times_block(int64_t M, int64_t W, const T* a, int64_t ld, const T* p, bool trans,
                      T* c) {
  if constexpr (std::is_same_v<T, float>) {
    if (cpu::short_row_gemm_available(W)) {
      cpu::short_row_gemm(M, W, a, ld, p, trans ? 1 : W, trans ? W : 1, c, ld);
      return;
    }
  }
  gemm_rm<T>(false, trans, M, W, W, T(1), a, ld, p, W, T(0), c, ld);
}

template <typename T>
struct Dims {
  int64_t N, Ck, Cv, H, W, HW;
  int64_t col_block() const { return H * H * W; }  // column probabilities of one sample
  int64_t row_block() const { return W * W; }      // row probabilities of one row
};

// pcol[n][y][i][x] = <q[n, :, y, x], k[n, :, i, x]> for all n, y, i, x (the diagonal is masked
// later, per row task).
template <typename T>
LaneTasks<T> col_energies(const Dims<T>& d, const T* q, const T* k, T* pcol) {
  const int64_t s = d.Ck * d.HW;
  return {{d.H, d.H, d.Ck, d.W, {q, s, d.W, d.HW}, {k, s, d.HW, d.W},
           {pcol, d.col_block(), d.H * d.W, d.W}, false},
          d.N};
}

// Row task (n, y) of both passes: the row probabilities prow (W x W, [x][j]) from the row
// energies, and the column ones pc = pcol[n][y] (H x W, [i][x]) from the column energies there.
// With finish_stats (forward) the joint statistics are computed first and stored in sm (m) and
// sl (log l), each a W-long row of the stats; otherwise they are read from there.
template <typename T>
void row_task_probabilities(const Dims<T>& d, const T* q, const T* k, int64_t n, int64_t y,
                            T* prow, T* pc, T* sm, T* sl, bool finish_stats, T* scratch) {
  const int64_t H = d.H, W = d.W, off = n * d.Ck * d.HW + y * W;
  gemm_rm<T>(true, false, W, W, d.Ck, T(1), q + off, d.HW, k + off, d.HW, T(0), prow, W);
  std::fill(pc + y * W, pc + (y + 1) * W, neg_inf<T>());
  if (finish_stats) {
    row_stats(prow, W, W, sm, sl, 1);
    T* mc = scratch;
    T* lc = scratch + W;
    std::fill(mc, mc + W, neg_inf<T>());
    std::fill(lc, lc + W, T(0));
    for (int64_t i = 0; i < H; ++i) {
      const T* e = pc + i * W;
      for (int64_t x = 0; x < W; ++x) mc[x] = mc[x] < e[x] ? e[x] : mc[x];
    }
    for (int64_t i = 0; i < H; ++i) cpu::add_exp_shifted(lc, pc + i * W, W, mc);
    for (int64_t x = 0; x < W; ++x) {
      if (mc[x] != neg_inf<T>()) merge_stats(sm[x], sl[x], mc[x], std::log(lc[x]));
    }
  }
  for (int64_t x = 0; x < W; ++x) cpu::exp_affine(prow + x * W, W, T(1), sm[x], sl[x]);
  for (int64_t i = 0; i < H; ++i) cpu::exp_shifted(pc + i * W, W, sm, sl);
}

// Rows [c0, c1) (channels) of sample n of C: the column part of an output or gradient, added to
// the row part that the row tasks wrote.
template <typename T>
void add_column_part(const LaneGemm<T>& column, int64_t n, int64_t c0, int64_t c1) {
  lane_gemm(column, n, c0, std::min(column.M, c1), 0, lane_vectors(column));
}

// The channels of one sample's column part (of out, dq, dk or dv) split into tasks. Every task
// packs the sample's whole B operand (probabilities or dS, all lanes) once, so the blocks are as
// large as load balance allows: about two tasks per thread over the batch.
struct ChannelBlocks {
  int64_t size, count;
  ChannelBlocks(int64_t channels, int64_t batch) {
    const int64_t wanted = (2 * at::get_num_threads() + batch - 1) / std::max<int64_t>(batch, 1);
    const int64_t blocks = std::max<int64_t>(1, std::min(wanted, (channels + 15) / 16));
    size = std::max<int64_t>(1, (channels + blocks - 1) / blocks);
    count = channels == 0 ? 0 : (channels + size - 1) / size;
  }
};

template <typename T>
void forward_impl(const Dims<T>& d, const T* q, const T* k, const T* v, T* out, T* st) {
  const int64_t H = d.H, W = d.W, HW = d.HW, Cv = d.Cv, sv = Cv * HW;
  std::vector<T> pcol(d.N * d.col_block());
  const LaneTasks<T> energies = col_energies(d, q, k, pcol.data());
  // out[c, y, x] = sum_j v[c, y, j] P[y, x, j] (row tasks) + sum_i v[c, i, x] P[y, i, x]
  const LaneGemm<T> column{Cv, H, H, W, {v, sv, HW, W}, {pcol.data(), d.col_block(), W, H * W},
                           {out, sv, HW, W}, true};
  const ChannelBlocks blocks(Cv, d.N);
  parallel_stages({energies.count(), d.N * H, d.N * blocks.count}, [&](int stage, int64_t t) {
    if (stage == 0) {
      energies.run(t);
    } else if (stage == 1) {
      const int64_t n = t / H, y = t % H, o = n * sv + y * W;
      std::vector<T> prow(d.row_block()), scratch(2 * W);
      T* sm = st + 2 * n * HW + y * W;
      row_task_probabilities(d, q, k, n, y, prow.data(),
                             pcol.data() + n * d.col_block() + y * H * W, sm, sm + HW, true,
                             scratch.data());
      rows_times_block<T>(Cv, W, v + o, HW, prow.data(), true, out + o);
    } else {
      const int64_t c0 = t % blocks.count * blocks.size;
      add_column_part(column, t / blocks.count, c0, c0 + blocks.size);
    }
  });
}

template <typename T>
void backward_impl(const Dims<T>& d, const T* go, const T* q, const T* k, const T* v,
                   const T* st, T* dq, T* dk, T* dv) {
  const int64_t H = d.H, W = d.W, HW = d.HW, Ck = d.Ck, Cv = d.Cv;
  const int64_t sk = Ck * HW, sv = Cv * HW, cb = d.col_block(), rb = d.row_block(), HWc = H * W;
  std::vector<T> pcol(d.N * cb), dscol(d.N * cb);
  T* pc = pcol.data();
  T* dsc = dscol.data();
  // The column energies, and the column dP[y, i, x] = sum_c go[c, y, x] v[c, i, x].
  const LaneTasks<T> energies = col_energies(d, q, k, pc);
  const LaneTasks<T> dp_col{{H, H, Cv, W, {go, sv, W, HW}, {v, sv, HW, W}, {dsc, cb, HWc, W},
                             false},
                            d.N};
  // Row tasks: both probability blocks, row dP, D, dS = P * (dP - D) of both, and the row parts
  // of dq, dk and dv (written, not added).
  auto row_task = [&](int64_t t) {
    const int64_t n = t / H, y = t % H, ko = n * sk + y * W, vo = n * sv + y * W;
    T* sm = const_cast<T*>(st) + 2 * n * HW + y * W;  // only read: finish_stats is false
    std::vector<T> p(rb), ds(rb);
    T* pcy = pc + t * HWc;  // t = n * H + y
    T* dscy = dsc + t * HWc;
    row_task_probabilities(d, q, k, n, y, p.data(), pcy, sm, sm + HW, false,
                           static_cast<T*>(nullptr));
    // dP[x, j] = sum_c go[c, x] v[c, j]
    gemm_rm<T>(true, false, W, W, Cv, T(1), go + vo, HW, v + vo, HW, T(0), ds.data(), W);
    // D[x] = sum over the keys of P dP, which is <dout[:, u], out[:, u]> without reading out.
    std::vector<T> D(W, T(0));
    for (int64_t x = 0; x < W; ++x) {
      for (int64_t j = 0; j < W; ++j) D[x] += p[x * W + j] * ds[x * W + j];
    }
    for (int64_t i = 0; i < H * W; i += W) {
      for (int64_t x = 0; x < W; ++x) D[x] += pcy[i + x] * dscy[i + x];
    }
    for (int64_t x = 0; x < W; ++x) {
      for (int64_t j = 0; j < W; ++j) ds[x * W + j] = p[x * W + j] * (ds[x * W + j] - D[x]);
    }
    for (int64_t i = 0; i < H * W; i += W) {
      for (int64_t x = 0; x < W; ++x) dscy[i + x] = pcy[i + x] * (dscy[i + x] - D[x]);
    }
    // dq[c, x] = sum_j k[c, j] dS[x, j];  dk[c, j] = sum_x q[c, x] dS[x, j];
    // dv[c, j] = sum_x go[c, x] P[x, j]
    rows_times_block<T>(Ck, W, k + ko, HW, ds.data(), true, dq + ko);
    rows_times_block<T>(Ck, W, q + ko, HW, ds.data(), false, dk + ko);
    rows_times_block<T>(Cv, W, go + vo, HW, p.data(), false, dv + vo);
  };
  // Column parts, per block of channels (per lane x):
  // dv[c, i] += sum_y go[c, y] P[y, i];  dq[c, y] += sum_i k[c, i] dS[y, i];
  // dk[c, i] += sum_y q[c, y] dS[y, i]
  const LaneGemm<T> dv_col{Cv, H, H, W, {go, sv, HW, W}, {pc, cb, HWc, W}, {dv, sv, HW, W}, true};
  const LaneGemm<T> dq_col{Ck, H, H, W, {k, sk, HW, W}, {dsc, cb, W, HWc}, {dq, sk, HW, W}, true};
  const LaneGemm<T> dk_col{Ck, H, H, W, {q, sk, HW, W}, {dsc, cb, HWc, W}, {dk, sk, HW, W}, true};
  const ChannelBlocks vblocks(Cv, d.N), kblocks(Ck, d.N);
  const int64_t column_tasks = dp_col.count() + energies.count();
  const int64_t value_tasks = d.N * vblocks.count, key_tasks = 2 * d.N * kblocks.count;
  parallel_stages({column_tasks, d.N * H, value_tasks + key_tasks}, [&](int stage, int64_t t) {
    if (stage == 0) {
      if (t < dp_col.count()) {
        dp_col.run(t);
      } else {
        energies.run(t - dp_col.count());
      }
    } else if (stage == 1) {
      row_task(t);
    } else if (t < value_tasks) {
      const int64_t c0 = t % vblocks.count * vblocks.size;
      add_column_part(dv_col, t / vblocks.count, c0, c0 + vblocks.size);
    } else {
      t -= value_tasks;
      const int64_t c0 = t % kblocks.count * kblocks.size, n = t / kblocks.count % d.N;
      add_column_part(t < d.N * kblocks.count ? dq_col : dk_col, n, c0, c0 + kblocks.size);
    }
  });
}

// query, key (N, Ck, H, W) and value (N, Cv, H, W).
void check_inputs(const char* kernel, const at::Tensor& query, const at::Tensor& key,
                  const at::Tensor& value) {
  cpu::check_operands(kernel, 4, {{"query", &query}, {"key", &key}, {"value", &value}});
  guards::check_sizes(kernel, "key", key, query.sizes());
  guards::check_sizes(kernel, "value", value,
                      {query.size(0), value.size(1), query.size(2), query.size(3)});
}

std::tuple<at::Tensor, at::Tensor> cca_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                                    const at::Tensor& value) {
  check_inputs("criss_cross_attention_forward (cpu)", query, key, value);
  const int64_t N = query.size(0), Ck = query.size(1), H = query.size(2), W = query.size(3);
  const int64_t Cv = value.size(1);
  at::Tensor out = at::empty({N, Cv, H, W}, value.options());
  at::Tensor lse = at::empty({N, 2, H, W}, query.options());
  if (lse.numel() == 0) return {out, lse};  // no positions (then out is empty too)
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "criss_cross_attention_forward", [&] {
    Dims<scalar_t> d{N, Ck, Cv, H, W, H * W};
    forward_impl<scalar_t>(d, query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
                           value.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                           lse.mutable_data_ptr<scalar_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cca_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& stats) {
  const char* kernel = "criss_cross_attention_backward (cpu)";
  check_inputs(kernel, query, key, value);
  const int64_t N = query.size(0), Ck = query.size(1), H = query.size(2), W = query.size(3);
  const int64_t Cv = value.size(1);
  guards::check_like(kernel, query, {{"grad_out", &grad_out}, {"out", &out}, {"stats", &stats}});
  guards::check_sizes(kernel, "grad_out", grad_out, value.sizes());
  guards::check_sizes(kernel, "out", out, value.sizes());
  guards::check_sizes(kernel, "stats", stats, {N, 2, H, W});
  at::Tensor dq = at::empty_like(query), dk = at::empty_like(key), dv = at::empty_like(value);
  if (stats.numel() == 0 || Cv == 0) {  // dP = 0, so dS = 0 (and dv is empty)
    dq.zero_();
    dk.zero_();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "criss_cross_attention_backward", [&] {
    Dims<scalar_t> d{N, Ck, Cv, H, W, H * W};
    backward_impl<scalar_t>(d, grad_out.const_data_ptr<scalar_t>(),
                            query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
                            value.const_data_ptr<scalar_t>(), stats.const_data_ptr<scalar_t>(),
                            dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                            dv.mutable_data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace segops

TORCH_LIBRARY_IMPL(segops_C, CPU, m) {
  m.impl("criss_cross_attention_forward", &segops::cca_forward_cpu);
  m.impl("criss_cross_attention_backward", &segops::cca_backward_cpu);
}
