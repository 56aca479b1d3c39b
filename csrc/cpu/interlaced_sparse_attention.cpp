// Interlaced sparse self-attention (docs/operators.md §2.2), CPU forward and backward.
//
// Parallel over (sample, band), a band being the groups that together cover whole rows of the
// map (long: the Pw groups of one y mod Ph; short: the W/Pw blocks of one block row), so that
// the gather reads, and the scatter writes, contiguous rows. A task gathers its band's
// query/key/value into a channel-major scratch (C x band pixels, each group a C x L column
// block), runs dense attention per group with a blocked online softmax (query blocks x key
// blocks, GEMMs on the scratch), and scatters the result back in place. Nothing of size
// (groups, L, L) is ever allocated; the forward saves only the per-position log-sum-exp, and the
// backward recomputes the probabilities from it.
//
// Optional additive logits (window attention): bias (nb, L, L) for sample n % nb, mask (nm, L, L)
// for group g % nm, both finite (the ops layer clamps -inf). A task's sample fixes its bias
// slice, so the backward sums its logit gradients into a task-local L x L buffer; the buffers
// are reduced per bias slice at the end in task order (deterministic for any thread count).
#include "segops/cpu/gemm.h"
#include "segops/cpu/guards.h"
#include "segops/cpu/prefetch.h"
#include "segops/cpu/softmax_rows.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace segops {
namespace {

using cpu::gemm_rm;

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

// kGather: band scratch <- map (src is the map); else map <- band scratch (src is the scratch).
template <bool kGather, typename T>
inline void copy_band(const T* src, int64_t C, int64_t HW, const GroupMap& map, int64_t b,
                      T* dst) {
  const int64_t W = map.W, P = map.band_rows * W, L = map.members, pw = map.pw, gw = map.gw;
  const T* map_base = kGather ? src : dst;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t r = 0; r < map.band_rows; ++r) {
      const int64_t row = c * HW + map.band_row(b, r) * W;  // the map row's offset
      if (c + kPrefetch < C) {
        cpu::prefetch_range<kGather ? 0 : 1>(map_base + row + kPrefetch * HW, W);
      }
      if (map.long_range) {
        for (int64_t lx = 0; lx < pw; ++lx) {
          const int64_t band = c * P + lx * L + r * gw;
          for (int64_t gx = 0; gx < gw; ++gx) {
            if constexpr (kGather) dst[band + gx] = src[row + gx * pw + lx];
            else dst[row + gx * pw + lx] = src[band + gx];
          }
        }
      } else {
        for (int64_t gx = 0; gx < gw; ++gx) {
          const int64_t band = c * P + gx * L + r * pw, pix = row + gx * pw;
          for (int64_t lx = 0; lx < pw; ++lx) {
            if constexpr (kGather) dst[band + lx] = src[pix + lx];
            else dst[pix + lx] = src[band + lx];
          }
        }
      }
    }
  }
}

template <typename T>
inline void gather_band(const T* src, int64_t C, int64_t HW, const GroupMap& map, int64_t b,
                        T* dst) {
  copy_band<true>(src, C, HW, map, b, dst);
}

template <typename T>
inline void scatter_band(const T* src, int64_t C, int64_t HW, const GroupMap& map, int64_t b,
                         T* dst) {
  copy_band<false>(src, C, HW, map, b, dst);
}

// query, key (N, Ck, H, W), value (N, Cv, H, W), and a block size (ph, pw) that tiles (H, W).
void check_inputs(const char* kernel, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, int64_t ph, int64_t pw) {
  cpu::check_operands(kernel, 4, {{"query", &q}, {"key", &k}, {"value", &v}});
  const int64_t H = q.size(2), W = q.size(3);
  guards::check_sizes(kernel, "key", k, q.sizes());
  guards::check_sizes(kernel, "value", v, {q.size(0), v.size(1), H, W});
  guards::check_value(kernel, ph > 0 && pw > 0 && H % ph == 0 && W % pw == 0, "(H, W) = (", H,
                      ", ", W, ") must be divisible by the block size (", ph, ", ", pw, ")");
}

// The additive logit terms of one group: bias and mask slices (L x L), either may be null.
template <typename T>
struct LogitTerms {
  const T* bias = nullptr;
  const T* mask = nullptr;
  int64_t nb = 1, nm = 1;
  bool any() const { return bias != nullptr || mask != nullptr; }
  const T* bias_of(int64_t n, int64_t L) const { return bias ? bias + (n % nb) * L * L : nullptr; }
  const T* mask_of(int64_t g, int64_t L) const { return mask ? mask + (g % nm) * L * L : nullptr; }
};

// s (bm x bn, rows i0.., columns j0.. of the group's L x L logits) += bias + mask.
template <typename T>
inline void add_logit_terms(T* s, int64_t bm, int64_t bn, int64_t i0, int64_t j0, int64_t L,
                            const T* bias, const T* mask) {
  for (int64_t i = 0; i < bm; ++i) {
    T* row = s + i * bn;
    const int64_t at = (i0 + i) * L + j0;
    if (bias != nullptr) {
      for (int64_t j = 0; j < bn; ++j) row[j] += bias[at + j];
    }
    if (mask != nullptr) {
      for (int64_t j = 0; j < bn; ++j) row[j] += mask[at + j];
    }
  }
}

template <typename T>
void forward_kernel(const T* Q, const T* K, const T* V, const LogitTerms<T>& terms, T* O, T* LSE,
                    int64_t N, int64_t Ck, int64_t Cv, const GroupMap& map, T scale) {
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
      const T* bias = terms.bias_of(n, L);
      for (int64_t j = 0; j < J; ++j) {
        const T* qg = qs.data() + j * L;  // this group's C x L blocks, leading dimension P
        const T* kg = ks.data() + j * L;
        const T* vg = vs.data() + j * L;
        const T* mask = terms.mask_of(b * J + j, L);
        for (int64_t i0 = 0; i0 < L; i0 += kBlockM) {
          const int64_t bm = std::min(kBlockM, L - i0);
          std::fill(mrow.begin(), mrow.end(), -std::numeric_limits<T>::infinity());
          std::fill(lrow.begin(), lrow.end(), T(0));
          for (int64_t j0 = 0; j0 < L; j0 += kBlockN) {
            const int64_t bn = std::min(kBlockN, L - j0);
            // s (bm x bn) = scale * Q[:, i]^T K[:, j]
            gemm_rm<T>(true, false, bm, bn, Ck, scale, qg + i0, P, kg + j0, P, T(0), s.data(), bn);
            if (terms.any()) add_logit_terms(s.data(), bm, bn, i0, j0, L, bias, mask);
            for (int64_t i = 0; i < bm; ++i) {
              T* row = s.data() + i * bn;
              const T mx = std::max(mrow[i], cpu::scale_and_max(row, bn, T(1)));
              alpha[i] = std::exp(mrow[i] - mx);  // 0 on the first block (m = -inf)
              lrow[i] = lrow[i] * alpha[i] + cpu::exp_affine(row, bn, T(1), mx);
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

// dBias_tasks: null without a bias, else one L x L buffer per task (sample, band), filled here.
template <typename T>
void backward_kernel(const T* dO, const T* Q, const T* K, const T* V, const LogitTerms<T>& terms,
                     const T* O, const T* LSE, T* dQ, T* dK, T* dV, T* dBias_tasks, int64_t N,
                     int64_t Ck, int64_t Cv, const GroupMap& map, T scale) {
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
      const T* bias = terms.bias_of(n, L);
      T* dbias = dBias_tasks != nullptr ? dBias_tasks + task * L * L : nullptr;
      if (dbias != nullptr) std::fill(dbias, dbias + L * L, T(0));
      // delta = <dO, O> per pixel, reading the saved output row by row.
      for (int64_t r = 0; r < map.band_rows; ++r) {
        std::fill(drow.begin(), drow.end(), T(0));
        const int64_t y = map.band_row(b, r);
        for (int64_t c = 0; c < Cv; ++c) {
          const T* o = O + (n * Cv + c) * HW + y * W;
          const T* g = dO + (n * Cv + c) * HW + y * W;
          if (c + kPrefetch < Cv) {
            cpu::prefetch_range<0>(o + kPrefetch * HW, W);
            cpu::prefetch_range<0>(g + kPrefetch * HW, W);
          }
          for (int64_t x = 0; x < W; ++x) drow[x] += o[x] * g[x];
        }
        for (int64_t x = 0; x < W; ++x) delta[slot[r * W + x]] = drow[x];
      }
      for (int64_t j = 0; j < J; ++j) {
        const int64_t off = j * L;
        T *qg = qs.data() + off, *kg = ks.data() + off, *vg = vs.data() + off;
        T* dog = dos.data() + off;
        const T* mask = terms.mask_of(b * J + j, L);
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
            if (terms.any()) add_logit_terms(p.data(), bm, bn, i0, j0, L, bias, mask);
            for (int64_t i = 0; i < bm; ++i) {
              cpu::exp_affine(p.data() + i * bn, bn, T(1), lse[off + i0 + i]);
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
              if (dbias != nullptr) {
                T* acc = dbias + (i0 + i) * L + j0;
                for (int64_t jj = 0; jj < bn; ++jj) acc[jj] += drw[jj];
              }
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

// grad_bias[h] = sum over the tasks of samples n with n % nb == h, in task order.
template <typename T>
void reduce_bias_grad(const T* dbias_tasks, int64_t N, int64_t bands, int64_t nb, int64_t LL,
                      T* grad_bias) {
  at::parallel_for(0, nb * LL, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t h = e / LL, at = e % LL;
      T sum = 0;
      for (int64_t n = h; n < N; n += nb)
        for (int64_t b = 0; b < bands; ++b) sum += dbias_tasks[(n * bands + b) * LL + at];
      grad_bias[e] = sum;
    }
  });
}

// bias (nb, L, L) / mask (nm, L, L) of the query's dtype, nb | N and nm | G (checked by the ops
// layer; re-checked here since the kernels index with them).
void check_logit_term(const char* kernel, const char* name, const at::Tensor& t,
                      const at::Tensor& query, int64_t count, int64_t members) {
  guards::check_like(kernel, query, {{name, &t}});
  guards::check_value(kernel, t.dim() == 3 && t.size(0) > 0 && count % t.size(0) == 0 &&
                      t.size(1) == members && t.size(2) == members, name,
                      " must have shape (k, L, L) with L = ", members, " and k dividing ", count,
                      ", got ", t.sizes());
}

template <typename T>
LogitTerms<T> logit_terms(const char* kernel, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& mask, const at::Tensor& query,
                          const GroupMap& map) {
  LogitTerms<T> terms;
  if (bias.has_value()) {
    check_logit_term(kernel, "bias", *bias, query, query.size(0), map.members);
    terms.bias = bias->const_data_ptr<T>();
    terms.nb = bias->size(0);
  }
  if (mask.has_value()) {
    check_logit_term(kernel, "mask", *mask, query, map.groups, map.members);
    terms.mask = mask->const_data_ptr<T>();
    terms.nm = mask->size(0);
  }
  return terms;
}

// Unlike the other CPU kernels these take any layout (the op is registered so), and copy what
// is not contiguous.
std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// The group layout of checked operands (check_inputs runs before any size is read).
GroupMap checked_map(const char* kernel, const at::Tensor& query, const at::Tensor& key,
                     const at::Tensor& value, int64_t ph, int64_t pw, bool long_range) {
  check_inputs(kernel, query, key, value, ph, pw);
  return GroupMap(query.size(2), query.size(3), ph, pw, long_range);
}

// The operands of both passes, contiguous and checked: query, key (N, Ck, H, W), value
// (N, Cv, H, W), the optional logit terms, and the group layout (H and W are map.H, map.W).
struct Operands {
  at::Tensor query, key, value;
  std::optional<at::Tensor> bias, mask;
  GroupMap map;
  int64_t N, Ck, Cv;
  Operands(const char* kernel, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& m, int64_t ph,
           int64_t pw, bool long_range)
      : query(q.contiguous()), key(k.contiguous()), value(v.contiguous()), bias(contiguous(b)),
        mask(contiguous(m)), map(checked_map(kernel, query, key, value, ph, pw, long_range)),
        N(query.size(0)), Ck(query.size(1)), Cv(value.size(1)) {}
};

std::tuple<at::Tensor, at::Tensor> isa_forward(
    const at::Tensor& query_any, const at::Tensor& key_any, const at::Tensor& value_any,
    const std::optional<at::Tensor>& bias_any, const std::optional<at::Tensor>& mask_any,
    int64_t ph, int64_t pw, bool long_range, double scale) {
  const char* kernel = "interlaced_sparse_attention_forward (cpu)";
  const Operands in(kernel, query_any, key_any, value_any, bias_any, mask_any, ph, pw,
                    long_range);
  const auto& query = in.query;
  auto out = at::empty({in.N, in.Cv, in.map.H, in.map.W}, in.value.options());
  auto lse = at::empty({in.N, in.map.H, in.map.W}, query.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "interlaced_sparse_attention_forward", [&] {
    const auto terms = logit_terms<scalar_t>(kernel, in.bias, in.mask, query, in.map);
    if (lse.numel() == 0) return;  // no positions (then out is empty too)
    forward_kernel<scalar_t>(query.const_data_ptr<scalar_t>(), in.key.const_data_ptr<scalar_t>(),
                             in.value.const_data_ptr<scalar_t>(), terms,
                             out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>(),
                             in.N, in.Ck, in.Cv, in.map, static_cast<scalar_t>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> isa_backward(
    const at::Tensor& grad_out_any, const at::Tensor& query_any, const at::Tensor& key_any,
    const at::Tensor& value_any, const std::optional<at::Tensor>& bias_any,
    const std::optional<at::Tensor>& mask_any, const at::Tensor& out_any,
    const at::Tensor& lse_any, int64_t ph, int64_t pw, bool long_range, double scale) {
  const char* kernel = "interlaced_sparse_attention_backward (cpu)";
  const Operands in(kernel, query_any, key_any, value_any, bias_any, mask_any, ph, pw,
                    long_range);
  const auto &query = in.query, &key = in.key, &value = in.value;
  const auto& bias = in.bias;
  const auto& map = in.map;
  const int64_t N = in.N, Ck = in.Ck, Cv = in.Cv, H = map.H, W = map.W;
  const auto grad_out = grad_out_any.contiguous(), out = out_any.contiguous(),
             lse = lse_any.contiguous();
  guards::check_like(kernel, query, {{"grad_out", &grad_out}, {"out", &out}, {"lse", &lse}});
  guards::check_sizes(kernel, "grad_out", grad_out, value.sizes());
  guards::check_sizes(kernel, "out", out, value.sizes());
  guards::check_sizes(kernel, "lse", lse, {N, H, W});
  auto dq = at::empty_like(query), dk = at::empty_like(key), dv = at::empty_like(value);
  // No positions: every gradient is empty, the bias's is zero.
  auto dbias = bias.has_value() ? at::zeros_like(*bias) : at::empty({0}, query.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "interlaced_sparse_attention_backward", [&] {
    const auto terms = logit_terms<scalar_t>(kernel, bias, in.mask, query, map);
    if (lse.numel() == 0) return;
    const int64_t LL = map.members * map.members;
    at::Tensor dbias_tasks;
    if (bias.has_value()) dbias_tasks = at::empty({N * map.bands * LL}, query.options());
    backward_kernel<scalar_t>(
        grad_out.const_data_ptr<scalar_t>(), query.const_data_ptr<scalar_t>(),
        key.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(), terms,
        out.const_data_ptr<scalar_t>(), lse.const_data_ptr<scalar_t>(),
        dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
        dv.mutable_data_ptr<scalar_t>(),
        bias.has_value() ? dbias_tasks.mutable_data_ptr<scalar_t>() : nullptr, N, Ck, Cv, map,
        static_cast<scalar_t>(scale));
    if (bias.has_value()) {
      reduce_bias_grad<scalar_t>(dbias_tasks.const_data_ptr<scalar_t>(), N, map.bands, terms.nb,
                                 LL, dbias.mutable_data_ptr<scalar_t>());
    }
  });
  return {dq, dk, dv, dbias};
}

}  // namespace
}  // namespace segops

TORCH_LIBRARY_IMPL(segops_C, CPU, m) {
  m.impl("interlaced_sparse_attention_forward", &segops::isa_forward);
  m.impl("interlaced_sparse_attention_backward", &segops::isa_backward);
}
