// Disentangled non-local attention (SPEC §2.3), CPU kernels.
//
// Inputs are flattened and contiguous: query (N, Ck, Lq), key (N, Ck, Lk), value (N, Cv, Lk),
// unary (N, Lk) or none; `s` is the combined logit factor (scale / temperature).
//
// Forward: for each (sample, block of BM queries) a flash-attention style loop over blocks of BN
// keys: S = s * q~^T k~ (one BM x BN GEMM), online softmax (running row max and sum), acc += v P^T.
// Nothing of size Lq x Lk is ever allocated; per task the scratch is BM x BN scores plus a
// Cv x BM accumulator. Saved for backward: per-query log-sum-exp (N, Lq), the unary vector
// g = sum_j softmax(u)_j v_j (N, Cv) and the unary log-sum-exp (N,).
//
// Backward: tasks are (sample, group of key blocks); each recomputes P for its key blocks against
// every query block and accumulates dK, dV for its own keys and dQ into a per-(sample, group)
// buffer (at most ceil(threads / N) groups per sample), summed at the end. Whitening's gradient
// is the mean subtraction over positions of dQ~ and dK~; the unary term's gradient is
// dv_j += w_j dg, du_j = w_j (dg . v_j - dg . g) with dg = sum_i dout_i.
//
// The GEMM-shaped parts run through ATen's mm/addmm on views of the blocks (BLAS, one thread per
// task inside at::parallel_for); the exponentials through at::exp_ (vectorised).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/exp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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

// x - mean over the last dim (per sample, per channel), into a new buffer.
template <typename T>
at::Tensor centred(const at::Tensor& x) {
  auto out = at::empty_like(x);
  const int64_t rows = x.size(0) * x.size(1), len = x.size(2);
  const T* src = x.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* a = src + r * len;
      double acc = 0;
      for (int64_t i = 0; i < len; ++i) acc += a[i];
      const T mu = static_cast<T>(acc / static_cast<double>(len));
      T* o = dst + r * len;
      for (int64_t i = 0; i < len; ++i) o[i] = a[i] - mu;
    }
  });
  return out;
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
void forward_impl(const at::Tensor& qw, const at::Tensor& kw, const at::Tensor& v, T s,
                  const T* g, at::Tensor& out, at::Tensor& lse) {
  const int64_t N = qw.size(0), Ck = qw.size(1), Lq = qw.size(2), Lk = kw.size(2), Cv = v.size(1);
  const T* qp = qw.data_ptr<T>();
  const T* kp = kw.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* lp = lse.data_ptr<T>();
  const int64_t nqb = (Lq + BM - 1) / BM;
  at::parallel_for(0, N * nqb, 1, [&](int64_t b, int64_t e) {
    std::vector<T> S(BM * BN), acc(Cv * BM), m(BM), l(BM), alpha(BM);
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / nqb, i0 = (task % nqb) * BM, bm = std::min(BM, Lq - i0);
      T* qn = const_cast<T*>(qp) + n * Ck * Lq;
      T* kn = const_cast<T*>(kp) + n * Ck * Lk;
      T* vn = const_cast<T*>(vp) + n * Cv * Lk;
      auto A = mat(qn + i0, Ck, bm, Lq).t();  // (bm, Ck)
      auto accm = mat(acc.data(), Cv, bm, bm);
      std::fill(acc.begin(), acc.begin() + Cv * bm, T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      for (int64_t j0 = 0; j0 < Lk; j0 += BN) {
        const int64_t bn = std::min(BN, Lk - j0);
        auto Sm = mat(S.data(), bm, bn, bn);
        at::mm_out(Sm, A, mat(kn + j0, Ck, bn, Lk));
        for (int64_t i = 0; i < bm; ++i) {
          T* row = S.data() + i * bn;
          T mx = -std::numeric_limits<T>::infinity();
          for (int64_t j = 0; j < bn; ++j) {
            row[j] *= s;
            mx = std::max(mx, row[j]);
          }
          const T mnew = std::max(m[i], mx);
          alpha[i] = std::exp(m[i] - mnew);  // exp(-inf) = 0 on the first block
          m[i] = mnew;
          for (int64_t j = 0; j < bn; ++j) row[j] -= mnew;
        }
        Sm.exp_();
        for (int64_t i = 0; i < bm; ++i) {
          const T* row = S.data() + i * bn;
          T sum = 0;
          for (int64_t j = 0; j < bn; ++j) sum += row[j];
          l[i] = l[i] * alpha[i] + sum;
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
    at::Tensor qw = whiten ? centred<scalar_t>(query) : query;
    at::Tensor kw = whiten ? centred<scalar_t>(key) : key;
    const scalar_t* gp = nullptr;
    if (unary.has_value()) {
      unary_forward<scalar_t>(unary->data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), N, Cv, Lk,
                              lse_u.data_ptr<scalar_t>(), g.data_ptr<scalar_t>());
      gp = g.data_ptr<scalar_t>();
    }
    forward_impl<scalar_t>(qw, kw, value, static_cast<scalar_t>(s), gp, out, lse);
  });
  return {out, lse, g, lse_u};
}

template <typename T>
void backward_impl(const at::Tensor& go, const at::Tensor& qw, const at::Tensor& kw,
                   const at::Tensor& v, const T* u, const at::Tensor& out, const at::Tensor& lse,
                   const T* g, const T* lse_u, T s, bool whiten, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv, T* du) {
  const int64_t N = qw.size(0), Ck = qw.size(1), Lq = qw.size(2), Lk = kw.size(2), Cv = v.size(1);
  const T* gop = go.data_ptr<T>();
  const T* qp = qw.data_ptr<T>();
  const T* kp = kw.data_ptr<T>();
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
  const int64_t G = std::max<int64_t>(1, std::min(nkb, (threads + N - 1) / N));
  // dQ~ partial sums, transposed so a query block's rows are contiguous: (N, G, Lq, Ck).
  auto dqbuf = at::zeros({N, G, Lq, Ck}, qw.options());
  T* dqb = dqbuf.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();

  at::parallel_for(0, N * G, 1, [&](int64_t b, int64_t e) {
    std::vector<T> P(BM * BN), dP(BM * BN), dkacc(Ck * BN), dvacc(Cv * BN), t(BN), w(BN);
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / G, grp = task % G;
      const int64_t kb0 = grp * nkb / G, kb1 = (grp + 1) * nkb / G;
      T* qn = const_cast<T*>(qp) + n * Ck * Lq;
      T* kn = const_cast<T*>(kp) + n * Ck * Lk;
      T* vn = const_cast<T*>(vp) + n * Cv * Lk;
      T* gon = const_cast<T*>(gop) + n * Cv * Lq;
      T* dqn = dqb + (n * G + grp) * Lq * Ck;
      const T* ln = lp + n * Lq;
      const T* Dn = D.data() + n * Lq;
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int64_t j0 = kb * BN, bn = std::min(BN, Lk - j0);
        auto Kj = mat(kn + j0, Ck, bn, Lk);
        auto Vj = mat(vn + j0, Cv, bn, Lk);
        auto dkm = mat(dkacc.data(), Ck, bn, bn);
        auto dvm = mat(dvacc.data(), Cv, bn, bn);
        std::fill(dkacc.begin(), dkacc.begin() + Ck * bn, T(0));
        std::fill(dvacc.begin(), dvacc.begin() + Cv * bn, T(0));
        for (int64_t i0 = 0; i0 < Lq; i0 += BM) {
          const int64_t bm = std::min(BM, Lq - i0);
          auto Qi = mat(qn + i0, Ck, bm, Lq);   // (Ck, bm)
          auto Oi = mat(gon + i0, Cv, bm, Lq);  // (Cv, bm)
          auto Pm = mat(P.data(), bm, bn, bn);
          auto dPm = mat(dP.data(), bm, bn, bn);
          at::mm_out(Pm, Qi.t(), Kj);
          for (int64_t i = 0; i < bm; ++i) {
            T* row = P.data() + i * bn;
            const T li = ln[i0 + i];
            for (int64_t j = 0; j < bn; ++j) row[j] = row[j] * s - li;
          }
          Pm.exp_();
          at::mm_out(dPm, Oi.t(), Vj);
          for (int64_t i = 0; i < bm; ++i) {
            const T* p = P.data() + i * bn;
            T* d = dP.data() + i * bn;
            const T Di = Dn[i0 + i];
            for (int64_t j = 0; j < bn; ++j) d[j] = p[j] * (d[j] - Di);
          }
          dvm.addmm_(Oi, Pm);                                 // (Cv, bm) @ (bm, bn)
          dkm.addmm_(Qi, dPm);                                // (Ck, bm) @ (bm, bn)
          mat(dqn + i0 * Ck, bm, Ck, Ck).addmm_(dPm, Kj.t());  // (bm, bn) @ (bn, Ck)
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

  // dq[n, c, i] = s * sum over groups of dqbuf[n, grp, i, c].
  T* dqp = dq.data_ptr<T>();
  at::parallel_for(0, N * Ck, 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / Ck, c = r % Ck;
      T* o = dqp + r * Lq;
      for (int64_t i = 0; i < Lq; ++i) {
        T acc = 0;
        for (int64_t grp = 0; grp < G; ++grp) acc += dqb[((n * G + grp) * Lq + i) * Ck + c];
        o[i] = acc * s;
      }
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
    at::Tensor qw = whiten ? centred<scalar_t>(query) : query;
    at::Tensor kw = whiten ? centred<scalar_t>(key) : key;
    const bool has_u = unary.has_value();
    backward_impl<scalar_t>(grad_out, qw, kw, value,
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
