// QCO texture histograms (docs/operators.md §2.5, STLNet): qco_1d / qco_2d and texture_reconstruct, CPU
// forward and backward, without the dense encodings.
//
// qco_1d is qco_2d's machinery with grid 1 and a 1-D histogram. For a region r (the whole
// image, or an (H/s) x (W/s) block) of sample n:
//   g = mean x;  gn = g / max(|g|, eps);  sim_i = <x_i, gn> / max(|x_i|, eps)
//   lo, hi = min, max sim;  Δ = (hi − lo)/K;  L_k = (2k+1)/(2K)·(hi − lo) + lo
//   E[i, k] = 1 − |L_k − sim_i| where |L_k − sim_i| < Δ, else 0
// A pixel can only hit the levels next to u = (sim − L_0)/Δ: the three candidates
// round(u) − 1, round(u), round(u) + 1 are tested with the exact band rule (the same
// arithmetic as the reference), so rounding at a band edge decides as the reference does.
// Level-indexed scratch is padded by one on each side, so candidate k lives at k + 1 and the
// out-of-range candidates (weight 0) need no branches.
//
// Forward passes: region means (parallel over (n, c) rows), similarities (parallel over
// (n, image row)), then per region: min/max and the histogram. Backward: per region the
// gradient of each pixel's similarity (through E, the levels and the ties at min/max, split
// evenly as torch.amin/amax do), then Σ_i gsim_i · x_i / |x_i| per (n, c) row and the input
// gradient per (n, c) row.
#include "segops/cpu/guards.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace segops {
namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's eps
constexpr double kHistEps = 1e-6;   // histogram normaliser (docs/operators.md §2.5)

// The (up to) three levels a pixel can hit: levels m − 1 + j for j < 3 (padded index m + j).
template <typename acc_t>
struct Enc {
  int64_t m;
  acc_t w[3];   // E (0 outside the band or the level range)
  acc_t sg[3];  // dE/dsim = sign(L − sim) inside the band, else 0
};

template <typename acc_t>
inline Enc<acc_t> encode(acc_t sim, const acc_t* levels, int64_t k, acc_t delta) {
  Enc<acc_t> e;
  e.m = 0;
  for (int j = 0; j < 3; ++j) e.w[j] = e.sg[j] = acc_t(0);
  if (!(delta > acc_t(0))) return e;  // constant region: no pixel is in any band
  double u = std::nearbyint(double((sim - levels[0]) / delta));
  if (!(u >= 0.0)) u = 0.0;  // also NaN
  if (u > double(k - 1)) u = double(k - 1);
  e.m = static_cast<int64_t>(u);
  for (int j = 0; j < 3; ++j) {
    const int64_t lev = e.m - 1 + j;
    if (lev < 0 || lev >= k) continue;
    const acc_t diff = levels[lev] - sim;
    const acc_t d = std::abs(diff);
    if (d < delta) {
      e.w[j] = acc_t(1) - d;
      e.sg[j] = diff > 0 ? acc_t(1) : (diff < 0 ? acc_t(-1) : acc_t(0));
    }
  }
  return e;
}

template <typename acc_t>
inline void make_levels(acc_t lo, acc_t hi, int64_t k, acc_t* levels) {
  for (int64_t i = 0; i < k; ++i)
    levels[i] = acc_t(2 * i + 1) / acc_t(2 * k) * (hi - lo) + lo;
}

struct Geometry {
  int64_t n, c, h, w, p, s, bh, bw, r, hw;
  Geometry(const at::Tensor& x, int64_t grid)
      : n(x.size(0)), c(x.size(1)), h(x.size(2)), w(x.size(3)), p(h * w), s(grid),
        bh(h / grid), bw(w / grid), r(grid * grid), hw(bh * bw) {}
  // flat pixel index of region-local pixel t of region rr
  inline int64_t pixel(int64_t rr, int64_t t) const {
    const int64_t ry = rr / s, rx = rr % s;
    return (ry * bh + t / bw) * w + rx * bw + t % bw;
  }
  // sums[rr] = Σ f(i) over the flat pixel indices i of region rr, for every region of one image.
  template <typename acc_t, typename F>
  inline void region_sums(acc_t* sums, F&& f) const {
    std::fill(sums, sums + r, acc_t(0));
    for (int64_t y = 0; y < h; ++y) {
      const int64_t ry = y / bh;
      for (int64_t rx = 0; rx < s; ++rx) {
        const int64_t off = y * w + rx * bw;
        acc_t acc = 0;
        for (int64_t i = 0; i < bw; ++i) acc += f(off + i);
        sums[ry * s + rx] += acc;
      }
    }
  }
};

// x (N, C, H, W) with H, W multiples of grid; num_levels >= 1; the 1-D histogram has grid 1.
void check_qco(const char* kernel, const at::Tensor& x, int64_t num_levels, int64_t grid,
               bool cooc) {
  segops::cpu::check_operands(kernel, 4, {{"x", &x}});
  segops::guards::check_value(kernel, num_levels >= 1, "num_levels must be >= 1, got ",
                              num_levels);
  segops::guards::check_value(kernel, grid >= 1 && x.size(2) % grid == 0 && x.size(3) % grid == 0,
                              "(H, W) = (", x.size(2), ", ", x.size(3),
                              ") must be divisible by grid = ", grid);
  segops::guards::check_value(kernel, cooc || grid == 1,
                              "the 1-D histogram (cooc false) has grid 1, got ", grid);
}

// ---------------------------------------------------------------------------------------------
// qco forward
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> qco_forward_impl(
    const at::Tensor& x, int64_t k, int64_t grid, bool cooc) {
  using acc_t = scalar_t;  // fp32 and fp64 only on CPU
  const Geometry g(x, grid);
  const auto opts = x.options();
  at::Tensor mean = at::zeros({g.n, g.r, g.c}, opts);
  at::Tensor gnv = at::empty({g.n, g.r, g.c}, opts);
  at::Tensor sim = at::empty({g.n, g.h, g.w}, opts);
  at::Tensor rnorm = at::empty({g.n, g.h, g.w}, opts);
  at::Tensor stats = at::empty({g.n, g.r, 3}, opts);
  at::Tensor levels = cooc ? at::empty({g.n, g.s, g.s, k}, opts) : at::empty({g.n, k}, opts);
  at::Tensor hist = cooc ? at::empty({g.n, g.s, g.s, k, k}, opts) : at::empty({g.n, k}, opts);

  if (g.p == 0) {  // no pixels: an empty histogram
    levels.zero_();
    hist.zero_();
    stats.zero_();
    return {hist, levels, sim, rnorm, mean, stats};
  }
  const scalar_t* X = x.const_data_ptr<scalar_t>();
  acc_t* M = mean.data_ptr<acc_t>();
  acc_t* GN = gnv.data_ptr<acc_t>();
  acc_t* S = sim.data_ptr<acc_t>();
  acc_t* RN = rnorm.data_ptr<acc_t>();
  acc_t* ST = stats.data_ptr<acc_t>();
  acc_t* LV = levels.data_ptr<acc_t>();
  acc_t* HI = hist.data_ptr<acc_t>();

  // (1) region means, one (n, c) row per task
  at::parallel_for(0, g.n * g.c, 1, [&](int64_t b, int64_t e) {
    std::vector<acc_t> sums(g.r);
    for (int64_t nc = b; nc < e; ++nc) {
      const int64_t ni = nc / g.c, ci = nc % g.c;
      const scalar_t* row = X + nc * g.p;
      g.region_sums(sums.data(), [&](int64_t i) { return acc_t(row[i]); });
      for (int64_t rr = 0; rr < g.r; ++rr) M[(ni * g.r + rr) * g.c + ci] = sums[rr] / acc_t(g.hw);
    }
  });
  // normalised means
  for (int64_t nr = 0; nr < g.n * g.r; ++nr) {
    const acc_t* mv = M + nr * g.c;
    acc_t sq = 0;
    for (int64_t ci = 0; ci < g.c; ++ci) sq += mv[ci] * mv[ci];
    const acc_t den = std::max(std::sqrt(sq), acc_t(kNormEps));
    for (int64_t ci = 0; ci < g.c; ++ci) GN[nr * g.c + ci] = mv[ci] / den;
  }
  // (2) similarities, one (n, y) image row per task
  at::parallel_for(0, g.n * g.h, 1, [&](int64_t b, int64_t e) {
    std::vector<acc_t> dot(g.w), sq(g.w);
    for (int64_t ny = b; ny < e; ++ny) {
      const int64_t ni = ny / g.h, y = ny % g.h, ry = y / g.bh;
      std::fill(dot.begin(), dot.end(), acc_t(0));
      std::fill(sq.begin(), sq.end(), acc_t(0));
      for (int64_t ci = 0; ci < g.c; ++ci) {
        const scalar_t* row = X + ((ni * g.c + ci) * g.h + y) * g.w;
        for (int64_t rx = 0; rx < g.s; ++rx) {
          const acc_t gv = GN[(ni * g.r + ry * g.s + rx) * g.c + ci];
          acc_t* d = dot.data() + rx * g.bw;
          acc_t* q = sq.data() + rx * g.bw;
          const scalar_t* seg = row + rx * g.bw;
          for (int64_t i = 0; i < g.bw; ++i) {
            const acc_t v = seg[i];
            d[i] += v * gv;
            q[i] += v * v;
          }
        }
      }
      acc_t* so = S + ny * g.w;
      acc_t* ro = RN + ny * g.w;
      for (int64_t i = 0; i < g.w; ++i) {
        const acc_t nrm = std::sqrt(sq[i]);
        const bool clamped = nrm < acc_t(kNormEps);
        const acc_t den = clamped ? acc_t(kNormEps) : nrm;
        so[i] = dot[i] / den;
        ro[i] = clamped ? -(acc_t(1) / den) : acc_t(1) / den;
      }
    }
  });
  // (3) per region: min/max, levels, histogram
  at::parallel_for(0, g.n * g.r, 1, [&](int64_t b, int64_t e) {
    const int64_t kp = k + 2;
    std::vector<acc_t> lev(k), acc(cooc ? kp * kp : kp);
    std::vector<Enc<acc_t>> enc(cooc ? g.hw : 0);
    for (int64_t nr = b; nr < e; ++nr) {
      const int64_t ni = nr / g.r, rr = nr % g.r;
      const acc_t* sn = S + ni * g.p;
      acc_t lo = sn[g.pixel(rr, 0)], hi = lo;
      for (int64_t t = 1; t < g.hw; ++t) {
        const acc_t v = sn[g.pixel(rr, t)];
        lo = std::min(lo, v);
        hi = std::max(hi, v);
      }
      make_levels(lo, hi, k, lev.data());
      const acc_t delta = (hi - lo) / acc_t(k);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (!cooc) {
        for (int64_t t = 0; t < g.hw; ++t) {
          const Enc<acc_t> en = encode(sn[g.pixel(rr, t)], lev.data(), k, delta);
          for (int j = 0; j < 3; ++j) acc[en.m + j] += en.w[j];
        }
      } else {
        for (int64_t t = 0; t < g.hw; ++t) enc[t] = encode(sn[g.pixel(rr, t)], lev.data(), k, delta);
        for (int64_t ty = 0; ty + 1 < g.bh; ++ty) {
          for (int64_t tx = 0; tx + 1 < g.bw; ++tx) {
            const Enc<acc_t>& a = enc[ty * g.bw + tx];
            const Enc<acc_t>& q = enc[(ty + 1) * g.bw + tx + 1];
            for (int j = 0; j < 3; ++j) {
              if (a.w[j] == acc_t(0)) continue;
              acc_t* arow = acc.data() + (a.m + j) * kp + q.m;
              for (int jj = 0; jj < 3; ++jj) arow[jj] += a.w[j] * q.w[jj];
            }
          }
        }
      }
      acc_t total = 0;
      for (acc_t v : acc) total += v;
      const acc_t den = total + acc_t(kHistEps);
      if (!cooc) {
        for (int64_t i = 0; i < k; ++i) HI[ni * k + i] = acc[i + 1] / den;
      } else {
        acc_t* out = HI + nr * k * k;
        for (int64_t a = 0; a < k; ++a)
          for (int64_t bb = 0; bb < k; ++bb) out[a * k + bb] = acc[(a + 1) * kp + bb + 1] / den;
      }
      std::copy(lev.begin(), lev.end(), LV + nr * k);
      ST[nr * 3 + 0] = lo;
      ST[nr * 3 + 1] = hi;
      ST[nr * 3 + 2] = total;
    }
  });
  return {hist, levels, sim, rnorm, mean, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> qco_forward_cpu(
    const at::Tensor& x, int64_t num_levels, int64_t grid, bool cooc) {
  check_qco("qco_forward (cpu)", x, num_levels, grid, cooc);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "qco_forward_cpu", [&] {
    out = qco_forward_impl<scalar_t>(x, num_levels, grid, cooc);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// qco backward
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
at::Tensor qco_backward_impl(const at::Tensor& grad_hist, const at::Tensor& grad_levels,
                             const std::optional<at::Tensor>& grad_sim, const at::Tensor& x,
                             const at::Tensor& hist, const at::Tensor& sim,
                             const at::Tensor& rnorm, const at::Tensor& mean,
                             const at::Tensor& stats, int64_t k, int64_t grid, bool cooc) {
  using acc_t = scalar_t;
  const Geometry g(x, grid);
  const auto opts = x.options();
  at::Tensor gx = at::empty_like(x);
  at::Tensor coef = at::empty({g.n, 2, g.p}, opts);  // per pixel: a = gsim·r, b = gsim·r²·sim
  at::Tensor dgn = at::zeros({g.n, g.r, g.c}, opts);
  at::Tensor gnv = at::empty({g.n, g.r, g.c}, opts);
  at::Tensor dgv = at::empty({g.n, g.r, g.c}, opts);

  const acc_t* GH = grad_hist.const_data_ptr<acc_t>();
  const acc_t* GL = grad_levels.const_data_ptr<acc_t>();
  const acc_t* GS = (grad_sim.has_value() && grad_sim->defined()) ? grad_sim->const_data_ptr<acc_t>()
                                                                   : nullptr;
  const scalar_t* X = x.const_data_ptr<scalar_t>();
  const acc_t* H = hist.const_data_ptr<acc_t>();
  const acc_t* S = sim.const_data_ptr<acc_t>();
  const acc_t* RN = rnorm.const_data_ptr<acc_t>();
  const acc_t* M = mean.const_data_ptr<acc_t>();
  const acc_t* ST = stats.const_data_ptr<acc_t>();
  acc_t* CO = coef.data_ptr<acc_t>();
  acc_t* DGN = dgn.data_ptr<acc_t>();
  acc_t* GN = gnv.data_ptr<acc_t>();
  acc_t* DG = dgv.data_ptr<acc_t>();
  scalar_t* GX = gx.data_ptr<scalar_t>();

  // (1) per region: gradient of every pixel's similarity
  at::parallel_for(0, g.n * g.r, 1, [&](int64_t b, int64_t e) {
    const int64_t kp = k + 2;
    std::vector<acc_t> lev(k), dh(cooc ? kp * kp : kp), glev(kp);
    std::vector<Enc<acc_t>> enc(g.hw);
    for (int64_t nr = b; nr < e; ++nr) {
      const int64_t ni = nr / g.r, rr = nr % g.r;
      const acc_t lo = ST[nr * 3 + 0], hi = ST[nr * 3 + 1], total = ST[nr * 3 + 2];
      make_levels(lo, hi, k, lev.data());
      const acc_t delta = (hi - lo) / acc_t(k);
      // d(hist)/d(unnormalised histogram): (g − <g, hist>) / (total + eps)
      const int64_t kk = cooc ? k * k : k;
      const acc_t* gh = GH + (cooc ? nr : ni) * kk;
      const acc_t* hh = H + (cooc ? nr : ni) * kk;
      acc_t dot = 0;
      for (int64_t i = 0; i < kk; ++i) dot += gh[i] * hh[i];
      const acc_t den = total + acc_t(kHistEps);
      std::fill(dh.begin(), dh.end(), acc_t(0));
      if (!cooc) {
        for (int64_t i = 0; i < k; ++i) dh[i + 1] = (gh[i] - dot) / den;
      } else {
        for (int64_t a = 0; a < k; ++a)
          for (int64_t bb = 0; bb < k; ++bb) dh[(a + 1) * kp + bb + 1] = (gh[a * k + bb] - dot) / den;
      }
      const acc_t* sn = S + ni * g.p;
      for (int64_t t = 0; t < g.hw; ++t) enc[t] = encode(sn[g.pixel(rr, t)], lev.data(), k, delta);
      std::fill(glev.begin(), glev.end(), acc_t(0));
      int64_t nmin = 0, nmax = 0;
      acc_t* ca = CO + ni * 2 * g.p;
      for (int64_t t = 0; t < g.hw; ++t) {
        const Enc<acc_t>& en = enc[t];
        const int64_t pix = g.pixel(rr, t);
        acc_t de[3] = {0, 0, 0};
        if (!cooc) {
          for (int j = 0; j < 3; ++j) de[j] = dh[en.m + j];
        } else {
          const int64_t ty = t / g.bw, tx = t % g.bw;
          if (ty + 1 < g.bh && tx + 1 < g.bw) {  // pixel as the left element of a pair
            const Enc<acc_t>& q = enc[t + g.bw + 1];
            for (int j = 0; j < 3; ++j) {
              const acc_t* row = dh.data() + (en.m + j) * kp + q.m;
              de[j] += row[0] * q.w[0] + row[1] * q.w[1] + row[2] * q.w[2];
            }
          }
          if (ty > 0 && tx > 0) {  // pixel as the right element
            const Enc<acc_t>& o = enc[t - g.bw - 1];
            for (int j = 0; j < 3; ++j)
              for (int jj = 0; jj < 3; ++jj) de[j] += dh[(o.m + jj) * kp + en.m + j] * o.w[jj];
          }
        }
        acc_t gs = GS ? GS[ni * g.p + pix] : acc_t(0);
        for (int j = 0; j < 3; ++j) {
          const acc_t v = de[j] * en.sg[j];
          gs += v;
          glev[en.m + j] += v;
        }
        ca[pix] = gs;  // partial; ties added below
        nmin += sn[pix] == lo;
        nmax += sn[pix] == hi;
      }
      // levels: L = c·(hi − lo) + lo; dE/dL = −sign(L − sim)
      const acc_t* gl = GL + nr * k;
      acc_t glo = 0, ghi = 0;
      for (int64_t i = 0; i < k; ++i) {
        const acc_t gtot = gl[i] - glev[i + 1];
        const acc_t c = acc_t(2 * i + 1) / acc_t(2 * k);
        ghi += c * gtot;
        glo += gtot - c * gtot;
      }
      const acc_t wlo = glo / acc_t(std::max<int64_t>(nmin, 1));
      const acc_t whi = ghi / acc_t(std::max<int64_t>(nmax, 1));
      acc_t* cb = ca + g.p;
      for (int64_t t = 0; t < g.hw; ++t) {
        const int64_t pix = g.pixel(rr, t);
        const acc_t sv = sn[pix];
        acc_t gs = ca[pix];
        if (sv == lo) gs += wlo;
        if (sv == hi) gs += whi;
        const acc_t rs = RN[ni * g.p + pix];
        const acc_t r = std::abs(rs);
        ca[pix] = gs * r;
        cb[pix] = rs < 0 ? acc_t(0) : gs * r * r * sv;
      }
    }
  });
  // (2) dgn[n, r, c] = Σ_i gsim_i · x_i / |x_i|
  at::parallel_for(0, g.n * g.c, 1, [&](int64_t b, int64_t e) {
    std::vector<acc_t> sums(g.r);
    for (int64_t nc = b; nc < e; ++nc) {
      const int64_t ni = nc / g.c, ci = nc % g.c;
      const scalar_t* row = X + nc * g.p;
      const acc_t* a = CO + ni * 2 * g.p;
      g.region_sums(sums.data(), [&](int64_t i) { return acc_t(row[i]) * a[i]; });
      for (int64_t rr = 0; rr < g.r; ++rr) DGN[(ni * g.r + rr) * g.c + ci] = sums[rr];
    }
  });
  // normalised means and the gradient of the mean (through its normalisation), / hw
  for (int64_t nr = 0; nr < g.n * g.r; ++nr) {
    const acc_t* mv = M + nr * g.c;
    const acc_t* d = DGN + nr * g.c;
    acc_t sq = 0;
    for (int64_t ci = 0; ci < g.c; ++ci) sq += mv[ci] * mv[ci];
    const acc_t nrm = std::sqrt(sq);
    const bool clamped = nrm < acc_t(kNormEps);
    const acc_t den = clamped ? acc_t(kNormEps) : nrm;
    acc_t proj = 0;
    for (int64_t ci = 0; ci < g.c; ++ci) {
      GN[nr * g.c + ci] = mv[ci] / den;
      proj += GN[nr * g.c + ci] * d[ci];
    }
    for (int64_t ci = 0; ci < g.c; ++ci) {
      const acc_t dgc = clamped ? d[ci] / den : (d[ci] - GN[nr * g.c + ci] * proj) / den;
      DG[nr * g.c + ci] = dgc / acc_t(g.hw);
    }
  }
  // (3) gx[c, i] = a_i · gn_c − b_i · x[c, i] + dg_c / hw
  at::parallel_for(0, g.n * g.c, 1, [&](int64_t b, int64_t e) {
    for (int64_t nc = b; nc < e; ++nc) {
      const int64_t ni = nc / g.c, ci = nc % g.c;
      const scalar_t* row = X + nc * g.p;
      scalar_t* out = GX + nc * g.p;
      const acc_t* a = CO + ni * 2 * g.p;
      const acc_t* bb = a + g.p;
      for (int64_t y = 0; y < g.h; ++y) {
        const int64_t ry = y / g.bh;
        for (int64_t rx = 0; rx < g.s; ++rx) {
          const int64_t rr = ry * g.s + rx;
          const acc_t gv = GN[(ni * g.r + rr) * g.c + ci];
          const acc_t dv = DG[(ni * g.r + rr) * g.c + ci];
          const int64_t off = y * g.w + rx * g.bw;
          for (int64_t i = 0; i < g.bw; ++i)
            out[off + i] = a[off + i] * gv - bb[off + i] * acc_t(row[off + i]) + dv;
        }
      }
    }
  });
  return gx;
}

at::Tensor qco_backward_cpu(const at::Tensor& grad_hist, const at::Tensor& grad_levels,
                            const std::optional<at::Tensor>& grad_sim, const at::Tensor& x,
                            const at::Tensor& hist, const at::Tensor& sim, const at::Tensor& rnorm,
                            const at::Tensor& mean, const at::Tensor& stats, int64_t num_levels,
                            int64_t grid, bool cooc) {
  const char* kernel = "qco_backward (cpu)";
  check_qco(kernel, x, num_levels, grid, cooc);
  namespace guards = segops::guards;
  guards::check_like(kernel, x, {{"grad_hist", &grad_hist}, {"grad_levels", &grad_levels},
                                 {"hist", &hist}, {"sim", &sim}, {"rnorm", &rnorm},
                                 {"mean", &mean}, {"stats", &stats}});
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3), k = num_levels, r = grid * grid;
  using Shape = std::vector<int64_t>;
  const Shape hist_shape = cooc ? Shape{n, grid, grid, k, k} : Shape{n, k};
  const Shape levels_shape = cooc ? Shape{n, grid, grid, k} : Shape{n, k};
  guards::check_sizes(kernel, "grad_hist", grad_hist, hist_shape);
  guards::check_sizes(kernel, "hist", hist, hist_shape);
  guards::check_sizes(kernel, "grad_levels", grad_levels, levels_shape);
  guards::check_sizes(kernel, "sim", sim, {n, h, w});
  guards::check_sizes(kernel, "rnorm", rnorm, {n, h, w});
  guards::check_sizes(kernel, "mean", mean, {n, r, x.size(1)});
  guards::check_sizes(kernel, "stats", stats, {n, r, 3});
  if (grad_sim.has_value() && grad_sim->defined()) {
    guards::check_like(kernel, x, {{"grad_sim", &*grad_sim}});
    guards::check_sizes(kernel, "grad_sim", *grad_sim, {n, h, w});
  }
  if (x.numel() == 0) return at::empty_like(x);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "qco_backward_cpu", [&] {
    out = qco_backward_impl<scalar_t>(grad_hist, grad_levels, grad_sim, x, hist, sim, rnorm, mean,
                                      stats, num_levels, grid, cooc);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// texture_reconstruct
// ---------------------------------------------------------------------------------------------
// Per pixel: the first candidate's padded index and the three weights (and signs).
template <typename acc_t>
void recon_encode(const at::Tensor& sim, const at::Tensor& levels, std::vector<Enc<acc_t>>& enc) {
  const int64_t n = sim.size(0), p = sim.size(1) * sim.size(2), k = levels.size(1);
  const acc_t* S = sim.const_data_ptr<acc_t>();
  const acc_t* L = levels.const_data_ptr<acc_t>();
  enc.resize(n * p);
  if (p == 0) return;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t ni = b; ni < e; ++ni) {
      const acc_t* sn = S + ni * p;
      acc_t lo = sn[0], hi = sn[0];
      for (int64_t i = 1; i < p; ++i) {
        lo = std::min(lo, sn[i]);
        hi = std::max(hi, sn[i]);
      }
      const acc_t delta = (hi - lo) / acc_t(k);
      for (int64_t i = 0; i < p; ++i) enc[ni * p + i] = encode(sn[i], L + ni * k, k, delta);
    }
  });
}

template <typename scalar_t>
at::Tensor recon_forward_impl(const at::Tensor& sim, const at::Tensor& levels,
                              const at::Tensor& features) {
  const int64_t n = sim.size(0), p = sim.size(1) * sim.size(2), cf = features.size(1),
                k = features.size(2);
  std::vector<Enc<scalar_t>> enc;
  recon_encode<scalar_t>(sim, levels, enc);
  at::Tensor out = at::empty({n, cf, sim.size(1), sim.size(2)}, features.options());
  const scalar_t* F = features.const_data_ptr<scalar_t>();
  scalar_t* O = out.data_ptr<scalar_t>();
  at::parallel_for(0, n * cf, 1, [&](int64_t b, int64_t e) {
    std::vector<scalar_t> fp(k + 2, scalar_t(0));
    for (int64_t nc = b; nc < e; ++nc) {
      const int64_t ni = nc / cf;
      std::copy(F + nc * k, F + nc * k + k, fp.begin() + 1);
      const Enc<scalar_t>* en = enc.data() + ni * p;
      scalar_t* o = O + nc * p;
      for (int64_t i = 0; i < p; ++i) {
        const scalar_t* f = fp.data() + en[i].m;
        o[i] = en[i].w[0] * f[0] + en[i].w[1] * f[1] + en[i].w[2] * f[2];
      }
    }
  });
  return out;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> recon_backward_impl(const at::Tensor& grad_out,
                                                                   const at::Tensor& sim,
                                                                   const at::Tensor& levels,
                                                                   const at::Tensor& features) {
  const int64_t n = sim.size(0), p = sim.size(1) * sim.size(2), cf = features.size(1),
                k = features.size(2);
  std::vector<Enc<scalar_t>> enc;
  recon_encode<scalar_t>(sim, levels, enc);
  at::Tensor gsim = at::empty_like(sim);
  at::Tensor glev = at::empty_like(levels);
  at::Tensor gfeat = at::empty_like(features);
  const scalar_t* F = features.const_data_ptr<scalar_t>();
  const scalar_t* G = grad_out.const_data_ptr<scalar_t>();
  scalar_t* GS = gsim.data_ptr<scalar_t>();
  scalar_t* GLv = glev.data_ptr<scalar_t>();
  scalar_t* GF = gfeat.data_ptr<scalar_t>();
  // dE[i, j] · sign, per pixel and candidate (for the levels' gradient)
  std::vector<scalar_t> dsg(n * p * 3);
  constexpr int64_t kChunk = 256;
  const int64_t chunks = (p + kChunk - 1) / kChunk;
  at::parallel_for(0, n * chunks, 1, [&](int64_t b, int64_t e) {
    std::vector<scalar_t> fp((k + 2) * cf, scalar_t(0));
    int64_t loaded = -1;
    scalar_t de[3][kChunk];
    for (int64_t task = b; task < e; ++task) {
      const int64_t ni = task / chunks, i0 = (task % chunks) * kChunk,
                    len = std::min(kChunk, p - i0);
      if (loaded != ni) {  // padded feature rows of sample ni
        for (int64_t c = 0; c < cf; ++c)
          std::copy(F + (ni * cf + c) * k, F + (ni * cf + c) * k + k, fp.begin() + c * (k + 2) + 1);
        loaded = ni;
      }
      const Enc<scalar_t>* en = enc.data() + ni * p + i0;
      for (int j = 0; j < 3; ++j) std::fill(de[j], de[j] + len, scalar_t(0));
      for (int64_t c = 0; c < cf; ++c) {
        const scalar_t* g = G + (ni * cf + c) * p + i0;
        const scalar_t* f = fp.data() + c * (k + 2);
        for (int64_t i = 0; i < len; ++i) {
          const scalar_t* fi = f + en[i].m;
          de[0][i] += g[i] * fi[0];
          de[1][i] += g[i] * fi[1];
          de[2][i] += g[i] * fi[2];
        }
      }
      for (int64_t i = 0; i < len; ++i) {
        scalar_t acc = 0;
        for (int j = 0; j < 3; ++j) {
          const scalar_t v = de[j][i] * en[i].sg[j];
          dsg[(ni * p + i0 + i) * 3 + j] = v;
          acc += v;
        }
        GS[ni * p + i0 + i] = acc;
      }
    }
  });
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    std::vector<scalar_t> gl(k + 2);
    for (int64_t ni = b; ni < e; ++ni) {
      std::fill(gl.begin(), gl.end(), scalar_t(0));
      for (int64_t i = 0; i < p; ++i) {
        const int64_t m = enc[ni * p + i].m;
        for (int j = 0; j < 3; ++j) gl[m + j] -= dsg[(ni * p + i) * 3 + j];
      }
      std::copy(gl.begin() + 1, gl.begin() + 1 + k, GLv + ni * k);
    }
  });
  at::parallel_for(0, n * cf, 1, [&](int64_t b, int64_t e) {
    std::vector<scalar_t> gf(k + 2);
    for (int64_t nc = b; nc < e; ++nc) {
      const int64_t ni = nc / cf;
      std::fill(gf.begin(), gf.end(), scalar_t(0));
      const Enc<scalar_t>* en = enc.data() + ni * p;
      const scalar_t* g = G + nc * p;
      for (int64_t i = 0; i < p; ++i) {
        scalar_t* t = gf.data() + en[i].m;
        t[0] += g[i] * en[i].w[0];
        t[1] += g[i] * en[i].w[1];
        t[2] += g[i] * en[i].w[2];
      }
      std::copy(gf.begin() + 1, gf.begin() + 1 + k, GF + nc * k);
    }
  });
  return {gsim, glev, gfeat};
}

// sim (N, H, W), levels (N, K), features (N, Cf, K).
void recon_check(const char* kernel, const at::Tensor& sim, const at::Tensor& levels,
                 const at::Tensor& features) {
  namespace guards = segops::guards;
  segops::cpu::check_operands(kernel, 3, {{"sim", &sim}, {"features", &features}});
  guards::check_rank(kernel, 2, {{"levels", &levels}});
  guards::check_like(kernel, sim, {{"levels", &levels}});
  guards::check_sizes(kernel, "levels", levels, {sim.size(0), levels.size(1)});
  guards::check_sizes(kernel, "features", features,
                      {sim.size(0), features.size(1), levels.size(1)});
}

at::Tensor recon_forward_cpu(const at::Tensor& sim, const at::Tensor& levels,
                             const at::Tensor& features) {
  recon_check("texture_reconstruct_forward (cpu)", sim, levels, features);
  if (levels.size(1) == 0) {  // no levels: every pixel's encoding is empty
    return at::zeros({sim.size(0), features.size(1), sim.size(1), sim.size(2)}, sim.options());
  }
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(sim.scalar_type(), "texture_reconstruct_forward_cpu", [&] {
    out = recon_forward_impl<scalar_t>(sim, levels, features);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> recon_backward_cpu(const at::Tensor& grad_out,
                                                                  const at::Tensor& sim,
                                                                  const at::Tensor& levels,
                                                                  const at::Tensor& features) {
  const char* kernel = "texture_reconstruct_backward (cpu)";
  recon_check(kernel, sim, levels, features);
  segops::guards::check_like(kernel, sim, {{"grad_out", &grad_out}});
  segops::guards::check_sizes(kernel, "grad_out", grad_out,
                              {sim.size(0), features.size(1), sim.size(1), sim.size(2)});
  if (levels.size(1) == 0) {  // no levels: the output did not depend on sim
    return {at::zeros_like(sim), at::empty_like(levels), at::empty_like(features)};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(sim.scalar_type(), "texture_reconstruct_backward_cpu", [&] {
    out = recon_backward_impl<scalar_t>(grad_out, sim, levels, features);
  });
  return out;
}

}  // namespace
}  // namespace segops

TORCH_LIBRARY_IMPL(segops_C, CPU, m) {
  m.impl("qco_forward", &segops::qco_forward_cpu);
  m.impl("qco_backward", &segops::qco_backward_cpu);
  m.impl("texture_reconstruct_forward", &segops::recon_forward_cpu);
  m.impl("texture_reconstruct_backward", &segops::recon_backward_cpu);
}
