// Interlaced sparse self-attention (SPEC §2.2), CPU forward and backward.
//
// Parallel over (sample, band), a band being the groups that together cover whole rows of the
// map (long: the Pw groups of one y mod Ph; short: the W/Pw blocks of one block row), so that
// the gather reads, and the scatter writes, contiguous rows. A task gathers its band's
// query/key/value into a channel-major scratch (C x band pixels, each group a C x L column
// block), runs dense attention per group with a blocked online softmax (query blocks x key
// blocks, BLAS GEMMs on the scratch), and scatters the result back in place. Nothing of size
// (groups, L, L) is ever allocated; the forward saves only the per-position log-sum-exp, and the
// backward recomputes the probabilities from it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/empty_like.h>
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
// Bands: long band b = ly holds groups b*Pw .. b*Pw+Pw-1 and rows y = r*Ph + b (r < H/Ph);
// short band b = gy holds groups b*GW .. b*GW+GW-1 and rows y = b*Ph + r (r < Ph).
struct GroupMap {
  int64_t H, W, ph, pw, gw, groups, members, bands, band_groups, band_rows;
  bool long_range;
  GroupMap(int64_t H_, int64_t W_, int64_t ph_, int64_t pw_, bool long_)
      : H(H_), W(W_), ph(ph_), pw(pw_), gw(W_ / pw_), long_range(long_) {
    const int64_t inner = ph * pw, outer = (H / ph) * (W / pw);
    groups = long_ ? inner : outer;
    members = long_ ? outer : inner;
    bands = long_ ? ph : H / ph;
    band_groups = long_ ? pw : gw;
    band_rows = long_ ? H / ph : ph;
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
  int64_t band_row(int64_t b, int64_t r) const { return long_range ? r * ph + b : b * ph + r; }
  // slot[r * W + x] = j * L + m for the pixel (row r of the band, column x): group j of the band
  // (group b * band_groups + j), member m. Same for every band.
  void band_slots(int64_t* slot) const {
    for (int64_t r = 0; r < band_rows; ++r)
      for (int64_t x = 0; x < W; ++x) {
        const int64_t j = long_range ? x % pw : x / pw;
        const int64_t m = long_range ? r * gw + x / pw : r * pw + x % pw;
        slot[r * W + x] = j * members + m;
      }
  }
};

// Band gather: dst[c * P + j * L + m] = src[c * HW + y * W + x] for the band's pixels, reading
// whole rows. long: (row r, x = gx*Pw + lx) -> j = lx, m = r*GW + gx (a de-interleave: strided
// reads inside an L1-resident row, contiguous writes); short: (row r, x = gx*Pw + lx) -> j = gx,
// m = r*Pw + lx (contiguous runs of Pw). The slot table is the generic form (used for 1-channel
// data); these loops are its fast special cases.
// Rows of consecutive channels lie HW apart, which the hardware prefetcher does not follow:
// request the row kPrefetch channels ahead while the current one is processed.
constexpr int64_t kPrefetch = 4;
template <int RW, typename T>
inline void prefetch_row(const T* row, int64_t W) {
  constexpr int64_t step = 64 / sizeof(T);
  for (int64_t x = 0; x < W; x += step) __builtin_prefetch(row + x, RW);
  __builtin_prefetch(row + W - 1, RW);
}

template <typename T>
inline void gather_band(const T* src, int64_t C, int64_t HW, const GroupMap& map, int64_t b,
                        T* dst) {
  const int64_t W = map.W, P = map.band_rows * W, L = map.members, pw = map.pw, gw = map.gw;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t r = 0; r < map.band_rows; ++r) {
      const T* s = src + c * HW + map.band_row(b, r) * W;
      if (c + kPrefetch < C) prefetch_row<0>(s + kPrefetch * HW, W);
      if (map.long_range) {
        for (int64_t lx = 0; lx < pw; ++lx) {
          T* d = dst + c * P + lx * L + r * gw;
          for (int64_t gx = 0; gx < gw; ++gx) d[gx] = s[gx * pw + lx];
        }
      } else {
        for (int64_t gx = 0; gx < gw; ++gx) {
          T* d = dst + c * P + gx * L + r * pw;
          const T* sg = s + gx * pw;
          for (int64_t lx = 0; lx < pw; ++lx) d[lx] = sg[lx];
        }
      }
    }
  }
}

template <typename T>
inline void scatter_band(const T* src, int64_t C, int64_t HW, const GroupMap& map, int64_t b,
                         T* dst) {
  const int64_t W = map.W, P = map.band_rows * W, L = map.members, pw = map.pw, gw = map.gw;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t r = 0; r < map.band_rows; ++r) {
      T* d = dst + c * HW + map.band_row(b, r) * W;
      if (c + kPrefetch < C) prefetch_row<1>(d + kPrefetch * HW, W);
      if (map.long_range) {
        for (int64_t lx = 0; lx < pw; ++lx) {
          const T* s = src + c * P + lx * L + r * gw;
          for (int64_t gx = 0; gx < gw; ++gx) d[gx * pw + lx] = s[gx];
        }
      } else {
        for (int64_t gx = 0; gx < gw; ++gx) {
          const T* s = src + c * P + gx * L + r * pw;
          T* dg = d + gx * pw;
          for (int64_t lx = 0; lx < pw; ++lx) dg[lx] = s[lx];
        }
      }
    }
  }
}

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
  const int64_t HW = map.H * map.W, L = map.members, J = map.band_groups;
  const int64_t P = map.band_rows * map.W;  // pixels of a band (= J * L): the scratch stride
  const int64_t bm_max = std::min(kBlockM, L), bn_max = std::min(kBlockN, L);
  at::parallel_for(0, N * map.bands, 1, [&](int64_t begin, int64_t end) {
    // The band's output reuses the value scratch: group j's values are dead once its output
    // (built in og, C x L) is complete.
    std::vector<T> qs(Ck * P), ks(Ck * P), vs(Cv * P), og(Cv * L), lse(P);
    std::vector<T> os(Cv * bm_max), s(bm_max * bn_max), mrow(bm_max), lrow(bm_max), alpha(bm_max);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / map.bands, b = task % map.bands;
      gather_band(Q + n * Ck * HW, Ck, HW, map, b, qs.data());
      gather_band(K + n * Ck * HW, Ck, HW, map, b, ks.data());
      gather_band(V + n * Cv * HW, Cv, HW, map, b, vs.data());
      for (int64_t j = 0; j < J; ++j) {
        const T* qg = qs.data() + j * L;  // this group's C x L blocks, leading dimension P
        const T* kg = ks.data() + j * L;
        const T* vg = vs.data() + j * L;
        for (int64_t i0 = 0; i0 < L; i0 += kBlockM) {
          const int64_t bm = std::min(kBlockM, L - i0);
          std::fill(mrow.begin(), mrow.end(), -std::numeric_limits<T>::infinity());
          std::fill(lrow.begin(), lrow.end(), T(0));
          for (int64_t j0 = 0; j0 < L; j0 += kBlockN) {
            const int64_t bn = std::min(kBlockN, L - j0);
            // s (bm x bn) = scale * Q[:, i]^T K[:, j]
            gemm_rm<T>(true, false, bm, bn, Ck, scale, qg + i0, P, kg + j0, P, T(0), s.data(), bn);
            for (int64_t i = 0; i < bm; ++i) {
              T* row = s.data() + i * bn;
              T mx = mrow[i];
              for (int64_t jj = 0; jj < bn; ++jj) mx = std::max(mx, row[jj]);
              T sum = 0;
              for (int64_t jj = 0; jj < bn; ++jj) {
                row[jj] = std::exp(row[jj] - mx);
                sum += row[jj];
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
            // o (Cv x bm) (+)= V[:, j] p^T
            gemm_rm<T>(false, true, Cv, bm, bn, T(1), vg + j0, P, s.data(), bn,
                       j0 > 0 ? T(1) : T(0), os.data(), bm);
          }
          for (int64_t i = 0; i < bm; ++i) {
            alpha[i] = T(1) / lrow[i];
            lse[j * L + i0 + i] = mrow[i] + std::log(lrow[i]);
          }
          for (int64_t c = 0; c < Cv; ++c) {
            const T* oc = os.data() + c * bm;
            T* d = og.data() + c * L + i0;
            for (int64_t i = 0; i < bm; ++i) d[i] = oc[i] * alpha[i];
          }
        }
        for (int64_t c = 0; c < Cv; ++c)
          std::copy(og.data() + c * L, og.data() + (c + 1) * L, vs.data() + c * P + j * L);
      }
      scatter_band(vs.data(), Cv, HW, map, b, O + n * Cv * HW);
      scatter_band(lse.data(), 1, HW, map, b, LSE + n * HW);
    }
  });
}

template <typename T>
void backward_kernel(const T* dO, const T* Q, const T* K, const T* V, const T* O, const T* LSE,
                     T* dQ, T* dK, T* dV, int64_t N, int64_t Ck, int64_t Cv, const GroupMap& map,
                     T scale) {
  const int64_t HW = map.H * map.W, L = map.members, J = map.band_groups, W = map.W;
  const int64_t P = map.band_rows * W;
  const int64_t bm_max = std::min(kBlockM, L), bn_max = std::min(kBlockN, L);
  std::vector<int64_t> slot(P);
  map.band_slots(slot.data());
  at::parallel_for(0, N * map.bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qs(Ck * P), ks(Ck * P), vs(Cv * P), dos(Cv * P);
    // Per-group gradient buffers (C x L); a finished group's gradients overwrite its (dead)
    // query/key/grad-output columns, which are then scattered: no band-sized gradient scratch.
    std::vector<T> dqg_(Ck * L), dkg_(Ck * L), dvg_(Cv * L), lse(P), delta(P), drow(W);
    std::vector<T> p(bm_max * bn_max), dp(bm_max * bn_max);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / map.bands, b = task % map.bands;
      gather_band(Q + n * Ck * HW, Ck, HW, map, b, qs.data());
      gather_band(K + n * Ck * HW, Ck, HW, map, b, ks.data());
      gather_band(V + n * Cv * HW, Cv, HW, map, b, vs.data());
      gather_band(dO + n * Cv * HW, Cv, HW, map, b, dos.data());
      gather_band(LSE + n * HW, 1, HW, map, b, lse.data());
      // delta = <dO, O> per pixel, reading the saved output row by row.
      for (int64_t r = 0; r < map.band_rows; ++r) {
        std::fill(drow.begin(), drow.end(), T(0));
        const int64_t y = map.band_row(b, r);
        for (int64_t c = 0; c < Cv; ++c) {
          const T* o = O + (n * Cv + c) * HW + y * W;
          const T* g = dO + (n * Cv + c) * HW + y * W;
          if (c + kPrefetch < Cv) {
            prefetch_row<0>(o + kPrefetch * HW, W);
            prefetch_row<0>(g + kPrefetch * HW, W);
          }
          for (int64_t x = 0; x < W; ++x) drow[x] += o[x] * g[x];
        }
        for (int64_t x = 0; x < W; ++x) delta[slot[r * W + x]] = drow[x];
      }
      for (int64_t j = 0; j < J; ++j) {
        const int64_t off = j * L;
        T *qg = qs.data() + off, *kg = ks.data() + off, *vg = vs.data() + off;
        T* dog = dos.data() + off;
        T *dqg = dqg_.data(), *dkg = dkg_.data(), *dvg = dvg_.data();  // leading dimension L
        std::fill(dqg_.begin(), dqg_.end(), T(0));
        std::fill(dkg_.begin(), dkg_.end(), T(0));
        std::fill(dvg_.begin(), dvg_.end(), T(0));
        for (int64_t j0 = 0; j0 < L; j0 += kBlockN) {
          const int64_t bn = std::min(kBlockN, L - j0);
          for (int64_t i0 = 0; i0 < L; i0 += kBlockM) {
            const int64_t bm = std::min(kBlockM, L - i0);
            // p = exp(scale * Q_i^T K_j - lse_i)
            gemm_rm<T>(true, false, bm, bn, Ck, scale, qg + i0, P, kg + j0, P, T(0), p.data(), bn);
            for (int64_t i = 0; i < bm; ++i) {
              T* row = p.data() + i * bn;
              const T l = lse[off + i0 + i];
              for (int64_t jj = 0; jj < bn; ++jj) row[jj] = std::exp(row[jj] - l);
            }
            // dV[:, j] += dO[:, i] p
            gemm_rm<T>(false, false, Cv, bn, bm, T(1), dog + i0, P, p.data(), bn, T(1), dvg + j0, L);
            // dp = dO[:, i]^T V[:, j]; ds = p * (dp - delta_i)
            gemm_rm<T>(true, false, bm, bn, Cv, T(1), dog + i0, P, vg + j0, P, T(0), dp.data(), bn);
            for (int64_t i = 0; i < bm; ++i) {
              T* drw = dp.data() + i * bn;
              const T* prow = p.data() + i * bn;
              const T d = delta[off + i0 + i];
              for (int64_t jj = 0; jj < bn; ++jj) drw[jj] = prow[jj] * (drw[jj] - d);
            }
            // dQ[:, i] += scale K[:, j] ds^T ; dK[:, j] += scale Q[:, i] ds
            gemm_rm<T>(false, true, Ck, bm, bn, scale, kg + j0, P, dp.data(), bn, T(1), dqg + i0, L);
            gemm_rm<T>(false, false, Ck, bn, bm, scale, qg + i0, P, dp.data(), bn, T(1), dkg + j0, L);
          }
        }
        for (int64_t c = 0; c < Ck; ++c) {
          std::copy(dqg + c * L, dqg + (c + 1) * L, qg + c * P);
          std::copy(dkg + c * L, dkg + (c + 1) * L, kg + c * P);
        }
        for (int64_t c = 0; c < Cv; ++c) std::copy(dvg + c * L, dvg + (c + 1) * L, dog + c * P);
      }
      scatter_band(qs.data(), Ck, HW, map, b, dQ + n * Ck * HW);
      scatter_band(ks.data(), Ck, HW, map, b, dK + n * Ck * HW);
      scatter_band(dos.data(), Cv, HW, map, b, dV + n * Cv * HW);
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
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0 || v.numel() == 0) {
    dq.zero_(); dk.zero_(); dv.zero_();
    return {dq, dk, dv};
  }
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
