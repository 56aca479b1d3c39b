// Interlaced sparse self-attention (SPEC §2.2), CPU forward and backward.
//
// Parallel over (sample, group). Each task gathers its group's query/key/value columns out of
// the (N, C, H, W) layout into a small channel-major scratch (C x L), runs dense attention with
// a blocked online softmax (query blocks x key blocks, BLAS GEMMs on the scratch), and scatters
// the result back in place. Nothing of size (groups, L, L) is ever allocated; the forward saves
// only the per-position log-sum-exp, and the backward recomputes the probabilities from it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace segops {
namespace {

constexpr int64_t kBlockM = 64;   // query rows per block
constexpr int64_t kBlockN = 128;  // keys per block (online softmax across key blocks)

// Group mapping: group g, member m -> pixel offset y * W + x (the one place that knows it).
// long:  G = Ph*Pw groups (ly, lx) = (g / Pw, g % Pw); members (gy, gx) row-major over (H/Ph, W/Pw).
// short: G = (H/Ph)*(W/Pw) groups (gy, gx); members (ly, lx) row-major over (Ph, Pw).
// In both, y = gy * Ph + ly and x = gx * Pw + lx.
struct GroupMap {
  int64_t H, W, ph, pw, gw, groups, members;
  bool long_range;
  GroupMap(int64_t H_, int64_t W_, int64_t ph_, int64_t pw_, bool long_)
      : H(H_), W(W_), ph(ph_), pw(pw_), gw(W_ / pw_), long_range(long_) {
    const int64_t inner = ph * pw, outer = (H / ph) * (W / pw);
    groups = long_ ? inner : outer;
    members = long_ ? outer : inner;
  }
  int64_t pixel(int64_t g, int64_t m) const {
    int64_t gy, gx, ly, lx;
    if (long_range) {
      ly = g / pw; lx = g % pw; gy = m / gw; gx = m % gw;
    } else {
      gy = g / gw; gx = g % gw; ly = m / pw; lx = m % pw;
    }
    return (gy * ph + ly) * W + gx * pw + lx;
  }
  void pixels(int64_t g, int64_t* out) const {
    for (int64_t m = 0; m < members; ++m) out[m] = pixel(g, m);
  }
};

// A row-major (rows x cols, leading dimension ld) block of scratch as a tensor, optionally
// transposed (a view: the GEMM below reads it through its strides, no copy).
template <typename T>
inline at::Tensor block(const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  auto t = at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                         at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  return trans ? t.t() : t;
}

// Row-major GEMM on scratch: C(MxN) = alpha op(A) op(B) + beta C (beta = 0 ignores C), through
// ATen's addmm (MKL/OpenBLAS; single-threaded inside the parallel region).
template <typename T>
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                    int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  auto a = ta ? block(A, K, M, lda, true) : block(A, M, K, lda, false);
  auto b = tb ? block(B, N, K, ldb, true) : block(B, K, N, ldb, false);
  auto c = block(C, M, N, ldc, false);
  c.addmm_(a, b, beta, alpha);
}

// dst[c * L + m] = src[c * HW + pix[m]] for C channels.
template <typename T>
inline void gather(const T* src, int64_t C, int64_t HW, const int64_t* pix, int64_t L, T* dst) {
  for (int64_t c = 0; c < C; ++c) {
    const T* s = src + c * HW;
    T* d = dst + c * L;
    for (int64_t m = 0; m < L; ++m) d[m] = s[pix[m]];
  }
}

template <typename T>
inline void scatter(const T* src, int64_t C, int64_t HW, const int64_t* pix, int64_t L, T* dst) {
  for (int64_t c = 0; c < C; ++c) {
    const T* s = src + c * L;
    T* d = dst + c * HW;
    for (int64_t m = 0; m < L; ++m) d[pix[m]] = s[m];
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ph,
                  int64_t pw) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "interlaced_sparse_attention: query, key, value must be 4-D (N, C, H, W)");
  TORCH_CHECK(k.sizes() == q.sizes(), "interlaced_sparse_attention: key shape ", k.sizes(),
              " must equal query shape ", q.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(2) == q.size(2) && v.size(3) == q.size(3),
              "interlaced_sparse_attention: value (N, H, W) must match query's, got ", v.sizes(),
              " vs ", q.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "interlaced_sparse_attention: query, key, value must share one dtype");
  TORCH_CHECK(ph > 0 && pw > 0 && q.size(2) % ph == 0 && q.size(3) % pw == 0,
              "interlaced_sparse_attention: (H, W) = (", q.size(2), ", ", q.size(3),
              ") must be divisible by block_size (", ph, ", ", pw, ")");
}

template <typename T>
void forward_kernel(const T* Q, const T* K, const T* V, T* O, T* LSE, int64_t N, int64_t Ck,
                    int64_t Cv, const GroupMap& map, T scale) {
  const int64_t HW = map.H * map.W, L = map.members, G = map.groups;
  const int64_t bm_max = std::min(kBlockM, L), bn_max = std::min(kBlockN, L);
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> pix(L);
    std::vector<T> qs(Ck * L), ks(Ck * L), vs(Cv * L), os(Cv * bm_max), s(bm_max * bn_max);
    std::vector<T> mrow(bm_max), lrow(bm_max), alpha(bm_max);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / G, g = task % G;
      map.pixels(g, pix.data());
      gather(Q + n * Ck * HW, Ck, HW, pix.data(), L, qs.data());
      gather(K + n * Ck * HW, Ck, HW, pix.data(), L, ks.data());
      gather(V + n * Cv * HW, Cv, HW, pix.data(), L, vs.data());
      T* out = O + n * Cv * HW;
      for (int64_t i0 = 0; i0 < L; i0 += kBlockM) {
        const int64_t bm = std::min(kBlockM, L - i0);
        std::fill(mrow.begin(), mrow.end(), -std::numeric_limits<T>::infinity());
        std::fill(lrow.begin(), lrow.end(), T(0));
        std::fill(os.begin(), os.end(), T(0));
        for (int64_t j0 = 0; j0 < L; j0 += kBlockN) {
          const int64_t bn = std::min(kBlockN, L - j0);
          // s (bm x bn) = scale * Q[:, i]^T K[:, j]
          gemm_rm<T>(true, false, bm, bn, Ck, scale, qs.data() + i0, L, ks.data() + j0, L, T(0),
                     s.data(), bn);
          for (int64_t i = 0; i < bm; ++i) {
            T* row = s.data() + i * bn;
            T mx = mrow[i];
            for (int64_t j = 0; j < bn; ++j) mx = std::max(mx, row[j]);
            T sum = 0;
            for (int64_t j = 0; j < bn; ++j) {
              row[j] = std::exp(row[j] - mx);
              sum += row[j];
            }
            alpha[i] = std::exp(mrow[i] - mx);  // 0 on the first block (m = -inf)
            lrow[i] = lrow[i] * alpha[i] + sum;
            mrow[i] = mx;
          }
          if (j0 > 0) {
            for (int64_t c = 0; c < Cv; ++c) {
              T* oc = os.data() + c * bm;
              for (int64_t i = 0; i < bm; ++i) oc[i] *= alpha[i];
            }
          }
          // o (Cv x bm) += V[:, j] p^T
          gemm_rm<T>(false, true, Cv, bm, bn, T(1), vs.data() + j0, L, s.data(), bn, T(1),
                     os.data(), bm);
        }
        for (int64_t i = 0; i < bm; ++i) {
          alpha[i] = T(1) / lrow[i];
          LSE[n * HW + pix[i0 + i]] = mrow[i] + std::log(lrow[i]);
        }
        for (int64_t c = 0; c < Cv; ++c) {
          const T* oc = os.data() + c * bm;
          T* d = out + c * HW;
          for (int64_t i = 0; i < bm; ++i) d[pix[i0 + i]] = oc[i] * alpha[i];
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const T* dO, const T* Q, const T* K, const T* V, const T* O, const T* LSE,
                     T* dQ, T* dK, T* dV, int64_t N, int64_t Ck, int64_t Cv, const GroupMap& map,
                     T scale) {
  const int64_t HW = map.H * map.W, L = map.members, G = map.groups;
  const int64_t bm_max = std::min(kBlockM, L), bn_max = std::min(kBlockN, L);
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> pix(L);
    std::vector<T> qs(Ck * L), ks(Ck * L), vs(Cv * L), dos(Cv * L);
    std::vector<T> dqs(Ck * L), dks(Ck * L), dvs(Cv * L);
    std::vector<T> p(bm_max * bn_max), dp(bm_max * bn_max), lse(L), delta(L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / G, g = task % G;
      map.pixels(g, pix.data());
      gather(Q + n * Ck * HW, Ck, HW, pix.data(), L, qs.data());
      gather(K + n * Ck * HW, Ck, HW, pix.data(), L, ks.data());
      gather(V + n * Cv * HW, Cv, HW, pix.data(), L, vs.data());
      gather(dO + n * Cv * HW, Cv, HW, pix.data(), L, dos.data());
      // delta_i = <dO_i, O_i>, read straight from the saved output.
      std::fill(delta.begin(), delta.end(), T(0));
      for (int64_t c = 0; c < Cv; ++c) {
        const T* oc = O + (n * Cv + c) * HW;
        const T* dc = dos.data() + c * L;
        for (int64_t m = 0; m < L; ++m) delta[m] += dc[m] * oc[pix[m]];
      }
      for (int64_t m = 0; m < L; ++m) lse[m] = LSE[n * HW + pix[m]];
      std::fill(dqs.begin(), dqs.end(), T(0));
      std::fill(dks.begin(), dks.end(), T(0));
      std::fill(dvs.begin(), dvs.end(), T(0));
      for (int64_t j0 = 0; j0 < L; j0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, L - j0);
        for (int64_t i0 = 0; i0 < L; i0 += kBlockM) {
          const int64_t bm = std::min(kBlockM, L - i0);
          // p = exp(scale * Q_i^T K_j - lse_i)
          gemm_rm<T>(true, false, bm, bn, Ck, scale, qs.data() + i0, L, ks.data() + j0, L, T(0),
                     p.data(), bn);
          for (int64_t i = 0; i < bm; ++i) {
            T* row = p.data() + i * bn;
            const T l = lse[i0 + i];
            for (int64_t j = 0; j < bn; ++j) row[j] = std::exp(row[j] - l);
          }
          // dV[:, j] += dO[:, i] p
          gemm_rm<T>(false, false, Cv, bn, bm, T(1), dos.data() + i0, L, p.data(), bn, T(1),
                     dvs.data() + j0, L);
          // dp = dO[:, i]^T V[:, j]; ds = p * (dp - delta_i)
          gemm_rm<T>(true, false, bm, bn, Cv, T(1), dos.data() + i0, L, vs.data() + j0, L, T(0),
                     dp.data(), bn);
          for (int64_t i = 0; i < bm; ++i) {
            T* drow = dp.data() + i * bn;
            const T* prow = p.data() + i * bn;
            const T d = delta[i0 + i];
            for (int64_t j = 0; j < bn; ++j) drow[j] = prow[j] * (drow[j] - d);
          }
          // dQ[:, i] += scale K[:, j] ds^T ; dK[:, j] += scale Q[:, i] ds
          gemm_rm<T>(false, true, Ck, bm, bn, scale, ks.data() + j0, L, dp.data(), bn, T(1),
                     dqs.data() + i0, L);
          gemm_rm<T>(false, false, Ck, bn, bm, scale, qs.data() + i0, L, dp.data(), bn, T(1),
                     dks.data() + j0, L);
        }
      }
      scatter(dqs.data(), Ck, HW, pix.data(), L, dQ + n * Ck * HW);
      scatter(dks.data(), Ck, HW, pix.data(), L, dK + n * Ck * HW);
      scatter(dvs.data(), Cv, HW, pix.data(), L, dV + n * Cv * HW);
    }
  });
}

at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> isa_forward(const at::Tensor& query, const at::Tensor& key,
                                               const at::Tensor& value, int64_t ph, int64_t pw,
                                               bool long_range, double scale) {
  check_inputs(query, key, value, ph, pw);
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble,
              "interlaced_sparse_attention (cpu): float32 or float64 expected, got ",
              query.scalar_type());
  const auto q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const int64_t N = q.size(0), Ck = q.size(1), H = q.size(2), W = q.size(3), Cv = v.size(1);
  auto out = at::empty({N, Cv, H, W}, v.options());
  auto lse = at::empty({N, H, W}, q.options().dtype(lse_dtype(q)));
  if (out.numel() == 0 || lse.numel() == 0) return {out, lse};
  TORCH_CHECK(Ck > 0, "interlaced_sparse_attention (cpu): Ck must be positive");
  GroupMap map(H, W, ph, pw, long_range);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "interlaced_sparse_attention_forward", [&] {
    forward_kernel<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                             v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                             lse.mutable_data_ptr<scalar_t>(), N, Ck, Cv, map,
                             static_cast<scalar_t>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> isa_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse, int64_t ph, int64_t pw,
    bool long_range, double scale) {
  check_inputs(query, key, value, ph, pw);
  TORCH_CHECK(grad_out.sizes() == value.sizes() && out.sizes() == value.sizes(),
              "interlaced_sparse_attention_backward: grad_out and out must have value's shape ",
              value.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == query.size(0) && lse.size(1) == query.size(2) &&
                  lse.size(2) == query.size(3) && lse.scalar_type() == lse_dtype(query),
              "interlaced_sparse_attention_backward: lse must be (N, H, W) of dtype ",
              lse_dtype(query), ", got ", lse.sizes(), " ", lse.scalar_type());
  TORCH_CHECK(grad_out.scalar_type() == query.scalar_type() &&
                  out.scalar_type() == query.scalar_type(),
              "interlaced_sparse_attention_backward: grad_out/out dtype must match query's");
  const auto q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const auto go = grad_out.contiguous(), o = out.contiguous(), l = lse.contiguous();
  const int64_t N = q.size(0), Ck = q.size(1), H = q.size(2), W = q.size(3), Cv = v.size(1);
  auto dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  if (q.numel() == 0 || v.numel() == 0) return {dq, dk, dv};
  GroupMap map(H, W, ph, pw, long_range);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "interlaced_sparse_attention_backward", [&] {
    TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble);
    backward_kernel<scalar_t>(go.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                              k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                              o.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>(),
                              dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                              dv.mutable_data_ptr<scalar_t>(), N, Ck, Cv, map,
                              static_cast<scalar_t>(scale));
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace segops

TORCH_LIBRARY_IMPL(segops_C, CPU, m) {
  m.impl("interlaced_sparse_attention_forward", &segops::isa_forward);
  m.impl("interlaced_sparse_attention_backward", &segops::isa_backward);
}
