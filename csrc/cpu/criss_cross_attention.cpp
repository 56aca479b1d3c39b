// Criss-cross attention (docs/operators.md §2.1), CPU forward and backward.
//
// Every position u = (y, x) attends to its row y and its column x (centre once) with one joint
// softmax. The work splits into "row tasks" (one per (n, y)) and "column tasks" (one per (n,
// block of columns)):
//   * a row of an NCHW tensor is a (C x W) matrix with leading dimension H*W, so the row branch
//     is plain GEMMs straight on the inputs and outputs (no copies);
//   * a column is strided in both directions, so a column task gathers a block of kColBlock
//     columns, chunk of channels by chunk of channels, into small channel-major scratch
//     (reading kColBlock contiguous elements at a time), runs GEMMs there and scatters back.
// The GEMMs go through segops::cpu::gemm_rm (the BLAS that libtorch_cpu carries). Scratch is
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

namespace segops {
namespace {

using cpu::gemm_rm;

constexpr int64_t kColBlock = 8;     // columns per column task (contiguous reads of this many)
constexpr int64_t kChanChunk = 64;   // channels gathered at a time in a column task

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

// p[r, j] = exp((e[r, j] - m[r * stride]) - ll[r * stride]) in place.
template <typename T>
inline void softmax_from_stats(T* e, int64_t R, int64_t L, const T* m, const T* ll,
                               int64_t stride) {
  for (int64_t r = 0; r < R; ++r) {
    cpu::exp_affine(e + r * L, L, T(1), m[r * stride], ll[r * stride]);
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

// Runs f(n, y, e) for every row task (n, y), e the row's energies (W x W, per-thread scratch).
template <typename T, typename F>
void for_each_row(const Dims<T>& d, const T* q, const T* k, F&& f) {
  at::parallel_for(0, d.N * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> e(d.W * d.W);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / d.H, y = t % d.H, off = n * d.Ck * d.HW + y * d.W;
      row_energies(d, q + off, k + off, e.data());
      f(n, y, e.data());
    }
  });
}

template <typename T>
void forward_impl(const Dims<T>& d, const T* q, const T* k, const T* v, T* out, T* st) {
  const int64_t H = d.H, W = d.W, HW = d.HW, Ck = d.Ck, Cv = d.Cv;
  // (1) row log-sum-exp.
  for_each_row(d, q, k, [&](int64_t n, int64_t y, T* e) {
    T* sm = st + 2 * n * HW + y * W;
    row_stats(e, W, W, sm, sm + HW, 1);
  });
  // (2) column tasks: finish the statistics, write the column part of out.
  const int64_t nxb = (W + kColBlock - 1) / kColBlock;
  at::parallel_for(0, d.N * nxb, 1, [&](int64_t begin, int64_t end) {
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
  // (3) row tasks: out[:, y, :] += v_y p_row^T, i.e. out[c, x] += sum_j v[c, j] p[x, j].
  for_each_row(d, q, k, [&](int64_t n, int64_t y, T* e) {
    const T* sm = st + 2 * n * HW + y * W;
    softmax_from_stats(e, W, W, sm, sm + HW, 1);
    gemm_rm<T>(false, true, Cv, W, W, T(1), v + n * Cv * HW + y * W, HW, e, W, T(1),
               out + n * Cv * HW + y * W, HW);
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
