// Disentangled non-local attention (docs/operators.md §2.3), CPU kernels.
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
// The GEMM-shaped parts run through segops::cpu::gemm_rm on the blocks (one thread per task
// inside at::parallel_for), the softmax passes through the vectorised row helpers.
#include "segops/cpu/gemm.h"
#include "segops/cpu/guards.h"
#include "segops/cpu/softmax_rows.h"

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using segops::cpu::exp_affine;
using segops::cpu::gemm_rm;
using segops::cpu::scale_and_max;

constexpr int64_t BM = 256;  // queries per block
constexpr int64_t BN = 256;  // keys per block

// query, key, value (and unary) as the kernels index them: (N, Ck, Lq), (N, Ck, Lk), (N, Cv, Lk),
// (N, Lk).
void check_inputs(const char* kernel, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const std::optional<at::Tensor>& unary) {
  segops::cpu::check_operands(kernel, 3, {{"query", &q}, {"key", &k}, {"value", &v}});
  const int64_t N = q.size(0), Lk = k.size(2);
  segops::guards::check_sizes(kernel, "key", k, {N, q.size(1), Lk});
  segops::guards::check_sizes(kernel, "value", v, {N, v.size(1), Lk});
  if (unary.has_value()) {
    segops::guards::check_rank(kernel, 2, {{"unary", &*unary}});
    segops::guards::check_like(kernel, q, {{"unary", &*unary}});
    segops::guards::check_sizes(kernel, "unary", *unary, {N, Lk});
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

// A (C, len) matrix: its first element and its row stride.
template <typename T>
struct Block {
  const T* p;
  int64_t ld;
};

// One (C, len) block of positions [p0, p0 + len) of sample n of a (N, C, L) operand: the input
// itself, or (whitening) the input minus its channel means, written to `scratch`. Whitening
// block by block costs C * len per block against C * len * (block of the other side) for the
// GEMM it feeds, and needs no whitened copy of the whole tensor.
template <typename T>
struct Operand {
  const T* base;
  const T* mean;  // (N, C) or nullptr
  int64_t C, L;

  Block<T> block(int64_t n, int64_t p0, int64_t len, T* scratch) const {
    const T* src = base + n * C * L + p0;
    if (mean == nullptr) return {src, L};
    for (int64_t c = 0; c < C; ++c) {
      const T mu = mean[n * C + c];
      const T* a = src + c * L;
      T* o = scratch + c * len;
      for (int64_t i = 0; i < len; ++i) o[i] = a[i] - mu;
    }
    return {scratch, len};
  }
};

// d[j] = p[j] * (d[j] - D): the softmax backward of one row.
template <typename T>
void softmax_grad_row(const T* p, T* d, int64_t len, T D) {
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
      const T* vn = vp + n * Cv * Lk;
      const Block<T> Qi = Q.block(n, i0, bm, qs.data());  // (Ck, bm)
      std::fill(acc.begin(), acc.begin() + Cv * bm, T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      for (int64_t j0 = 0; j0 < Lk; j0 += BN) {
        const int64_t bn = std::min(BN, Lk - j0);
        const Block<T> Kj = K.block(n, j0, bn, ks.data());  // (Ck, bn)
        gemm_rm<T>(true, false, bm, bn, Ck, T(1), Qi.p, Qi.ld, Kj.p, Kj.ld, T(0), S.data(), bn);
        for (int64_t i = 0; i < bm; ++i) {
          T* row = S.data() + i * bn;
          const T mnew = std::max(m[i], scale_and_max(row, bn, s));
          alpha[i] = std::exp(m[i] - mnew);  // exp(-inf) = 0 on the first block
          m[i] = mnew;
          l[i] = l[i] * alpha[i] + exp_affine(row, bn, T(1), mnew);
        }
        if (j0 > 0) {
          for (int64_t c = 0; c < Cv; ++c) {
            T* a = acc.data() + c * bm;
            for (int64_t i = 0; i < bm; ++i) a[i] *= alpha[i];
          }
        }
        // acc (Cv, bm) += v_j (Cv, bn) @ S^T (bn, bm)
        gemm_rm<T>(false, true, Cv, bm, bn, T(1), vn + j0, Lk, S.data(), bn, T(1), acc.data(), bm);
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
  check_inputs("disentangled_non_local_forward (cpu)", query, key, value, unary);
  const int64_t N = query.size(0), Lq = query.size(2), Cv = value.size(1), Lk = key.size(2);
  auto out = at::empty({N, Cv, Lq}, value.options());
  auto lse = at::empty({N, Lq}, query.options());
  auto g = at::zeros({N, Cv}, query.options());
  auto lse_u = at::zeros({N}, query.options());
  if (Lk == 0) {  // every softmax is over no keys: a zero output (lse = log 0)
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse, g, lse_u};
  }
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
  const int64_t groups_per_sample = (threads + N - 1) / std::max<int64_t>(N, 1);
  const int64_t G = std::max<int64_t>(1, std::min(nkb, groups_per_sample));
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
      const T* vn = vp + n * Cv * Lk;
      const T* gon = gop + n * Cv * Lq;
      T* dqn = grp == 0 ? dqp + n * Ck * Lq : dqb + ((grp - 1) * N + n) * Ck * Lq;
      const T* ln = lp + n * Lq;
      const T* Dn = D.data() + n * Lq;
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int64_t j0 = kb * BN, bn = std::min(BN, Lk - j0);
        const Block<T> Kj = K.block(n, j0, bn, ks.data());  // (Ck, bn)
        const T* Vj = vn + j0;                               // (Cv, bn), row stride Lk
        std::fill(dkacc.begin(), dkacc.begin() + Ck * bn, T(0));
        std::fill(dvacc.begin(), dvacc.begin() + Cv * bn, T(0));
        for (int64_t i0 = 0; i0 < Lq; i0 += BM) {
          const int64_t bm = std::min(BM, Lq - i0);
          const Block<T> Qi = Q.block(n, i0, bm, qs.data());  // (Ck, bm)
          const T* Oi = gon + i0;                              // (Cv, bm), row stride Lq
          // P = exp(s Q_i^T K_j - lse), dP = dO_i^T V_j (both (bm, bn))
          gemm_rm<T>(true, false, bm, bn, Ck, T(1), Qi.p, Qi.ld, Kj.p, Kj.ld, T(0), P.data(), bn);
          for (int64_t i = 0; i < bm; ++i) exp_affine(P.data() + i * bn, bn, s, ln[i0 + i]);
          gemm_rm<T>(true, false, bm, bn, Cv, T(1), Oi, Lq, Vj, Lk, T(0), dP.data(), bn);
          for (int64_t i = 0; i < bm; ++i) {
            softmax_grad_row<T>(P.data() + i * bn, dP.data() + i * bn, bn, Dn[i0 + i]);
          }
          // dV_j += dO_i P; dK_j += Q_i dS; dQ_i += K_j dS^T
          gemm_rm<T>(false, false, Cv, bn, bm, T(1), Oi, Lq, P.data(), bn, T(1), dvacc.data(), bn);
          gemm_rm<T>(false, false, Ck, bn, bm, T(1), Qi.p, Qi.ld, dP.data(), bn, T(1),
                     dkacc.data(), bn);
          gemm_rm<T>(false, true, Ck, bm, bn, T(1), Kj.p, Kj.ld, dP.data(), bn, T(1), dqn + i0, Lq);
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
  const char* kernel = "disentangled_non_local_backward (cpu)";
  check_inputs(kernel, query, key, value, unary);
  const int64_t N = query.size(0), Lq = query.size(2), Cv = value.size(1);
  segops::guards::check_like(kernel, query, {{"grad_out", &grad_out}, {"out", &out},
                                             {"lse", &lse}, {"g", &g}, {"lse_u", &lse_u}});
  segops::guards::check_sizes(kernel, "grad_out", grad_out, {N, Cv, Lq});
  segops::guards::check_sizes(kernel, "out", out, {N, Cv, Lq});
  segops::guards::check_sizes(kernel, "lse", lse, {N, Lq});
  segops::guards::check_sizes(kernel, "g", g, {N, Cv});
  segops::guards::check_sizes(kernel, "lse_u", lse_u, {N});
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
