// Criss-cross attention (docs/operators.md §2.1), CPU forward and backward.
//
// Every position u = (y, x) attends to its row y and its column x (centre once) with one joint
// softmax. Both branches are small GEMMs, laid out so that none needs a copy of the inputs:
//   * a row of an NCHW tensor is a (C x W) matrix with leading dimension H*W, so the row branch
//     is BLAS GEMMs (segops::cpu::gemm_rm) straight on the inputs and outputs, one per (n, y);
//   * the column x is strided in both directions, but the W columns of a map are W independent
//     products whose operands sit side by side in memory (x is the contiguous index). The
//     column branch therefore runs as "lane GEMMs": one product per column x, vectorised across
//     the columns, register-blocked like a GEMM microkernel (lane_gemm below).
// The column probabilities are kept as (N, H, H, W) = [n][y][i][x] and the row ones as
// (N, H, W, W) = [n][y][x][j]: a few MiB at most, never the (N, H, W, H+W) attention of the
// reference, and the softmax passes over them run on whole vectors (per-lane statistics).
//
// Saved statistics (N, 2, H, W): the maximum energy m[u] and log l[u], l[u] = sum exp(e - m),
// so P = exp((e - m) - log l): the energies are recomputed bit-identically in the backward,
// and e - m stays exact where a single log-sum-exp would lose digits for large energies.
// Forward:  column energies; per (n, y): row energies, row and column statistics merged into
//           the joint ones, both probability blocks; out = column part + row part.
// Backward: the same probabilities; D[u] = <dout[:, u], out[:, u]>; dS = P * (dP - D) with
//           dP = <dout[:, u], value[:, i]>; row tasks write dq, dk, dv (row parts), then the
//           column parts are added by lane GEMMs.
#include "segops/cpu/gemm.h"
#include "segops/cpu/guards.h"
#include "segops/cpu/softmax_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
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
constexpr int64_t kTaskM = 128; // rows of C per parallel task

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

  // Rows [m0, m1) of C for the lanes [x, x + kWidth). The operands are packed per K tile into
  // aligned vectors (BLAS-style), so the inner loop streams them from L1/L2 without split loads.
  __attribute__((always_inline)) static inline void run(const LaneGemm<T>& g, int64_t b,
                                                        int64_t m0, int64_t m1, int64_t x,
                                                        int64_t own) {
    // Aligned to 64 bytes by hand: the AVX-512 clone loads these with aligned moves, while
    // alignof(V) follows the baseline target (16).
    std::vector<T> buffer(kTileK * (g.N + kBlockM) * kWidth + 64 / sizeof(T));
    const auto base = reinterpret_cast<std::uintptr_t>(buffer.data());
    V* bpack = reinterpret_cast<V*>((base + 63) / 64 * 64);
    V* apack = bpack + kTileK * g.N;
    // At least one tile, so that K == 0 still overwrites C with zeros.
    for (int64_t k0 = 0; k0 == 0 || k0 < g.K; k0 += kTileK) {
      const int64_t kc = std::min(kTileK, g.K - k0);
      const bool accumulate = g.accumulate || k0 > 0;
      const T* bsrc = g.B.p + b * g.B.sample + k0 * g.B.row + x;
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t n = 0; n < g.N; ++n)
          std::memcpy(&bpack[k * g.N + n], bsrc + k * g.B.row + n * g.B.col, sizeof(V));
      int64_t m = m0;
      for (; m + kBlockM <= m1; m += kBlockM)
        rows<kBlockM>(g, b, m, k0, kc, x, own, accumulate, bpack, apack);
      for (; m < m1; ++m) rows<1>(g, b, m, k0, kc, x, own, accumulate, bpack, apack);
    }
  }
};

SEGOPS_LANE_CLONES void lane_gemm_vec(const LaneGemm<float>& g, int64_t b, int64_t m0,
                                      int64_t m1, int64_t x, int64_t own) {
  LaneKernel<float, LaneVec<float>>::run(g, b, m0, m1, x, own);
}
SEGOPS_LANE_CLONES void lane_gemm_vec(const LaneGemm<double>& g, int64_t b, int64_t m0,
                                      int64_t m1, int64_t x, int64_t own) {
  LaneKernel<double, LaneVec<double>>::run(g, b, m0, m1, x, own);
}

// The lane GEMMs of all `batch` samples, parallel over (sample, vector of lanes, rows of C).
template <typename T>
void lane_gemm(const LaneGemm<T>& g, int64_t batch) {
  constexpr int64_t kVecWidth = LaneKernel<T, LaneVec<T>>::kWidth;
  const int64_t width = g.L >= kVecWidth ? kVecWidth : 1;
  const int64_t lane_tasks = (g.L + width - 1) / width, row_tasks = (g.M + kTaskM - 1) / kTaskM;
  if (g.M == 0 || g.N == 0 || lane_tasks == 0) return;
  at::parallel_for(0, batch * lane_tasks * row_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (lane_tasks * row_tasks), lt = t / row_tasks % lane_tasks;
      const int64_t m0 = t % row_tasks * kTaskM, m1 = std::min(g.M, m0 + kTaskM);
      int64_t x = lt * width, own = 0;
      if (x + width > g.L) {  // last, partial vector: shifted back to end at L
        own = x + width - g.L;
        x = g.L - width;
      }
      if (width == 1) {
        LaneKernel<T, T>::run(g, b, m0, m1, x, own);
      } else {
        lane_gemm_vec(g, b, m0, m1, x, own);
      }
    }
  });
}

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

template <typename T>
struct Dims {
  int64_t N, Ck, Cv, H, W, HW;
  int64_t col_block() const { return H * H * W; }  // column probabilities of one sample
  int64_t row_block() const { return W * W; }      // row probabilities of one row
};

// pcol[n][y][i][x] = <q[n, :, y, x], k[n, :, i, x]> for all n, y, i, x (the diagonal is masked
// later, per row task).
template <typename T>
void col_energies(const Dims<T>& d, const T* q, const T* k, T* pcol) {
  const int64_t s = d.Ck * d.HW;
  lane_gemm<T>({d.H, d.H, d.Ck, d.W, {q, s, d.W, d.HW}, {k, s, d.HW, d.W},
                {pcol, d.col_block(), d.H * d.W, d.W}, false},
               d.N);
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

template <typename T>
void forward_impl(const Dims<T>& d, const T* q, const T* k, const T* v, T* out, T* st) {
  const int64_t H = d.H, W = d.W, HW = d.HW, Cv = d.Cv;
  std::vector<T> pcol(d.N * d.col_block()), prow(d.N * H * d.row_block());
  col_energies(d, q, k, pcol.data());
  at::parallel_for(0, d.N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(2 * W);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / H, y = t % H;
      T* sm = st + 2 * n * HW + y * W;
      row_task_probabilities(d, q, k, n, y, prow.data() + t * d.row_block(),
                             pcol.data() + n * d.col_block() + y * H * W, sm, sm + HW, true,
                             scratch.data());
    }
  });
  // out[c, y, x] = sum_i v[c, i, x] P[y, i, x]  (column part)
  const int64_t sv = Cv * HW;
  lane_gemm<T>({Cv, H, H, W, {v, sv, HW, W}, {pcol.data(), d.col_block(), W, H * W},
                {out, sv, HW, W}, false},
               d.N);
  // out[c, y, x] += sum_j v[c, y, j] P[y, x, j]  (row part)
  at::parallel_for(0, d.N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t / H * sv + t % H * W;
      gemm_rm<T>(false, true, Cv, W, W, T(1), v + o, HW, prow.data() + t * d.row_block(), W,
                 T(1), out + o, HW);
    }
  });
}

template <typename T>
void backward_impl(const Dims<T>& d, const T* go, const T* q, const T* k, const T* v,
                   const T* out, const T* st, T* dq, T* dk, T* dv) {
  const int64_t H = d.H, W = d.W, HW = d.HW, Ck = d.Ck, Cv = d.Cv;
  std::vector<T> Dbuf(d.N * HW), pcol(d.N * d.col_block()), dscol(d.N * d.col_block());
  T* D = Dbuf.data();
  col_energies(d, q, k, pcol.data());
  // Row tasks: the probabilities, D, then the row parts of dq, dk, dv (written, not added).
  at::parallel_for(0, d.N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p(d.row_block()), ds(d.row_block());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / H, y = t % H;
      const int64_t ko = n * Ck * HW + y * W, vo = n * Cv * HW + y * W;
      T* sm = const_cast<T*>(st) + 2 * n * HW + y * W;  // only read: finish_stats is false
      row_task_probabilities(d, q, k, n, y, p.data(), pcol.data() + n * d.col_block() + y * H * W,
                             sm, sm + HW, false, static_cast<T*>(nullptr));
      T* Dy = D + n * HW + y * W;
      std::fill(Dy, Dy + W, T(0));
      for (int64_t c = 0; c < Cv; ++c) {
        const T* a = go + vo + c * HW;
        const T* b = out + vo + c * HW;
        for (int64_t x = 0; x < W; ++x) Dy[x] += a[x] * b[x];
      }
      // dP[x, j] = sum_c go[c, x] v[c, j]
      gemm_rm<T>(true, false, W, W, Cv, T(1), go + vo, HW, v + vo, HW, T(0), ds.data(), W);
      for (int64_t x = 0; x < W; ++x) {
        const T dx = Dy[x];
        T* s = ds.data() + x * W;
        const T* pp = p.data() + x * W;
        for (int64_t j = 0; j < W; ++j) s[j] = pp[j] * (s[j] - dx);
      }
      // dq[c, x] = sum_j k[c, j] dS[x, j];  dk[c, j] = sum_x q[c, x] dS[x, j]
      gemm_rm<T>(false, true, Ck, W, W, T(1), k + ko, HW, ds.data(), W, T(0), dq + ko, HW);
      gemm_rm<T>(false, false, Ck, W, W, T(1), q + ko, HW, ds.data(), W, T(0), dk + ko, HW);
      // dv[c, j] = sum_x go[c, x] p[x, j]
      gemm_rm<T>(false, false, Cv, W, W, T(1), go + vo, HW, p.data(), W, T(0), dv + vo, HW);
    }
  });
  // Column parts, as lane GEMMs over [n][y][i][x] blocks.
  const int64_t sk = Ck * HW, sv = Cv * HW, cb = d.col_block(), HWc = H * W;
  T* pc = pcol.data();
  T* dsc = dscol.data();
  // dP[y, i, x] = sum_c go[c, y, x] v[c, i, x], then dS = P * (dP - D[y, x]).
  lane_gemm<T>({H, H, Cv, W, {go, sv, W, HW}, {v, sv, HW, W}, {dsc, cb, HWc, W}, false}, d.N);
  at::parallel_for(0, d.N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* Dy = D + t * W;  // t = n * H + y
      for (int64_t i = 0; i < H; ++i) {
        T* s = dsc + (t * H + i) * W;
        const T* pp = pc + (t * H + i) * W;
        for (int64_t x = 0; x < W; ++x) s[x] = pp[x] * (s[x] - Dy[x]);
      }
    }
  });
  // dv[c, i] += sum_y go[c, y] P[y, i];  dq[c, y] += sum_i k[c, i] dS[y, i];
  // dk[c, i] += sum_y q[c, y] dS[y, i]  (per lane x)
  lane_gemm<T>({Cv, H, H, W, {go, sv, HW, W}, {pc, cb, HWc, W}, {dv, sv, HW, W}, true}, d.N);
  lane_gemm<T>({Ck, H, H, W, {k, sk, HW, W}, {dsc, cb, W, HWc}, {dq, sk, HW, W}, true}, d.N);
  lane_gemm<T>({Ck, H, H, W, {q, sk, HW, W}, {dsc, cb, HWc, W}, {dk, sk, HW, W}, true}, d.N);
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
                            value.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                            stats.const_data_ptr<scalar_t>(), dq.mutable_data_ptr<scalar_t>(),
                            dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace segops

TORCH_LIBRARY_IMPL(segops_C, CPU, m) {
  m.impl("criss_cross_attention_forward", &segops::cca_forward_cpu);
  m.impl("criss_cross_attention_backward", &segops::cca_backward_cpu);
}
