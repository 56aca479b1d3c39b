"""QCO texture histograms (STLNet, Zhu et al. CVPR 2021) — reference semantics, docs/operators.md §2.5.

Computed the way the official STLNet code does (`QCO_1d`, `QCO_2d`, `TEM` in STLNet.py): the
dense quantisation encoding E is materialised — (N, P, K) for the 1-D op and the
reconstruction, (N, s·s, K, K, h, w) pair products for the 2-D op — since this is also the
benchmark baseline. Deviations from the official code, all deliberate (docs/operators.md §2.5):

- counts/co-occurrences are normalised by `sum + 1e-6`, so a constant input gives 0, not NaN;
- the band test is `|L_n − sim_i| < Δ` with `Δ = (hi − lo)/K` (the official code tests
  `1 − |L_n − sim_i| > 1 − (L_1 − L_0)`, the same in exact arithmetic but undefined for K = 1);
- min/max are `torch.amin/amax`, whose gradient is split evenly between ties.

Δ only gates the band, so it is detached; the band indicator has zero gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6  # added to the histogram total before normalising (docs/operators.md §2.5)


def quantisation_levels(lo: Tensor, hi: Tensor, num_levels: int) -> Tensor:
    """L_n = lo + (2n+1)/(2K) · (hi − lo) for n < K; lo, hi: (..., 1) -> (..., K)."""
    q = torch.arange(num_levels, device=lo.device, dtype=lo.dtype)
    return (2 * q + 1) / (2 * num_levels) * (hi - lo) + lo


def encode(sim: Tensor, levels: Tensor, delta: Tensor) -> Tensor:
    """E = (1 − |L − sim|) where |L − sim| < Δ, else 0 (broadcasting sim (..., P, 1) against
    levels (..., 1, K) and Δ (..., 1, 1))."""
    dist = torch.abs(levels - sim)
    return (1 - dist) * (dist < delta)


def qco_1d(x: Tensor, num_levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """(counts (N, K), levels (N, K), sim (N, H, W)) of x (N, C, H, W)."""
    n = x.shape[0]
    x_ave = F.adaptive_avg_pool2d(x, (1, 1))                                   # (N, C, 1, 1)
    sim = (F.normalize(x_ave, dim=1) * F.normalize(x, dim=1)).sum(1)           # (N, H, W)
    flat = sim.flatten(1)                                                      # (N, P)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    levels = quantisation_levels(lo, hi, num_levels)                           # (N, K)
    delta = ((hi - lo) / num_levels).detach().unsqueeze(-1)                    # (N, 1, 1)
    quant = encode(flat.unsqueeze(-1), levels.unsqueeze(1), delta)             # (N, P, K)
    sta = quant.sum(1)                                                         # (N, K)
    counts = sta / (sta.sum(-1, keepdim=True) + EPS)
    return counts, levels, sim


def texture_reconstruct(sim: Tensor, levels: Tensor, features: Tensor) -> Tensor:
    """out[:, :, i] = Σ_n E[i, n] · features[:, :, n] (TEM's per-pixel reconstruction)."""
    n, cf, k = features.shape
    flat = sim.flatten(1)                                                      # (N, P)
    delta = ((flat.amax(-1) - flat.amin(-1)) / k).detach().view(n, 1, 1)
    quant = encode(flat.unsqueeze(-1), levels.unsqueeze(1), delta)             # (N, P, K)
    out = torch.bmm(features, quant.permute(0, 2, 1))                          # (N, Cf, P)
    return out.view(n, cf, *sim.shape[1:])


def qco_2d(x: Tensor, num_levels: int, grid: int) -> tuple[Tensor, Tensor]:
    """(cooc (N, s, s, K, K), levels (N, s, s, K)) of x (N, C, H, W), H and W divisible by s."""
    n, _, hh, ww = x.shape
    s, k = grid, num_levels
    h, w = hh // s, ww // s
    x_ave = F.adaptive_avg_pool2d(x, (s, s))                                   # (N, C, s, s)
    x_ave_up = F.adaptive_avg_pool2d(x_ave, (hh, ww))                          # region means
    sim = (F.normalize(x_ave_up, dim=1) * F.normalize(x, dim=1)).sum(1)        # (N, H, W)
    sim = sim.reshape(n, s, h, s, w).permute(0, 1, 3, 2, 4).reshape(n, s * s, h * w)
    lo = sim.amin(-1, keepdim=True)                                            # (N, s*s, 1)
    hi = sim.amax(-1, keepdim=True)
    levels = quantisation_levels(lo, hi, k)                                    # (N, s*s, K)
    delta = ((hi - lo) / k).detach().unsqueeze(-1)                             # (N, s*s, 1, 1)
    quant = encode(sim.unsqueeze(-1), levels.unsqueeze(2), delta)              # (N, s*s, h*w, K)
    quant = quant.view(n, s * s, h, w, k).permute(0, 1, 4, 2, 3)               # (N, s*s, K, h, w)
    quant = F.pad(quant, (0, 1, 0, 1), mode="constant", value=0.0)
    left = quant[:, :, :, :h, :w].unsqueeze(3)                                 # (N, s*s, K, 1, h, w)
    right = quant[:, :, :, 1:, 1:].unsqueeze(2)                                # (N, s*s, 1, K, h, w)
    sta = (left * right).sum(-1).sum(-1)                                       # (N, s*s, K, K)
    cooc = sta / (sta.sum((-1, -2), keepdim=True) + EPS)
    return cooc.view(n, s, s, k, k), levels.view(n, s, s, k)
