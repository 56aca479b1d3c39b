// Disentangled non-local attention (SPEC §2.3), CPU kernels.
//
// Inputs are flattened and contiguous: query (N, Ck, Lq), key (N, Ck, Lk), value (N, Cv, Lk),
// unary (N, Lk) or none; `s` is the combined logit factor (scale / temperature).
//
// Forward: for each (sample, block of BM queries) a flash-attention style loop over blocks of BN
// keys: S = s * q~^T k~ (one BM x BN GEMM), online softmax (running row max and sum), acc += v P^T.
// Nothing of size Lq x Lk is ever allocated; per task the scratch is BM x BN scores plus a
// Cv x BM accumulator (and, when whitening, the current query/key block minus its channel
// means: no whitened copy of the whole query or key is made). Saved for backward: per-query log-sum-exp (N, Lq), the unary vector
// g = sum_j softmax(u)_j v_j (N, Cv) and the unary log-sum-exp (N,).
//
// Backward: tasks are (sample, group of key blocks); each recomputes P for its key blocks against
// every query block and accumulates dK, dV for its own keys and dQ into a per-(sample, group)
// buffer (at most ceil(threads / N) groups per sample), summed at the end. Whitening's gradient
// is the mean subtraction over positions of dQ~ and dK~; the unary term's gradient is
// dv_j += w_j dg, du_j = w_j (dg . v_j - dg . g) with dg = sum_i dout_i.
//
// The GEMM-shaped parts run through ATen's mm/addmm on views of the blocks (BLAS, one thread per
// task inside at::parallel_for); the softmax passes through the vectorised row helpers below.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/addmm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t BM = 256;  // queries per block
constexpr int64_t BN = 256;  // keys per block

// A (rows x cols) matrix view of raw memory with the given row stride.
template <typename T>
at::Tensor mat(T* ptr, int64_t rows, int64_t cols, int64_t row_stride) {
  return at::from_blob(ptr, {rows, cols}, {row_stride, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& unary) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "disentangled_non_local: query, key and value must be 3-D (N, C, L), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1),
              "disentangled_non_local: key must be (N, Ck, Lk) with (N, Ck) of query ", q.sizes(),
              ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(2) == k.size(2),
              "disentangled_non_local: value must be (N, Cv, Lk) with N, Lk of key ", k.sizes(),
              ", got ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "disentangled_non_local: query, key and value must share one dtype");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "disentangled_non_local: inputs must be contiguous");
  if (unary.has_value()) {
    const auto& u = *unary;
    TORCH_CHECK(u.dim() == 2 && u.size(0) == k.size(0) && u.size(1) == k.size(2),
                "disentangled_non_local: unary must be (N, Lk) = (", k.size(0), ", ", k.size(2),
                "), got ", u.sizes());
    TORCH_CHECK(u.scalar_type() == q.scalar_type() && u.is_contiguous(),
                "disentangled_non_local: unary must be contiguous with the dtype of query");
  }
}

// Per (sample, channel) mean over the last dim of a (N, C, L) tensor.
template <typename T>
std::vector<T> channel_means(const at::Tensor& x) {
  const int64_t rows = x.size(0) * x.size(1), len = x.size(2);
  std::vector<T> mu(rows);
  const T* src = x.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* a = src + r * len;
      double acc = 0;
      for (int64_t i = 0; i < len; ++i) acc += a[i];
      mu[r] = static_cast<T>(acc / static_cast<double>(std::max<int64_t>(len, 1)));
    }
  });
  return mu;
}

// One (C, len) block of positions [p0, p0 + len) of sample n of a (N, C, L) operand: a view of
// the input, or (whitening) the input minus its channel means, written to `scratch`. Whitening
// block by block costs C * len per block against C * len * (block of the other side) for the
// GEMM it feeds, and needs no whitened copy of the whole tensor.
template <typename T>
struct Operand {
  const T* base;
  const T* mean;  // (N, C) or nullptr
  int64_t C, L;

  at::Tensor block(int64_t n, int64_t p0, int64_t len, T* scratch) const {
    T* src = const_cast<T*>(base) + n * C * L + p0;
    if (mean == nullptr) return mat(src, C, len, L);
    for (int64_t c = 0; c < C; ++c) {
      const T mu = mean[n * C + c];
      const T* a = src + c * L;
      T* o = scratch + c * len;
      for (int64_t i = 0; i < len; ++i) o[i] = a[i] - mu;
    }
    return mat(scratch, C, len, len);
  }
};

// The per-element softmax work, one fused pass per step, vectorised. The float versions are
// compiled for AVX-512, AVX2 and baseline x86-64 (picked at load time) and use a polynomial exp
// that the compiler vectorises: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-7 polynomial
// (Cephes' minimax coefficients, about 1 ulp), 2^n from the exponent bits. libm's expf is a
// scalar call per element, which made these passes cost a third of the GEMMs at Lq = Lk = 8192.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEGOPS_VEC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SEGOPS_VEC_CLONES
#endif

inline float exp_poly(float x) {
  const bool underflow = x < -87.0f;  // e^-87 ~ 1.6e-38: flush to zero (also catches -inf)
  x = std::max(x, -87.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, two-part ln2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : p * scale;
}

// row[j] *= s; returns the new row maximum. (Reductions keep kLanes independent partial results:
// without -ffast-math the compiler may not reorder one running float sum or max.)
constexpr int64_t kLanes = 16;

SEGOPS_VEC_CLONES float scale_and_max(float* row, int64_t len, float s) {
  float m[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) m[k] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      row[j + k] *= s;
      m[k] = m[k] > row[j + k] ? m[k] : row[j + k];
    }
  }
  for (; j < len; ++j) {
    row[j] *= s;
    m[0] = std::max(m[0], row[j]);
  }
  float r = m[0];
  for (int64_t k = 1; k < kLanes; ++k) r = std::max(r, m[k]);
  return r;
}
double scale_and_max(double* row, int64_t len, double s) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < len; ++j) {
    row[j] *= s;
    m = std::max(m, row[j]);
  }
  return m;
}

// row[j] = exp(row[j] * s - shift); returns the row sum.
SEGOPS_VEC_CLONES float exp_affine_sum(float* row, int64_t len, float s, float shift) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      row[j + k] = exp_poly(row[j + k] * s - shift);
      acc[k] += row[j + k];
    }
  }
  for (; j < len; ++j) {
    row[j] = exp_poly(row[j] * s - shift);
    acc[0] += row[j];
  }
  float sum = 0.0f;
  for (int64_t k = 0; k < kLanes; ++k) sum += acc[k];
  return sum;
}
double exp_affine_sum(double* row, int64_t len, double s, double shift) {
  double sum = 0.0;
  for (int64_t j = 0; j < len; ++j) {
    row[j] = std::exp(row[j] * s - shift);
    sum += row[j];
  }
  return sum;
}

// d[j] = p[j] * (d[j] - D): the softmax backward of one row.
template <typename T>
SEGOPS_VEC_CLONES void softmax_grad_row(const T* p, T* d, int64_t len, T D) {
  for (int64_t j = 0; j < len; ++j) d[j] = p[j] * (d[j] - D);
}

// In-place: x[r, :] -= mean(x[r, :]) for every row of a (rows, len) buffer.
template <typename T>
void subtract_row_means(T* x, int64_t rows, int64_t len) {
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* a = x + r * len;
      double acc = 0;
      for (int64_t i = 0; i < len; ++i) acc += a[i];
      const T mu = static_cast<T>(acc / static_cast<double>(len));
      for (int64_t i = 0; i < len; ++i) a[i] -= mu;
    }
  });
}

// Unary statistics: lse_u (N,), g (N, Cv) = sum_j softmax(u)_j v_j.
template <typename T>
void unary_forward(const T* u, const T* v, int64_t N, int64_t Cv, int64_t Lk, T* lse_u, T* g) {
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    std::vector<T> w(Lk);
    for (int64_t n = b; n < e; ++n) {
      const T* un = u + n * Lk;
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < Lk; ++j) mx = std::max(mx, un[j]);
      T sum = 0;
      for (int64_t j = 0; j < Lk; ++j) {
        w[j] = std::exp(un[j] - mx);
        sum += w[j];
      }
      const T inv = T(1) / sum;
      for (int64_t j = 0; j < Lk; ++j) w[j] *= inv;
      lse_u[n] = mx + std::log(sum);
      const T* vn = v + n * Cv * Lk;
      for (int64_t c = 0; c < Cv; ++c) {
        const T* vc = vn + c * Lk;
        T acc = 0;
        for (int64_t j = 0; j < Lk; ++j) acc += w[j] * vc[j];
        g[n * Cv + c] = acc;
      }
    }
  });
}

template <typename T>
void forward_impl(const at::Tensor& query, const at::Tensor& key, const at::Tensor& v,
                  const T* mq, const T* mk, T s, const T* g, at::Tensor& out, at::Tensor& lse) {
  const int64_t N = query.size(0), Ck = query.size(1), Lq = query.size(2), Lk = key.size(2);
  const int64_t Cv = v.size(1);
  const Operand<T> Q{query.data_ptr<T>(), mq, Ck, Lq}, K{key.data_ptr<T>(), mk, Ck, Lk};
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* lp = lse.data_ptr<T>();
  const int64_t nqb = (Lq + BM - 1) / BM;
  at::parallel_for(0, N * nqb, 1, [&](int64_t b, int64_t e) {
    std::vector<T> S(BM * BN), acc(Cv * BM), m(BM), l(BM), alpha(BM);
    std::vector<T> qs(mq ? Ck * BM : 0), ks(mk ? Ck * BN : 0);
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / nqb, i0 = (task % nqb) * BM, bm = std::min(BM, Lq - i0);
      T* vn = const_cast<T*>(vp) + n * Cv * Lk;
      auto A = Q.block(n, i0, bm, qs.data()).t();  // (bm, Ck)
      auto accm = mat(acc.data(), Cv, bm, bm);
      std::fill(acc.begin(), acc.begin() + Cv * bm, T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      for (int64_t j0 = 0; j0 < Lk; j0 += BN) {
        const int64_t bn = std::min(BN, Lk - j0);
        auto Sm = mat(S.data(), bm, bn, bn);
        at::mm_out(Sm, A, K.block(n, j0, bn, ks.data()));
        for (int64_t i = 0; i < bm; ++i) {
          T* row = S.data() + i * bn;
          const T mnew = std::max(m[i], scale_and_max(row, bn, s));
          alpha[i] = std::exp(m[i] - mnew);  // exp(-inf) = 0 on the first block
          m[i] = mnew;
          l[i] = l[i] * alpha[i] + exp_affine_sum(row, bn, T(1), mnew);
        }
        if (j0 > 0) {
          for (int64_t c = 0; c < Cv; ++c) {
            T* a = acc.data() + c * bm;
            for (int64_t i = 0; i < bm; ++i) a[i] *= alpha[i];
          }
        }
        accm.addmm_(mat(vn + j0, Cv, bn, Lk), Sm.t());  // (Cv, bn) @ (bn, bm)
      }
      for (int64_t i = 0; i < bm; ++i) {
        lp[n * Lq + i0 + i] = m[i] + std::log(l[i]);
        alpha[i] = T(1) / l[i];
      }
      for (int64_t c = 0; c < Cv; ++c) {
        const T gc = g ? g[n * Cv + c] : T(0);
        const T* a = acc.data() + c * bm;
        T* o = op + (n * Cv + c) * Lq + i0;
        for (int64_t i = 0; i < bm; ++i) o[i] = a[i] * alpha[i] + gc;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dnl_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& unary, bool whiten, double s) {
  check_inputs(query, key, value, unary);
  const int64_t N = query.size(0), Lq = query.size(2), Cv = value.size(1), Lk = key.size(2);
  TORCH_CHECK(Lk > 0 || N * Lq == 0, "disentangled_non_local: key has no positions");
  auto out = at::empty({N, Cv, Lq}, value.options());
  auto lse = at::empty({N, Lq}, query.options());
  auto g = at::zeros({N, Cv}, query.options());
  auto lse_u = at::zeros({N}, query.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "disentangled_non_local_forward", [&] {
    std::vector<scalar_t> mq, mk;
    if (whiten) {
      mq = channel_means<scalar_t>(query);
      mk = channel_means<scalar_t>(key);
    }
    const scalar_t* gp = nullptr;
    if (unary.has_value()) {
      unary_forward<scalar_t>(unary->data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), N, Cv, Lk,
                              lse_u.data_ptr<scalar_t>(), g.data_ptr<scalar_t>());
      gp = g.data_ptr<scalar_t>();
    }
    forward_impl<scalar_t>(query, key, value, whiten ? mq.data() : nullptr,
                           whiten ? mk.data() : nullptr, static_cast<scalar_t>(s), gp, out, lse);
  });
  return {out, lse, g, lse_u};
}

template <typename T>
void backward_impl(const at::Tensor& go, const at::Tensor& query, const at::Tensor& key,
                   const at::Tensor& v, const T* mq, const T* mk, const T* u,
                   const at::Tensor& out, const at::Tensor& lse, const T* g, const T* lse_u, T s,
                   bool whiten, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, T* du) {
  const int64_t N = query.size(0), Ck = query.size(1), Lq = query.size(2), Lk = key.size(2);
  const int64_t Cv = v.size(1);
  const Operand<T> Q{query.data_ptr<T>(), mq, Ck, Lq}, K{key.data_ptr<T>(), mk, Ck, Lk};
  const T* gop = go.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* outp = out.data_ptr<T>();
  const T* lp = lse.data_ptr<T>();

  // D_i = dout_i . (out_i - g) = sum_j P_ij dP_ij; dg = sum_i dout_i.
  std::vector<T> D(N * Lq), dg(N * Cv, T(0));
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      T* Dn = D.data() + n * Lq;
      std::fill(Dn, Dn + Lq, T(0));
      for (int64_t c = 0; c < Cv; ++c) {
        const T gc = g ? g[n * Cv + c] : T(0);
        const T* a = gop + (n * Cv + c) * Lq;
        const T* o = outp + (n * Cv + c) * Lq;
        T sum = 0;
        for (int64_t i = 0; i < Lq; ++i) {
          Dn[i] += a[i] * (o[i] - gc);
          sum += a[i];
        }
        dg[n * Cv + c] = sum;
      }
    }
  });

  const int64_t nkb = (Lk + BN - 1) / BN;
  const int64_t threads = at::get_num_threads();
  const int64_t G = std::max<int64_t>(1, std::min(nkb, (threads + N - 1) / std::max<int64_t>(N, 1)));
  // dQ~ partial sums of group 0 accumulate straight into dq; groups 1.. into (G-1, N, Ck, Lq).
  dq.zero_();
  auto dqbuf = at::zeros({G - 1, N, Ck, Lq}, query.options());
  T* dqb = dqbuf.data_ptr<T>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();

  at::parallel_for(0, N * G, 1, [&](int64_t b, int64_t e) {
    std::vector<T> P(BM * BN), dP(BM * BN), dkacc(Ck * BN), dvacc(Cv * BN), t(BN), w(BN);
    std::vector<T> qs(mq ? Ck * BM : 0), ks(mk ? Ck * BN : 0);
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / G, grp = task % G;
      const int64_t kb0 = grp * nkb / G, kb1 = (grp + 1) * nkb / G;
      T* vn = const_cast<T*>(vp) + n * Cv * Lk;
      T* gon = const_cast<T*>(gop) + n * Cv * Lq;
      T* dqn = grp == 0 ? dqp + n * Ck * Lq : dqb + ((grp - 1) * N + n) * Ck * Lq;
      const T* ln = lp + n * Lq;
      const T* Dn = D.data() + n * Lq;
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int64_t j0 = kb * BN, bn = std::min(BN, Lk - j0);
        auto Kj = K.block(n, j0, bn, ks.data());
        auto Vj = mat(vn + j0, Cv, bn, Lk);
        auto dkm = mat(dkacc.data(), Ck, bn, bn);
        auto dvm = mat(dvacc.data(), Cv, bn, bn);
        std::fill(dkacc.begin(), dkacc.begin() + Ck * bn, T(0));
        std::fill(dvacc.begin(), dvacc.begin() + Cv * bn, T(0));
        for (int64_t i0 = 0; i0 < Lq; i0 += BM) {
          const int64_t bm = std::min(BM, Lq - i0);
          auto Qi = Q.block(n, i0, bm, qs.data());  // (Ck, bm)
          auto Oi = mat(gon + i0, Cv, bm, Lq);  // (Cv, bm)
          auto Pm = mat(P.data(), bm, bn, bn);
          auto dPm = mat(dP.data(), bm, bn, bn);
          at::mm_out(Pm, Qi.t(), Kj);
          for (int64_t i = 0; i < bm; ++i) exp_affine_sum(P.data() + i * bn, bn, s, ln[i0 + i]);
          at::mm_out(dPm, Oi.t(), Vj);
          for (int64_t i = 0; i < bm; ++i) {
            softmax_grad_row<T>(P.data() + i * bn, dP.data() + i * bn, bn, Dn[i0 + i]);
          }
          dvm.addmm_(Oi, Pm);                                 // (Cv, bm) @ (bm, bn)
          dkm.addmm_(Qi, dPm);                                // (Ck, bm) @ (bm, bn)
          mat(dqn + i0, Ck, bm, Lq).addmm_(Kj, dPm.t());  // (Ck, bn) @ (bn, bm)
        }
        if (u != nullptr) {
          // w_j = softmax(u)_j; dv_j += w_j dg; du_j = w_j (dg . v_j - dg . g).
          const T* un = u + n * Lk + j0;
          const T* dgn = dg.data() + n * Cv;
          T dgg = 0;
          for (int64_t c = 0; c < Cv; ++c) dgg += dgn[c] * g[n * Cv + c];
          for (int64_t j = 0; j < bn; ++j) {
            w[j] = std::exp(un[j] - lse_u[n]);
            t[j] = 0;
          }
          for (int64_t c = 0; c < Cv; ++c) {
            const T dgc = dgn[c];
            const T* vc = vn + c * Lk + j0;
            T* dvc = dvacc.data() + c * bn;
            for (int64_t j = 0; j < bn; ++j) {
              dvc[j] += w[j] * dgc;
              t[j] += dgc * vc[j];
            }
          }
          for (int64_t j = 0; j < bn; ++j) du[n * Lk + j0 + j] = w[j] * (t[j] - dgg);
        }
        for (int64_t c = 0; c < Ck; ++c) {
          const T* a = dkacc.data() + c * bn;
          T* o = dkp + (n * Ck + c) * Lk + j0;
          for (int64_t j = 0; j < bn; ++j) o[j] = a[j] * s;
        }
        for (int64_t c = 0; c < Cv; ++c) {
          std::copy(dvacc.data() + c * bn, dvacc.data() + (c + 1) * bn,
                    dvp + (n * Cv + c) * Lk + j0);
        }
      }
    }
  });

  // dq = s * (sum over groups).
  at::parallel_for(0, N * Ck, 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* o = dqp + r * Lq;
      for (int64_t grp = 1; grp < G; ++grp) {
        const T* a = dqb + ((grp - 1) * N * Ck + r) * Lq;
        for (int64_t i = 0; i < Lq; ++i) o[i] += a[i];
      }
      for (int64_t i = 0; i < Lq; ++i) o[i] *= s;
    }
  });
  if (whiten) {
    subtract_row_means<T>(dqp, N * Ck, Lq);
    subtract_row_means<T>(dkp, N * Ck, Lk);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dnl_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const std::optional<at::Tensor>& unary, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& g, const at::Tensor& lse_u, bool whiten, double s) {
  check_inputs(query, key, value, unary);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == query.scalar_type(),
              "disentangled_non_local_backward: grad_out must be contiguous with the shape ",
              out.sizes(), " and dtype of the output");
  TORCH_CHECK(lse.scalar_type() == query.scalar_type() && g.scalar_type() == query.scalar_type() &&
                  lse_u.scalar_type() == query.scalar_type() && lse.is_contiguous() &&
                  g.is_contiguous() && out.is_contiguous(),
              "disentangled_non_local_backward: saved statistics have an unexpected dtype/layout");
  auto dq = at::empty_like(query);
  auto dk = at::empty_like(key);
  auto dv = at::empty_like(value);
  auto du = unary.has_value() ? at::empty_like(*unary) : at::empty({0}, query.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "disentangled_non_local_backward", [&] {
    std::vector<scalar_t> mq, mk;
    if (whiten) {
      mq = channel_means<scalar_t>(query);
      mk = channel_means<scalar_t>(key);
    }
    const bool has_u = unary.has_value();
    backward_impl<scalar_t>(grad_out, query, key, value, whiten ? mq.data() : nullptr,
                            whiten ? mk.data() : nullptr,
                            has_u ? unary->data_ptr<scalar_t>() : nullptr, out, lse,
                            has_u ? g.data_ptr<scalar_t>() : nullptr,
                            has_u ? lse_u.data_ptr<scalar_t>() : nullptr,
                            static_cast<scalar_t>(s), whiten, dq, dk, dv,
                            has_u ? du.data_ptr<scalar_t>() : nullptr);
  });
  return {dq, dk, dv, du};
}

}  // namespace

TORCH_LIBRARY_IMPL(segops_C, CPU, m) {
  m.impl("disentangled_non_local_forward", &dnl_forward);
  m.impl("disentangled_non_local_backward", &dnl_backward);
}
