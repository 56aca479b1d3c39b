// Semantic difference convolution (SDN), C++ CPU kernels — docs/operators.md §2.4.
//
//   Y[n,o,p] = b[o] + sum_{c,t} w[o,c,t] * D[n,c,t,p],   D = S(c,p,t) * (U[c,p+d_t] - U[c,p])
//
// with U, V zero outside the image. Never materialises the k^2-unfolded U or V: the forward
// builds the (Cin*k^2) x T panel of D for a tile of T pixels in per-thread scratch and multiplies
// it by the (Cout, Cin*k^2) weight matrix (segops::cpu::gemm_rm); the backward parallelises over
// channel blocks, so each thread rebuilds D for its channels, accumulates its own rows of
// dW^T (D dY_tile^T), computes dD = W^T dY_tile and scatters it into dU/dV of its own channels
// (deterministic, no atomics). "gaussian" uses one small (N, k^2, H*W) similarity tensor (k^2/Cin
// of the unfold size) and, in the backward, per-thread partial sums of dL/dS of that size.
#include "segops/cpu/gemm.h"
#include "segops/cpu/guards.h"
#include "segops/cpu/softmax_rows.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace {

using segops::cpu::gemm_rm;

enum Sim { kNone = 0, kCharbonnier = 1, kGaussian = 2 };

// Pixels per panel: the forward multiplies the (Cout, Cin*k^2) weight by a (Cin*k^2, kTileFwd)
// panel; the backward accumulates dW over (Kc, kTileBwd) panels (fewer read-modify-writes of dW).
constexpr int64_t kTileFwd = 256;
constexpr int64_t kTileBwd = 512;

struct Geo {
  int64_t N, Cin, Cg, Cout, H, W, HW, k, KK, dil, half;
  int64_t dy(int64_t t) const { return (t / k - half) * dil; }
  int64_t dx(int64_t t) const { return (t % k - half) * dil; }
};

int parse_similarity(const char* kernel, const std::string& s) {
  if (s == "none") return kNone;
  if (s == "charbonnier") return kCharbonnier;
  segops::guards::check_value(kernel, s == "gaussian",
                              "similarity must be charbonnier, gaussian or none, got ", s);
  return kGaussian;
}

// input (N, Cin, H, W), guidance (N, Cg, H, W) with Cg == Cin for charbonnier, weight
// (Cout, Cin, k, k).
Geo make_geo(const char* kernel, const at::Tensor& input, const at::Tensor& guidance,
             const at::Tensor& weight, int64_t dilation, int sim) {
  segops::cpu::check_operands(kernel, 4, {{"input", &input}, {"guidance", &guidance},
                                          {"weight", &weight}});
  Geo g;
  g.N = input.size(0); g.Cin = input.size(1); g.H = input.size(2); g.W = input.size(3);
  g.HW = g.H * g.W; g.Cg = guidance.size(1); g.Cout = weight.size(0); g.k = weight.size(2);
  g.KK = g.k * g.k; g.dil = dilation; g.half = (g.k - 1) / 2;
  segops::guards::check_sizes(kernel, "guidance", guidance,
                              {g.N, sim == kCharbonnier ? g.Cin : g.Cg, g.H, g.W});
  segops::guards::check_sizes(kernel, "weight", weight, {g.Cout, g.Cin, g.k, g.k});
  return g;
}

// The row segments of pixels [p0, p1) of one image for tap (dy, dx): row y, columns [xa, xb),
// panel column j0 at pixel (y, xa); [lo, hi) are the x whose neighbour (yy, x + dx), yy = y + dy,
// is inside the image (empty when row yy is outside). A plain iterator, not a callback, so the
// loops over a segment inline into the ISA-specific kernels below.
struct Segment {
  int64_t y, yy, xa, xb, lo, hi, j0;
};

class Segments {
 public:
  Segments(const Geo& g, int64_t p0, int64_t p1, int64_t dy, int64_t dx)
      : W_(g.W), H_(g.H), p0_(p0), p_(p0), p1_(p1), dy_(dy), dx_(dx) {}
  bool next(Segment& s) {
    if (p_ >= p1_) return false;
    s.y = p_ / W_;
    s.xa = p_ % W_;
    s.xb = std::min(W_, s.xa + (p1_ - p_));
    s.yy = s.y + dy_;
    s.lo = std::min(std::max(-dx_, s.xa), s.xb);
    s.hi = std::max(std::min(W_ - dx_, s.xb), s.lo);
    if (s.yy < 0 || s.yy >= H_) s.lo = s.hi = s.xb;
    s.j0 = p_ - p0_;
    p_ += s.xb - s.xa;
    return true;
  }

 private:
  int64_t W_, H_, p0_, p_, p1_, dy_, dx_;
};

// Each elementwise pass below is written once (*_body, always inlined) and compiled three times,
// for AVX-512, for AVX2+FMA and for plain x86-64, picked at run time (segops/cpu/isa.h): the
// extension is built for the x86-64 baseline, whose 128-bit vectors would leave these passes a
// third of the SDC's time. (sqrt vectorises because the extension builds with -fno-math-errno.)
#ifdef SEGOPS_CPU_X86
#define SEGOPS_SDC_ISA_VARIANTS(name)                                                       \
  template <typename T, int SIM, typename... A>                                             \
  __attribute__((target("avx512f"))) void name##_avx512(const A&... a) {                    \
    name##_body<T, SIM>(a...);                                                              \
  }                                                                                         \
  template <typename T, int SIM, typename... A>                                             \
  __attribute__((target("avx2,fma"))) void name##_avx2(const A&... a) {                     \
    name##_body<T, SIM>(a...);                                                              \
  }                                                                                         \
  template <typename T, int SIM, typename... A>                                             \
  void name(const A&... a) {                                                                \
    const segops::cpu::Isa isa = segops::cpu::cpu_isa();                                    \
    if (isa == segops::cpu::Isa::avx512) return name##_avx512<T, SIM>(a...);                \
    if (isa == segops::cpu::Isa::avx2) return name##_avx2<T, SIM>(a...);                    \
    name##_body<T, SIM>(a...);                                                              \
  }
#else
#define SEGOPS_SDC_ISA_VARIANTS(name)                                                       \
  template <typename T, int SIM, typename... A>                                             \
  void name(const A&... a) {                                                                \
    name##_body<T, SIM>(a...);                                                              \
  }
#endif

// Gaussian similarity S[n, t, p] = exp(-sum_c (V[c,p+d]-V[c,p])^2 / (2 sigma^2 Cg)), before the
// exp: the sums of squares of plane (n, t), s (HW).
template <typename T, int SIM>
__attribute__((always_inline)) inline void sum_sq_diffs_body(const Geo& g, const T* V, int64_t n,
                                                             int64_t t, T* s) {
  const int64_t dy = g.dy(t), dx = g.dx(t);
  for (int64_t c = 0; c < g.Cg; ++c) {
    const T* Vc = V + (n * g.Cg + c) * g.HW;
    Segment q;
    for (Segments it(g, 0, g.HW, dy, dx); it.next(q);) {
      T* srow = s + q.y * g.W;
      const T* vrow = Vc + q.y * g.W;
      const T* nrow = Vc + q.yy * g.W + dx;
      for (int64_t x = q.xa; x < q.lo; ++x) srow[x] += vrow[x] * vrow[x];
      for (int64_t x = q.lo; x < q.hi; ++x) { const T d = nrow[x] - vrow[x]; srow[x] += d * d; }
      for (int64_t x = q.hi; x < q.xb; ++x) srow[x] += vrow[x] * vrow[x];
    }
  }
}
SEGOPS_SDC_ISA_VARIANTS(sum_sq_diffs)

template <typename T>
at::Tensor gaussian_similarity(const at::Tensor& guidance, const Geo& g, double sigma) {
  at::Tensor S = at::zeros({g.N, g.KK, g.HW}, guidance.options());
  const T* V = guidance.data_ptr<T>();
  T* Sp = S.data_ptr<T>();
  const T scale = T(-1.0 / (2.0 * sigma * sigma * double(g.Cg)));
  at::parallel_for(0, g.N * g.KK, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T* s = Sp + i * g.HW;
      sum_sq_diffs<T, kGaussian>(g, V, i / g.KK, i % g.KK, s);
      segops::cpu::exp_affine(s, g.HW, scale, T(0));
    }
  });
  return S;
}

// Similarity-weighted differences for channels [c0, c1), pixels [p0, p1) of image n:
// D[(c - c0) * KK + t, j] (row stride ld).
template <typename T, int SIM>
__attribute__((always_inline)) inline void build_panel_body(const Geo& g, const T* U, const T* V,
                                                            const T* S, int64_t n, int64_t c0,
                                                            int64_t c1, int64_t p0, int64_t p1,
                                                            T* D, int64_t ld, T inv_s2) {
  for (int64_t c = c0; c < c1; ++c) {
    const T* Uc = U + (n * g.Cin + c) * g.HW;
    const T* Vc = SIM == kCharbonnier ? V + (n * g.Cg + c) * g.HW : nullptr;
    for (int64_t t = 0; t < g.KK; ++t) {
      const int64_t dx = g.dx(t);
      T* drow = D + ((c - c0) * g.KK + t) * ld;
      const T* St = SIM == kGaussian ? S + (n * g.KK + t) * g.HW : nullptr;
      Segment q;
      for (Segments it(g, p0, p1, g.dy(t), dx); it.next(q);) {
        const int64_t xa = q.xa, xb = q.xb, lo = q.lo, hi = q.hi;
        T* d = drow + q.j0 - xa;  // d[x] is pixel (y, x)
        const T* u = Uc + q.y * g.W;
        const T* un = Uc + q.yy * g.W + dx;
        if (SIM == kNone) {
          for (int64_t x = xa; x < lo; ++x) d[x] = -u[x];
          for (int64_t x = lo; x < hi; ++x) d[x] = un[x] - u[x];
          for (int64_t x = hi; x < xb; ++x) d[x] = -u[x];
        } else if (SIM == kGaussian) {
          const T* s = St + q.y * g.W;
          for (int64_t x = xa; x < lo; ++x) d[x] = -s[x] * u[x];
          for (int64_t x = lo; x < hi; ++x) d[x] = s[x] * (un[x] - u[x]);
          for (int64_t x = hi; x < xb; ++x) d[x] = -s[x] * u[x];
        } else {
          const T* v = Vc + q.y * g.W;
          const T* vn = Vc + q.yy * g.W + dx;
          for (int64_t x = xa; x < lo; ++x) d[x] = -u[x] / std::sqrt(T(1) + v[x] * v[x] * inv_s2);
          for (int64_t x = lo; x < hi; ++x) {
            const T dv = vn[x] - v[x];
            d[x] = (un[x] - u[x]) / std::sqrt(T(1) + dv * dv * inv_s2);
          }
          for (int64_t x = hi; x < xb; ++x) d[x] = -u[x] / std::sqrt(T(1) + v[x] * v[x] * inv_s2);
        }
      }
    }
  }
}
SEGOPS_SDC_ISA_VARIANTS(build_panel)

template <typename T>
void build_panel_any(int sim, const Geo& g, const T* U, const T* V, const T* S, int64_t n,
                     int64_t c0, int64_t c1, int64_t p0, int64_t p1, T* D, int64_t ld, T inv_s2) {
  if (sim == kNone) build_panel<T, kNone>(g, U, V, S, n, c0, c1, p0, p1, D, ld, inv_s2);
  else if (sim == kGaussian) build_panel<T, kGaussian>(g, U, V, S, n, c0, c1, p0, p1, D, ld, inv_s2);
  else build_panel<T, kCharbonnier>(g, U, V, S, n, c0, c1, p0, p1, D, ld, inv_s2);
}

// The charbonnier backward's terms for x in [x0, x1): s = (1 + e^2/sigma^2)^(-1/2) with
// e = V[p+d] - V[p] and ds/de = -s^3 e / sigma^2; a = dD s (to dU) and b = dL/de (dV[p] -= b,
// dV[p+d] += b). INSIDE: the neighbour is in the image (else U, V are zero there and un, vn
// unused). The pointers are restrict so that GCC vectorises without eleven run-time alias checks
// (past its limit of ten, it would leave the loop scalar).
template <typename T, bool INSIDE>
__attribute__((always_inline)) inline void charbonnier_terms(
    int64_t x0, int64_t x1, const T* __restrict gd, const T* __restrict u,
    const T* __restrict un, const T* __restrict v, const T* __restrict vn, T inv_s2,
    T* __restrict a, T* __restrict b) {
  for (int64_t x = x0; x < x1; ++x) {
    const T e = INSIDE ? vn[x] - v[x] : -v[x];
    const T du = INSIDE ? un[x] - u[x] : -u[x];
    const T sx = T(1) / std::sqrt(T(1) + e * e * inv_s2);
    a[x] = gd[x] * sx;
    b[x] = -a[x] * du * sx * sx * e * inv_s2;
  }
}

// The backward's scatter of dD (rows (c - c0) * KK + t, stride ld, the pixels [p0, p1) of image
// n) into dU, and dV (charbonnier) or the dL/dS partial sums Gb (gaussian), of channels [c0, c1).
// a and b are per-row scratch of W elements.
template <typename T, int SIM>
__attribute__((always_inline)) inline void scatter_tile_body(
    const Geo& g, const T* U, const T* V, const T* S, const T* dD, int64_t ld, int64_t n,
    int64_t c0, int64_t c1, int64_t p0, int64_t p1, T* dUp, T* dVp, T* Gb, T* a, T* b,
    T inv_s2) {
  for (int64_t c = c0; c < c1; ++c) {
    const T* Uc = U + (n * g.Cin + c) * g.HW;
    T* dUc = dUp + (n * g.Cin + c) * g.HW;
    const T* Vc = SIM == kCharbonnier ? V + (n * g.Cg + c) * g.HW : nullptr;
    T* dVc = SIM == kCharbonnier ? dVp + (n * g.Cg + c) * g.HW : nullptr;
    for (int64_t t = 0; t < g.KK; ++t) {
      const int64_t dx = g.dx(t);
      const T* drow = dD + ((c - c0) * g.KK + t) * ld;
      const T* St = SIM == kGaussian ? S + (n * g.KK + t) * g.HW : nullptr;
      T* Gt = SIM == kGaussian ? Gb + (n * g.KK + t) * g.HW : nullptr;
      Segment q;
      for (Segments it(g, p0, p1, g.dy(t), dx); it.next(q);) {
        const int64_t xa = q.xa, xb = q.xb, lo = q.lo, hi = q.hi;
        const T* gd = drow + q.j0 - xa;
        const T* u = Uc + q.y * g.W;
        T* du = dUc + q.y * g.W;
        const T* un = Uc + q.yy * g.W + dx;
        T* dun = dUc + q.yy * g.W + dx;
        if (SIM == kNone) {
          for (int64_t x = xa; x < xb; ++x) du[x] -= gd[x];
          for (int64_t x = lo; x < hi; ++x) dun[x] += gd[x];
        } else if (SIM == kGaussian) {
          // Separate passes: du and dun alias (one channel plane), so a fused loop would not
          // vectorise; a[x] = dD * S is computed once into scratch.
          const T* s = St + q.y * g.W;
          T* gs = Gt + q.y * g.W;
          for (int64_t x = xa; x < xb; ++x) a[x] = gd[x] * s[x];
          for (int64_t x = xa; x < xb; ++x) du[x] -= a[x];
          for (int64_t x = lo; x < hi; ++x) dun[x] += a[x];
          for (int64_t x = xa; x < lo; ++x) gs[x] -= gd[x] * u[x];
          for (int64_t x = lo; x < hi; ++x) gs[x] += gd[x] * (un[x] - u[x]);
          for (int64_t x = hi; x < xb; ++x) gs[x] -= gd[x] * u[x];
        } else {
          const T* v = Vc + q.y * g.W;
          T* dv = dVc + q.y * g.W;
          const T* vn = Vc + q.yy * g.W + dx;
          T* dvn = dVc + q.yy * g.W + dx;
          charbonnier_terms<T, false>(xa, lo, gd, u, un, v, vn, inv_s2, a, b);
          charbonnier_terms<T, true>(lo, hi, gd, u, un, v, vn, inv_s2, a, b);
          charbonnier_terms<T, false>(hi, xb, gd, u, un, v, vn, inv_s2, a, b);
          for (int64_t x = xa; x < xb; ++x) { du[x] -= a[x]; dv[x] -= b[x]; }
          for (int64_t x = lo; x < hi; ++x) { dun[x] += a[x]; dvn[x] += b[x]; }
        }
      }
    }
  }
}
SEGOPS_SDC_ISA_VARIANTS(scatter_tile)

// Gaussian backward, last pass: dV[c,p] -= dd, dV[c,p+d] += dd for every tap, with
// dd = dS * (-S e_c / (sigma^2 Cg)), dS the summed dL/dS (Gs), for plane i = n * Cg + c; dd is
// computed into the scratch row a (W elements) first, as dV[c,p] and dV[c,p+d] alias.
template <typename T, int SIM>
__attribute__((always_inline)) inline void gaussian_dv_body(const Geo& g, const T* V, const T* Gs,
                                                            const T* S, int64_t i, T coef, T* dVp,
                                                            T* a) {
  const int64_t n = i / g.Cg;
  const T* Vc = V + i * g.HW;
  T* dVc = dVp + i * g.HW;
  for (int64_t t = 0; t < g.KK; ++t) {
    const int64_t dx = g.dx(t);
    const T* gs = Gs + (n * g.KK + t) * g.HW;
    const T* st = S + (n * g.KK + t) * g.HW;
    Segment q;
    for (Segments it(g, 0, g.HW, g.dy(t), dx); it.next(q);) {
      const T* v = Vc + q.y * g.W;
      T* dv = dVc + q.y * g.W;
      const T* vn = Vc + q.yy * g.W + dx;
      T* dvn = dVc + q.yy * g.W + dx;
      const T* gg = gs + q.y * g.W;
      const T* s = st + q.y * g.W;
      for (int64_t x = q.xa; x < q.lo; ++x) dv[x] -= gg[x] * s[x] * v[x] * coef;
      for (int64_t x = q.lo; x < q.hi; ++x) a[x] = -gg[x] * s[x] * (vn[x] - v[x]) * coef;
      for (int64_t x = q.lo; x < q.hi; ++x) dv[x] -= a[x];
      for (int64_t x = q.lo; x < q.hi; ++x) dvn[x] += a[x];
      for (int64_t x = q.hi; x < q.xb; ++x) dv[x] -= gg[x] * s[x] * v[x] * coef;
    }
  }
}
SEGOPS_SDC_ISA_VARIANTS(gaussian_dv)

at::Tensor sdc_forward(const at::Tensor& input, const at::Tensor& guidance, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, int64_t dilation,
                       std::string similarity, double sigma) {
  const char* kernel = "semantic_difference_conv2d_forward (cpu)";
  const int sim = parse_similarity(kernel, similarity);
  const Geo g = make_geo(kernel, input, guidance, weight, dilation, sim);
  if (bias.has_value()) {
    segops::guards::check_like(kernel, input, {{"bias", &*bias}});
    segops::guards::check_sizes(kernel, "bias", *bias, {g.Cout});
  }
  at::Tensor out = at::empty({g.N, g.Cout, g.H, g.W}, input.options());
  if (out.numel() == 0) return out;
  const int64_t K = g.Cin * g.KK;
  const int64_t ntile = (g.HW + kTileFwd - 1) / kTileFwd;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "semantic_difference_conv2d_forward", [&] {
    using T = scalar_t;
    at::Tensor S = sim == kGaussian ? gaussian_similarity<T>(guidance, g, sigma) : at::Tensor();
    const T* U = input.data_ptr<T>();
    const T* V = guidance.data_ptr<T>();
    const T* Sp = S.defined() ? S.data_ptr<T>() : nullptr;
    const T* Wp = weight.data_ptr<T>();
    const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    T* Y = out.data_ptr<T>();
    const T inv_s2 = T(1.0 / (sigma * sigma));
    at::parallel_for(0, g.N * ntile, 1, [&](int64_t begin, int64_t end) {
      // Uninitialised: build_panel writes every element the GEMM reads.
      std::unique_ptr<T[]> panel(new T[K * kTileFwd]);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / ntile, p0 = (i % ntile) * kTileFwd, p1 = std::min(g.HW, p0 + kTileFwd);
        const int64_t T_ = p1 - p0;
        build_panel_any<T>(sim, g, U, V, Sp, n, 0, g.Cin, p0, p1, panel.get(), kTileFwd, inv_s2);
        // Y[n, :, p0:p1] (Cout x T_, rows HW apart) = W (Cout x K) @ panel (K x T_) (+ bias)
        T* y = Y + n * g.Cout * g.HW + p0;
        gemm_rm<T>(false, false, g.Cout, T_, K, T(1), Wp, K, panel.get(), kTileFwd, T(0), y,
                   g.HW);
        if (bp == nullptr) continue;
        for (int64_t o = 0; o < g.Cout; ++o) {
          T* yo = y + o * g.HW;
          for (int64_t j = 0; j < T_; ++j) yo[j] += bp[o];
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdc_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& guidance,
    const at::Tensor& weight, int64_t dilation, std::string similarity, double sigma) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // ATen's sum on plain tensors
  const char* kernel = "semantic_difference_conv2d_backward (cpu)";
  const int sim = parse_similarity(kernel, similarity);
  const Geo g = make_geo(kernel, input, guidance, weight, dilation, sim);
  segops::guards::check_like(kernel, input, {{"grad_out", &grad_out}});
  segops::guards::check_sizes(kernel, "grad_out", grad_out, {g.N, g.Cout, g.H, g.W});
  at::Tensor dU = at::zeros_like(input);
  at::Tensor dV = at::zeros_like(guidance);
  at::Tensor dW = at::empty_like(weight);  // the transpose of dW^T below, or zeros
  at::Tensor db = at::sum(grad_out, {0, 2, 3});
  if (input.numel() == 0 || grad_out.numel() == 0) return {dU, dV, dW.zero_(), db};
  const int64_t ntile = (g.HW + kTileBwd - 1) / kTileBwd;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nblk = std::min<int64_t>(g.Cin, nthreads);
  const int64_t cb = (g.Cin + nblk - 1) / nblk;
  const int64_t nblk_eff = (g.Cin + cb - 1) / cb;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "semantic_difference_conv2d_backward", [&] {
    using T = scalar_t;
    at::Tensor S = sim == kGaussian ? gaussian_similarity<T>(guidance, g, sigma) : at::Tensor();
    // Per-block partial sums of dL/dS (gaussian only): (nblk, N, KK, HW).
    at::Tensor G = sim == kGaussian ? at::zeros({nblk_eff, g.N, g.KK, g.HW}, input.options())
                                    : at::Tensor();
    const T* U = input.data_ptr<T>();
    const T* V = guidance.data_ptr<T>();
    const T* Sp = S.defined() ? S.data_ptr<T>() : nullptr;
    const T* GO = grad_out.data_ptr<T>();
    // The weight transposed once, (K, Cout): dD below is then a plain product, where W^T read in
    // place would be transposed by the GEMM's packing for every tile of every block.
    const at::Tensor weight_t = weight.reshape({g.Cout, g.Cin * g.KK}).t().contiguous();
    const T* Wt = weight_t.data_ptr<T>();
    T* dUp = dU.data_ptr<T>();
    T* dVp = dV.data_ptr<T>();
    // dW accumulated as its transpose (K, Cout), transposed once at the end: the GEMM then packs
    // (transposes) the tile of dY (Cout x T) for op(B), not the Cin*k^2/nthreads times larger
    // panel of D.
    // Not zeroed: each block's first tile writes its rows (beta 0), the later ones accumulate.
    at::Tensor dWt = at::empty({g.Cin * g.KK, g.Cout}, weight.options());
    T* dWtp = dWt.data_ptr<T>();
    const T inv_s2 = T(1.0 / (sigma * sigma));
    at::parallel_for(0, nblk_eff, 1, [&](int64_t bb, int64_t be) {
      for (int64_t blk = bb; blk < be; ++blk) {
        const int64_t c0 = blk * cb, c1 = std::min(g.Cin, c0 + cb), Kc = (c1 - c0) * g.KK;
        // Uninitialised: build_panel and the dD product write every element that is read.
        std::unique_ptr<T[]> panel(new T[Kc * kTileBwd]), dpanel(new T[Kc * kTileBwd]);
        std::vector<T> scratch_a(g.W), scratch_b(g.W);  // per-row temporaries of the scatter
        T* a = scratch_a.data();
        T* b = scratch_b.data();
        T* Gb = G.defined() ? G.data_ptr<T>() + blk * g.N * g.KK * g.HW : nullptr;
        for (int64_t i = 0; i < g.N * ntile; ++i) {
          const int64_t n = i / ntile, p0 = (i % ntile) * kTileBwd, p1 = std::min(g.HW, p0 + kTileBwd);
          const int64_t T_ = p1 - p0;
          const T* dy = GO + n * g.Cout * g.HW + p0;  // (Cout, T_), row stride HW
          build_panel_any<T>(sim, g, U, V, Sp, n, c0, c1, p0, p1, panel.get(), kTileBwd, inv_s2);
          // dW^T[c0 * KK : c1 * KK, :] (Kc x Cout) += panel @ dy^T; dD (Kc x T_) = W_blk^T @ dy
          gemm_rm<T>(false, true, Kc, g.Cout, T_, T(1), panel.get(), kTileBwd, dy, g.HW,
                     i == 0 ? T(0) : T(1), dWtp + c0 * g.KK * g.Cout, g.Cout);
          gemm_rm<T>(false, false, Kc, T_, g.Cout, T(1), Wt + c0 * g.KK * g.Cout, g.Cout, dy,
                     g.HW, T(0), dpanel.get(), kTileBwd);
          if (sim == kNone)
            scatter_tile<T, kNone>(g, U, V, Sp, dpanel.get(), kTileBwd, n, c0, c1, p0, p1, dUp,
                                   dVp, Gb, a, b, inv_s2);
          else if (sim == kGaussian)
            scatter_tile<T, kGaussian>(g, U, V, Sp, dpanel.get(), kTileBwd, n, c0, c1, p0, p1,
                                       dUp, dVp, Gb, a, b, inv_s2);
          else
            scatter_tile<T, kCharbonnier>(g, U, V, Sp, dpanel.get(), kTileBwd, n, c0, c1, p0,
                                          p1, dUp, dVp, Gb, a, b, inv_s2);
        }
      }
    });
    dW.copy_(dWt.t().reshape(weight.sizes()));
    if (sim == kGaussian) {
      // dS total, then dV[c,p] -= dd, dV[c,p+d] += dd with dd = dS * (-S e_c / (sigma^2 Cg)).
      at::Tensor Gs = G.sum(0);
      const T* Gp = Gs.data_ptr<T>();
      const T coef = T(1.0 / (sigma * sigma * double(g.Cg)));
      at::parallel_for(0, g.N * g.Cg, 1, [&](int64_t b, int64_t e) {
        std::vector<T> scratch(g.W);
        for (int64_t i = b; i < e; ++i)
          gaussian_dv<T, kGaussian>(g, V, Gp, Sp, i, coef, dVp, scratch.data());
      });
    }
  });
  return {dU, dV, dW, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(segops_C, CPU, m) {
  m.impl("semantic_difference_conv2d_forward", &sdc_forward);
  m.impl("semantic_difference_conv2d_backward", &sdc_backward);
}
