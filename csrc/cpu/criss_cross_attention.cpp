// Criss-cross attention (SPEC §2.1), CPU forward and backward.
//
// Every position u = (y, x) attends to its row y and its column x (centre once) with one joint
// softmax. The work splits into "row tasks" (one per (n, y)) and "column tasks" (one per (n,
// block of columns)):
//   * a row of an NCHW tensor is a (C x W) matrix with leading dimension H*W, so the row branch
//     is plain GEMMs straight on the inputs and outputs (no copies);
//   * a column is strided in both directions, so a column task gathers a block of kColBlock
//     columns, chunk of channels by chunk of channels, into small channel-major scratch
//     (reading kColBlock contiguous elements at a time), runs GEMMs there and scatters back.
// The GEMMs go through the BLAS that libtorch_cpu carries (MKL or OpenBLAS, whose sgemm_/dgemm_
// are bound weakly; a plain loop nest stands in if the symbols are absent). Scratch is
// per task and small (a few hundred KiB); the attention matrix is never materialised: the
// forward saves only the softmax log-sum-exp per position, and the backward recomputes the
// probabilities from it.
//
// Saved statistics (N, 2, H, W): the maximum energy m[u] and log l[u], l[u] = sum exp(e - m),
// so P = exp((e - m) - log l): the energies are recomputed bit-identically in the backward,
// and e - m stays exact where a single log-sum-exp would lose digits for large energies.
// Forward:  (1) row tasks: row max and log-sum;
//           (2) column tasks: merge with the column max and log-sum (joint softmax), and
//               out[:, u] = column part (overwrites);
//           (3) row tasks: out[:, u] += row part.
// Backward: D[u] = <dout[:, u], out[:, u]>; dS = P * (dP - D) with dP = <dout[:, u], value[:, i]>;
//           row tasks write dq, dk, dv (row parts); column tasks add the column parts.
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

namespace segops {
namespace {

constexpr int64_t kColBlock = 8;     // columns per column task (contiguous reads of this many)
constexpr int64_t kChanChunk = 64;   // channels gathered at a time in a column task

}  // namespace
}  // namespace segops

// Fortran BLAS of the BLAS library linked into libtorch_cpu (weak: null if not exported).
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace segops {
namespace {

inline void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a,
                      int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
// Inside a parallel task the BLAS must run single-threaded (MKL would otherwise start nested
// threads and oversubscribe the cores).
struct SingleThreadedBlas {
  int prev = 0;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
  }
};

inline bool have_blas(float) { return sgemm_ != nullptr; }
inline bool have_blas(double) { return dgemm_ != nullptr; }

// Row-major GEMM: C (M x N, ldc) = alpha * op(A) op(B) + beta * C, op(A): M x K, op(B): K x N.
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
             const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (have_blas(T(0)) && K > 0) {
    // A row-major X is the column-major X^T: compute C^T = op(B)^T op(A)^T in column-major.
    // Leading dimensions must be >= 1 and >= the stored rows even for degenerate sizes.
    const int64_t la = std::max<int64_t>(lda, ta ? M : K), lb = std::max<int64_t>(ldb, tb ? K : N);
    blas_gemm(tb ? 'T' : 'N', ta ? 'T' : 'N', static_cast<int>(N), static_cast<int>(M),
              static_cast<int>(K), alpha, B, static_cast<int>(lb), A, static_cast<int>(la), beta,
              C, static_cast<int>(std::max<int64_t>(ldc, N)));
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    T* c = C + m * ldc;
    for (int64_t n = 0; n < N; ++n) c[n] = beta == T(0) ? T(0) : beta * c[n];
    for (int64_t kk = 0; kk < K; ++kk) {
      const T a = alpha * (ta ? A[kk * lda + m] : A[m * lda + kk]);
      if (tb) {
        for (int64_t n = 0; n < N; ++n) c[n] += a * B[n * ldb + kk];
      } else {
        const T* b = B + kk * ldb;
        for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
      }
    }
  }
}

template <typename T>
inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Merge softmax statistics (m, log l) of two disjoint sets; the second may be empty (-inf).
template <typename T>
inline void merge_stats(T& m, T& ll, T m2, T ll2) {
  if (m2 == neg_inf<T>()) return;
  const T mx = std::max(m, m2);
  ll = std::log(std::exp(m - mx + ll) + std::exp(m2 - mx + ll2));
  m = mx;
}

// exp for the softmax: std::exp for double; for float a branch-free Cody-Waite reduction and a
// degree-6 polynomial (about 1 ulp) that the compiler vectorises, exp(-inf) = 0.
inline double vexp(double x) { return std::exp(x); }
inline float vexp(float x) {
  const float xc = std::min(x, 88.0f);
  const float t = xc * 1.44269504088896341f;
  const float kf = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - kf * 0.693359375f) + kf * 2.12194440e-4f;
  float p = 1.3888889e-3f;
  p = p * r + 8.3333338e-3f;
  p = p * r + 4.1666668e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t ki = static_cast<int32_t>(std::max(kf, -126.0f));
  const int32_t bits = (ki + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return xc < -87.0f ? 0.0f : p * scale;
}

// Row-wise softmax statistics of a (R x L) matrix: m[r * stride] = max, ll[r * stride] = log of
// the sum of exp(e - max) (both -inf for an all -inf row).
template <typename T>
inline void row_stats(const T* e, int64_t R, int64_t L, T* m_out, T* ll_out, int64_t stride) {
  for (int64_t r = 0; r < R; ++r) {
    const T* er = e + r * L;
    T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < L; ++j) m = std::max(m, er[j]);
    if (m == neg_inf<T>()) {
      m_out[r * stride] = m;
      ll_out[r * stride] = m;
      continue;
    }
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < L; ++j) s += vexp(er[j] - m);
    m_out[r * stride] = m;
    ll_out[r * stride] = std::log(s);
  }
}

// p[r, j] = exp((e[r, j] - m[r * stride]) - ll[r * stride]) in place.
template <typename T>
inline void softmax_from_stats(T* e, int64_t R, int64_t L, const T* m, const T* ll,
                               int64_t stride) {
  for (int64_t r = 0; r < R; ++r) {
    const T mr = m[r * stride], lr = ll[r * stride];
    T* er = e + r * L;
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) er[j] = vexp((er[j] - mr) - lr);
  }
}

// Gather columns x0..x0+nb of channels [0, C) of a (C, H, W) plane into dst[b][c][i] (C x H
// matrices, one per column).
template <typename T>
inline void gather_cols(const T* src, int64_t C, int64_t H, int64_t W, int64_t x0, int64_t nb,
                        T* dst) {
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < H; ++i) {
      const T* s = src + (c * H + i) * W + x0;
      T* d = dst + c * H + i;
      for (int64_t b = 0; b < nb; ++b) d[b * C * H] = s[b];
    }
  }
}

// dst[c, i, x0 + b] (+)= src[b][c][i].
template <typename T, bool kAdd>
inline void scatter_cols(const T* src, int64_t C, int64_t H, int64_t W, int64_t x0, int64_t nb,
                         T* dst) {
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < H; ++i) {
      T* d = dst + (c * H + i) * W + x0;
      const T* s = src + c * H + i;
      for (int64_t b = 0; b < nb; ++b) {
        if (kAdd) {
          d[b] += s[b * C * H];
        } else {
          d[b] = s[b * C * H];
        }
      }
    }
  }
}

template <typename T>
struct Dims {
  int64_t N, Ck, Cv, H, W, HW;
};

// Column energies of one column: e[y, i] = <q[:, y], k[:, i]> with the diagonal at -inf.
template <typename T>
inline void col_energies(const Dims<T>& d, const T* qx, const T* kx, T* e) {
  gemm_rm<T>(true, false, d.H, d.H, d.Ck, T(1), qx, d.H, kx, d.H, T(0), e, d.H);
  for (int64_t y = 0; y < d.H; ++y) e[y * d.H + y] = neg_inf<T>();
}

// Row energies of one row: e[x, j] = <q[:, y, x], k[:, y, j]> (q, k point at the row start).
template <typename T>
inline void row_energies(const Dims<T>& d, const T* qy, const T* ky, T* e) {
  gemm_rm<T>(true, false, d.W, d.W, d.Ck, T(1), qy, d.HW, ky, d.HW, T(0), e, d.W);
}

template <typename T>
void forward_impl(const Dims<T>& d, const T* q, const T* k, const T* v, T* out, T* st) {
  const int64_t H = d.H, W = d.W, HW = d.HW, Ck = d.Ck, Cv = d.Cv;
  // (1) row log-sum-exp.
  at::parallel_for(0, d.N * H, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas_guard;
    std::vector<T> e(W * W);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / H, y = t % H;
      row_energies(d, q + n * Ck * HW + y * W, k + n * Ck * HW + y * W, e.data());
      T* sm = st + 2 * n * HW + y * W;
      row_stats(e.data(), W, W, sm, sm + HW, 1);
    }
  });
  // (2) column tasks: finish the statistics, write the column part of out.
  const int64_t nxb = (W + kColBlock - 1) / kColBlock;
  at::parallel_for(0, d.N * nxb, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas_guard;
    const int64_t cc = std::min(Cv, kChanChunk);
    std::vector<T> qk(2 * kColBlock * Ck * H), p(kColBlock * H * H), mc(H), lc(H);
    std::vector<T> vg(kColBlock * cc * H), r(kColBlock * cc * H);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / nxb, x0 = (t % nxb) * kColBlock, nb = std::min(kColBlock, W - x0);
      T* qg = qk.data();
      T* kg = qk.data() + kColBlock * Ck * H;
      gather_cols(q + n * Ck * HW, Ck, H, W, x0, nb, qg);
      gather_cols(k + n * Ck * HW, Ck, H, W, x0, nb, kg);
      for (int64_t b = 0; b < nb; ++b) {
        T* pb = p.data() + b * H * H;
        col_energies(d, qg + b * Ck * H, kg + b * Ck * H, pb);
        row_stats(pb, H, H, mc.data(), lc.data(), 1);
        T* sm = st + 2 * n * HW + x0 + b;
        for (int64_t y = 0; y < H; ++y) merge_stats(sm[y * W], sm[HW + y * W], mc[y], lc[y]);
        softmax_from_stats(pb, H, H, sm, sm + HW, W);
      }
      for (int64_t c0 = 0; c0 < Cv; c0 += cc) {
        const int64_t nc = std::min(cc, Cv - c0);
        gather_cols(v + (n * Cv + c0) * HW, nc, H, W, x0, nb, vg.data());
        for (int64_t b = 0; b < nb; ++b) {
          // r[c, y] = sum_i v[c, i] p[y, i]
          gemm_rm<T>(false, true, nc, H, H, T(1), vg.data() + b * nc * H, H,
                     p.data() + b * H * H, H, T(0), r.data() + b * nc * H, H);
        }
        scatter_cols<T, false>(r.data(), nc, H, W, x0, nb, out + (n * Cv + c0) * HW);
      }
    }
  });
  // (3) row tasks: out[:, y, :] += v_y p_row^T.
  at::parallel_for(0, d.N * H, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas_guard;
    std::vector<T> e(W * W);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / H, y = t % H;
      row_energies(d, q + n * Ck * HW + y * W, k + n * Ck * HW + y * W, e.data());
      const T* sm = st + 2 * n * HW + y * W;
      softmax_from_stats(e.data(), W, W, sm, sm + HW, 1);
      // out[c, x] += sum_j v[c, j] p[x, j]
      gemm_rm<T>(false, true, Cv, W, W, T(1), v + n * Cv * HW + y * W, HW, e.data(), W, T(1),
                 out + n * Cv * HW + y * W, HW);
    }
  });
}

template <typename T>
void backward_impl(const Dims<T>& d, const T* go, const T* q, const T* k, const T* v,
                   const T* out, const T* st, T* dq, T* dk, T* dv) {
  const int64_t H = d.H, W = d.W, HW = d.HW, Ck = d.Ck, Cv = d.Cv;
  std::vector<T> Dbuf(d.N * HW);
  T* D = Dbuf.data();
  // Row tasks: D, then the row parts of dq, dk, dv (written, not accumulated).
  at::parallel_for(0, d.N * H, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas_guard;
    std::vector<T> p(W * W), ds(W * W);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / H, y = t % H;
      const int64_t ko = n * Ck * HW + y * W, vo = n * Cv * HW + y * W;
      T* Dy = D + n * HW + y * W;
      for (int64_t x = 0; x < W; ++x) Dy[x] = 0;
      for (int64_t c = 0; c < Cv; ++c) {
        const T* a = go + vo + c * HW;
        const T* b = out + vo + c * HW;
        for (int64_t x = 0; x < W; ++x) Dy[x] += a[x] * b[x];
      }
      row_energies(d, q + ko, k + ko, p.data());
      const T* sm = st + 2 * n * HW + y * W;
      softmax_from_stats(p.data(), W, W, sm, sm + HW, 1);
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
  // Column tasks: add the column parts.
  const int64_t nxb = (W + kColBlock - 1) / kColBlock;
  at::parallel_for(0, d.N * nxb, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas_guard;
    const int64_t cc = std::min(Cv, kChanChunk);
    const int64_t blk = kColBlock * Ck * H;
    std::vector<T> qk(2 * blk), tq(Ck * H), tk(Ck * H), p(kColBlock * H * H), ds(kColBlock * H * H);
    std::vector<T> gg(kColBlock * cc * H), vg(kColBlock * cc * H), r(kColBlock * cc * H);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / nxb, x0 = (t % nxb) * kColBlock, nb = std::min(kColBlock, W - x0);
      T* qg = qk.data();
      T* kg = qk.data() + blk;
      gather_cols(q + n * Ck * HW, Ck, H, W, x0, nb, qg);
      gather_cols(k + n * Ck * HW, Ck, H, W, x0, nb, kg);
      for (int64_t b = 0; b < nb; ++b) {
        T* pb = p.data() + b * H * H;
        col_energies(d, qg + b * Ck * H, kg + b * Ck * H, pb);
        const T* sm = st + 2 * n * HW + x0 + b;
        softmax_from_stats(pb, H, H, sm, sm + HW, W);
      }
      for (int64_t c0 = 0; c0 < Cv; c0 += cc) {
        const int64_t nc = std::min(cc, Cv - c0);
        const int64_t off = (n * Cv + c0) * HW;
        gather_cols(go + off, nc, H, W, x0, nb, gg.data());
        gather_cols(v + off, nc, H, W, x0, nb, vg.data());
        for (int64_t b = 0; b < nb; ++b) {
          const T* gb = gg.data() + b * nc * H;
          // dP[y, i] (+)= sum_c go[c, y] v[c, i]
          gemm_rm<T>(true, false, H, H, nc, T(1), gb, H, vg.data() + b * nc * H, H,
                     T(c0 == 0 ? 0 : 1), ds.data() + b * H * H, H);
          // dv[c, i] += sum_y go[c, y] p[y, i]
          gemm_rm<T>(false, false, nc, H, H, T(1), gb, H, p.data() + b * H * H, H, T(0),
                     r.data() + b * nc * H, H);
        }
        scatter_cols<T, true>(r.data(), nc, H, W, x0, nb, dv + off);
      }
      for (int64_t b = 0; b < nb; ++b) {
        T* s = ds.data() + b * H * H;
        const T* pb = p.data() + b * H * H;
        const T* Dx = D + n * HW + x0 + b;
        for (int64_t y = 0; y < H; ++y) {
          const T dy = Dx[y * W];
          for (int64_t i = 0; i < H; ++i) s[y * H + i] = pb[y * H + i] * (s[y * H + i] - dy);
        }
        // dq[c, y] = sum_i k[c, i] dS[y, i];  dk[c, i] = sum_y q[c, y] dS[y, i]
        // (into temporaries, then over the gathered q, k of this column, no longer needed)
        gemm_rm<T>(false, true, Ck, H, H, T(1), kg + b * Ck * H, H, s, H, T(0), tq.data(), H);
        gemm_rm<T>(false, false, Ck, H, H, T(1), qg + b * Ck * H, H, s, H, T(0), tk.data(), H);
        std::copy(tq.begin(), tq.end(), qg + b * Ck * H);
        std::copy(tk.begin(), tk.end(), kg + b * Ck * H);
      }
      scatter_cols<T, true>(qg, Ck, H, W, x0, nb, dq + n * Ck * HW);
      scatter_cols<T, true>(kg, Ck, H, W, x0, nb, dk + n * Ck * HW);
    }
  });
}

void check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
              "criss_cross_attention: query, key, value must be 4-D, got ", query.dim(), ", ",
              key.dim(), ", ", value.dim());
  TORCH_CHECK(key.sizes() == query.sizes(), "criss_cross_attention: key shape ", key.sizes(),
              " must equal query shape ", query.sizes());
  TORCH_CHECK(value.size(0) == query.size(0) && value.size(2) == query.size(2) &&
                  value.size(3) == query.size(3),
              "criss_cross_attention: value shape ", value.sizes(), " must be (N, Cv, H, W) with "
              "(N, H, W) of query ", query.sizes());
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && query.scalar_type() == value.scalar_type(),
              "criss_cross_attention: query, key, value must share a dtype");
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble,
              "criss_cross_attention (cpu): dtype must be float32 or float64, got ",
              query.scalar_type());
  TORCH_CHECK(query.is_contiguous() && key.is_contiguous() && value.is_contiguous(),
              "criss_cross_attention (cpu): inputs must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> cca_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                                    const at::Tensor& value) {
  check_inputs(query, key, value);
  const int64_t N = query.size(0), Ck = query.size(1), H = query.size(2), W = query.size(3);
  const int64_t Cv = value.size(1);
  at::Tensor out = at::empty({N, Cv, H, W}, value.options());
  at::Tensor lse = at::empty({N, 2, H, W}, query.options());
  if (out.numel() == 0 || lse.numel() == 0) {
    out.zero_();
    return {out, lse};
  }
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
  check_inputs(query, key, value);
  TORCH_CHECK(grad_out.sizes() == value.sizes() && out.sizes() == value.sizes(),
              "criss_cross_attention_backward: grad_out ", grad_out.sizes(), " and out ",
              out.sizes(), " must have the value's shape ", value.sizes());
  const int64_t N = query.size(0), Ck = query.size(1), H = query.size(2), W = query.size(3);
  const int64_t Cv = value.size(1);
  TORCH_CHECK(stats.dim() == 4 && stats.size(0) == N && stats.size(1) == 2 &&
                  stats.size(2) == H && stats.size(3) == W,
              "criss_cross_attention_backward: stats must be (N, 2, H, W), got ", stats.sizes());
  TORCH_CHECK(grad_out.scalar_type() == query.scalar_type() &&
                  out.scalar_type() == query.scalar_type() &&
                  stats.scalar_type() == query.scalar_type(),
              "criss_cross_attention_backward: grad_out, out and stats must have the dtype of "
              "query");
  TORCH_CHECK(grad_out.is_contiguous() && out.is_contiguous() && stats.is_contiguous(),
              "criss_cross_attention_backward: grad_out, out, stats must be contiguous");
  at::Tensor dq = at::empty_like(query), dk = at::empty_like(key), dv = at::empty_like(value);
  if (query.numel() == 0 || value.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
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
