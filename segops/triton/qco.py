"""Triton kernels for the QCO ops (docs/operators.md §2.5): qco_1d / qco_2d and texture_reconstruct.

Tensors in, tensors out (the launchers below); registration lives in segops/ops/qco.py, which
also documents the saved tensors. Nothing dense is built: no (N, P, K) encoding, no
(N, K, K, h, w) pair products.

qco forward (qco_1d is grid 1 with a 1-D histogram), one program per (sample·region, block of
BLOCK_P region pixels), looping over channels in BLOCK_C chunks:
  1. _region_sum:  Σ x per region and channel (atomic adds of per-block partial sums);
  2. _similarity:  cosine similarity to the normalised region mean, 1/|x|, per-block min/max —
     the second and last pass over x;
  3. _histogram:   the ≤ 2 levels each pixel hits (three candidates round(u) − 1 .. + 1 tested
     with the exact band rule) added to the region's K bins, or for qco_2d the ≤ 2×2 level
     pairs of (pixel, (+1, +1) neighbour) added to the region's K×K bins.
qco backward:
  1. _band_backward: each pixel's d(sim) through E (and, for qco_2d, through both pairs it is
     part of), the levels' gradient from E and the tie counts at min/max;
  2. _rowsum_backward: adds the min/max gradient (split evenly between ties, as torch.amin/amax
     do), forms the per-pixel coefficients and Σ_i gsim_i x_i/|x_i| per region and channel;
  3. _input_backward: dx = a_i gn − b_i x_i + dg/hw, the second pass over x.
texture_reconstruct: per pixel gathers of the ≤ 2 features it hits (forward); the backward
gathers the same two features for d(sim), and scatters grad_out into the two feature columns.
Per-region vectors (N·R·C, N·R·K) are finished with small torch ops between the kernels.
All arithmetic is fp32 (fp16/bf16 inputs are widened on load).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from segops.triton._common import Target, target_of

NORM_EPS = 1e-12
HIST_EPS = 1e-6


def config(dtype: torch.dtype, target: Target) -> dict:
    """Tiles and launch options: "pixels" for the kernels over pixel blocks alone, "channels"
    for those that also loop over channel blocks (every kernel streams; fp32 arithmetic),
    "recon_backward" for texture_reconstruct's backward, whose three gathered feature tiles and
    three scattered gradient tiles (int64 addresses each) spilled 8 KB with 32-channel blocks
    on a GPU (scripts/check_triton_compile.py)."""
    launch = target.launch(4, 3)
    return dict(pixels=dict(BLOCK_P=128, **launch),
                channels=dict(BLOCK_P=128, BLOCK_C=32, **launch),
                recon_backward=dict(BLOCK_P=128, BLOCK_C=8 if target.gpu else 32,
                                    **target.launch(4, 1)))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _region_pixels(R, S, BH, BW, W, BLOCK: tl.constexpr):
    """This program's pixels: block program_id(1) of the region-local pixels of region
    nr = program_id(0) (sample n = nr // R, region nr % R). Returns nr, n, the region-local row
    and column, the flat pixel offsets and their mask."""
    nr = tl.program_id(0)
    r = nr % R
    ry = r // S
    rx = r % S
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = t < BH * BW
    ty = t // BW
    tx = t % BW
    pix = (ry * BH + ty) * W + rx * BW + tx
    return nr, (nr // R).to(tl.int64), ty, tx, pix, mask


@triton.jit
def _channel_tile(x_ptr, n, c, cm, pix, mask, C, P):
    """x[n, c, pix] as a (channels x pixels) fp32 tile (0 where masked), its offsets and mask."""
    off = (n * C + c[:, None]) * P + pix[None, :]
    m2 = cm[:, None] & mask[None, :]
    return tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32), off, m2


@triton.jit
def _band(lohi_ptr, row, K):
    """(lo, hi) of row `row` of lohi and the level spacing delta = (hi - lo) / K."""
    lo = tl.load(lohi_ptr + row * 2)
    hi = tl.load(lohi_ptr + row * 2 + 1)
    return lo, hi, (hi - lo) / (K * 1.0)


@triton.jit
def _first_candidate(simv, l0, delta, K):
    safe = tl.where(delta > 0, delta, 1.0)
    u = (simv - l0) / safe
    u = tl.minimum(tl.maximum(u, -1.0), K * 1.0)
    m = (u + 0.5).to(tl.int32)  # round half up; negatives end up at 0 (clamped below)
    return tl.minimum(tl.maximum(m, 0), K - 1)


@triton.jit
def _candidate(simv, lev, L, delta, K):
    """E and dE/dsim of level `lev` (level value L) for similarity simv."""
    diff = L - simv
    d = tl.abs(diff)
    band = (lev >= 0) & (lev < K) & (d < delta)
    w = tl.where(band, 1.0 - d, 0.0)
    sg = tl.where(band, tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)), 0.0)
    return w, sg, band


@triton.jit
def _level(lev, lo, hi, K):
    c = (2.0 * lev + 1.0) / (2.0 * K)
    return c * (hi - lo) + lo


@triton.jit
def _similarity_at(sim_ptr, n, P, pix, mask, lo, hi, delta, K):
    """The similarity of sample n at pixels pix (0 where masked) and its first candidate level."""
    simv = tl.load(sim_ptr + n * P + pix, mask=mask, other=0.0)
    return simv, _first_candidate(simv, _level(0, lo, hi, K), delta, K)


# ---------------------------------------------------------------------------------------------
# qco forward kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _region_sum_kernel(x_ptr, sum_ptr, C, P, R, S, BH, BW, W,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    nr, n, ty, tx, pix, mask = _region_pixels(R, S, BH, BW, W, BLOCK_P)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        v, _, _ = _channel_tile(x_ptr, n, c, cm, pix, mask, C, P)
        tl.atomic_add(sum_ptr + nr.to(tl.int64) * C + c, tl.sum(v, axis=1), mask=cm)


@triton.jit
def _similarity_kernel(x_ptr, gn_ptr, sim_ptr, rn_ptr, pmin_ptr, pmax_ptr, C, P, R, S, BH, BW, W,
                       NB, EPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    nr, n, ty, tx, pix, mask = _region_pixels(R, S, BH, BW, W, BLOCK_P)
    dot = tl.zeros([BLOCK_P], dtype=tl.float32)
    sq = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        g = tl.load(gn_ptr + nr.to(tl.int64) * C + c, mask=cm, other=0.0)
        v, _, _ = _channel_tile(x_ptr, n, c, cm, pix, mask, C, P)
        dot += tl.sum(v * g[:, None], axis=0)
        sq += tl.sum(v * v, axis=0)
    nrm = tl.sqrt(sq)
    clamped = nrm < EPS
    den = tl.where(clamped, EPS, nrm)
    simv = dot / den
    rn = tl.where(clamped, -1.0 / den, 1.0 / den)
    tl.store(sim_ptr + n * P + pix, simv, mask=mask)
    tl.store(rn_ptr + n * P + pix, rn, mask=mask)
    pb = tl.program_id(1)
    tl.store(pmin_ptr + nr * NB + pb, tl.min(tl.where(mask, simv, float("inf")), axis=0))
    tl.store(pmax_ptr + nr * NB + pb, tl.max(tl.where(mask, simv, float("-inf")), axis=0))


@triton.jit
def _histogram_kernel(sim_ptr, lohi_ptr, hist_ptr, K, P, R, S, BH, BW, W,
                      COOC: tl.constexpr, BLOCK_P: tl.constexpr):
    nr, n, ty, tx, pix, mask = _region_pixels(R, S, BH, BW, W, BLOCK_P)
    lo, hi, delta = _band(lohi_ptr, nr, K)
    simv, m = _similarity_at(sim_ptr, n, P, pix, mask, lo, hi, delta, K)
    if COOC:
        has_q = mask & (ty + 1 < BH) & (tx + 1 < BW)
        simq, mq = _similarity_at(sim_ptr, n, P, pix + W + 1, has_q, lo, hi, delta, K)
        base = hist_ptr + nr.to(tl.int64) * K * K
        for j in tl.static_range(3):
            a = m - 1 + j
            wa, sa, ba = _candidate(simv, a, _level(a, lo, hi, K), delta, K)
            for jj in tl.static_range(3):
                b = mq - 1 + jj
                wb, sb, bb = _candidate(simq, b, _level(b, lo, hi, K), delta, K)
                ok = has_q & ba & bb
                tl.atomic_add(base + a * K + b, wa * wb, mask=ok)
    else:
        base = hist_ptr + nr.to(tl.int64) * K
        for j in tl.static_range(3):
            a = m - 1 + j
            wa, sa, ba = _candidate(simv, a, _level(a, lo, hi, K), delta, K)
            tl.atomic_add(base + a, wa, mask=mask & ba)


# ---------------------------------------------------------------------------------------------
# qco backward kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _pair_grad(dh_ptr, a, wa, ba, simo, mo, has_o, lo, hi, delta, K, A_IS_ROW: tl.constexpr):
    """Σ over the other pixel's candidates b of dh[a, b]·E_b (A_IS_ROW) or dh[b, a]·E_b."""
    acc = tl.zeros_like(wa)
    for jj in tl.static_range(3):
        b = mo - 1 + jj
        wb, sb, bb = _candidate(simo, b, _level(b, lo, hi, K), delta, K)
        ok = has_o & ba & bb
        if A_IS_ROW:
            idx = a * K + b
        else:
            idx = b * K + a
        acc += tl.load(dh_ptr + idx, mask=ok, other=0.0) * wb
    return acc


@triton.jit
def _band_backward_kernel(sim_ptr, gsim_ptr, dh_ptr, lohi_ptr, gpart_ptr, glev_ptr, ties_ptr,
                          K, P, R, S, BH, BW, W, HAS_GSIM: tl.constexpr, COOC: tl.constexpr,
                          BLOCK_P: tl.constexpr):
    nr, n, ty, tx, pix, mask = _region_pixels(R, S, BH, BW, W, BLOCK_P)
    lo, hi, delta = _band(lohi_ptr, nr, K)
    simv, m = _similarity_at(sim_ptr, n, P, pix, mask, lo, hi, delta, K)
    if HAS_GSIM:
        gs = tl.load(gsim_ptr + n * P + pix, mask=mask, other=0.0).to(tl.float32)
    else:
        gs = tl.zeros([BLOCK_P], dtype=tl.float32)
    if COOC:
        dh = dh_ptr + nr.to(tl.int64) * K * K
        has_q = mask & (ty + 1 < BH) & (tx + 1 < BW)
        has_o = mask & (ty > 0) & (tx > 0)
        simq, mq = _similarity_at(sim_ptr, n, P, pix + W + 1, has_q, lo, hi, delta, K)
        simo, mo = _similarity_at(sim_ptr, n, P, pix - W - 1, has_o, lo, hi, delta, K)
    else:
        dh = dh_ptr + nr.to(tl.int64) * K
    for j in tl.static_range(3):
        a = m - 1 + j
        wa, sa, ba = _candidate(simv, a, _level(a, lo, hi, K), delta, K)
        ba = ba & mask
        if COOC:
            de = _pair_grad(dh, a, wa, ba, simq, mq, has_q, lo, hi, delta, K, True)
            de += _pair_grad(dh, a, wa, ba, simo, mo, has_o, lo, hi, delta, K, False)
        else:
            de = tl.load(dh + a, mask=ba, other=0.0)
        v = de * sa
        gs += v
        tl.atomic_add(glev_ptr + nr.to(tl.int64) * K + a, v, mask=ba)
    tl.store(gpart_ptr + n * P + pix, gs, mask=mask)
    nmin = tl.sum((mask & (simv == lo)).to(tl.float32), axis=0)
    nmax = tl.sum((mask & (simv == hi)).to(tl.float32), axis=0)
    tl.atomic_add(ties_ptr + nr * 2, nmin)
    tl.atomic_add(ties_ptr + nr * 2 + 1, nmax)


@triton.jit
def _rowsum_backward_kernel(x_ptr, sim_ptr, rn_ptr, gpart_ptr, lohi_ptr, wties_ptr, coef_ptr,
                            dgn_ptr, C, P, R, S, BH, BW, W,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    nr, n, ty, tx, pix, mask = _region_pixels(R, S, BH, BW, W, BLOCK_P)
    lo = tl.load(lohi_ptr + nr * 2)
    hi = tl.load(lohi_ptr + nr * 2 + 1)
    wlo = tl.load(wties_ptr + nr * 2)
    whi = tl.load(wties_ptr + nr * 2 + 1)
    simv = tl.load(sim_ptr + n * P + pix, mask=mask, other=0.0)
    rs = tl.load(rn_ptr + n * P + pix, mask=mask, other=0.0)
    gs = tl.load(gpart_ptr + n * P + pix, mask=mask, other=0.0)
    gs += tl.where(simv == lo, wlo, 0.0) + tl.where(simv == hi, whi, 0.0)
    r = tl.abs(rs)
    a = gs * r
    b = tl.where(rs < 0, 0.0, gs * r * r * simv)
    tl.store(coef_ptr + n * 2 * P + pix, a, mask=mask)
    tl.store(coef_ptr + n * 2 * P + P + pix, b, mask=mask)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        v, _, _ = _channel_tile(x_ptr, n, c, cm, pix, mask, C, P)
        tl.atomic_add(dgn_ptr + nr.to(tl.int64) * C + c, tl.sum(v * a[None, :], axis=1), mask=cm)


@triton.jit
def _input_backward_kernel(x_ptr, coef_ptr, gn_ptr, dg_ptr, gx_ptr, C, P, R, S, BH, BW, W,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    nr, n, ty, tx, pix, mask = _region_pixels(R, S, BH, BW, W, BLOCK_P)
    a = tl.load(coef_ptr + n * 2 * P + pix, mask=mask, other=0.0)
    b = tl.load(coef_ptr + n * 2 * P + P + pix, mask=mask, other=0.0)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        g = tl.load(gn_ptr + nr.to(tl.int64) * C + c, mask=cm, other=0.0)
        d = tl.load(dg_ptr + nr.to(tl.int64) * C + c, mask=cm, other=0.0)
        v, off, m2 = _channel_tile(x_ptr, n, c, cm, pix, mask, C, P)
        gx = a[None, :] * g[:, None] - b[None, :] * v + d[:, None]
        tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=m2)


# ---------------------------------------------------------------------------------------------
# qco launchers
# ---------------------------------------------------------------------------------------------
def _geometry(x, grid):
    n, c, h, w = x.shape
    return n, c, h, w, h * w, grid, h // grid, w // grid, grid * grid


def _normalise(v):
    nrm = v.norm(dim=-1, keepdim=True)
    return v / nrm.clamp_min(NORM_EPS), nrm


def _coefficients(k, device):
    i = torch.arange(k, device=device, dtype=torch.float32)
    return (2 * i + 1) / (2 * k)


def _plan(x, grid):
    """Geometry, launch config, pixel blocks per region and the grid of the region kernels."""
    geometry = _geometry(x, grid)
    n, bh, bw, r = geometry[0], geometry[6], geometry[7], geometry[8]
    cfg = config(x.dtype, target_of(x))
    nb = triton.cdiv(bh * bw, cfg["pixels"]["BLOCK_P"])
    return geometry, cfg, nb, (n * r, nb)


def qco_forward(x, num_levels, grid, cooc):
    (n, c, h, w, p, s, bh, bw, r), cfg, nb, launch = _plan(x, grid)
    k, dev, f32 = num_levels, x.device, torch.float32
    sums = torch.zeros(n, r, c, device=dev, dtype=f32)
    _region_sum_kernel[launch](x, sums, c, p, r, s, bh, bw, w, **cfg["channels"])
    mean = sums / (bh * bw)
    gn, _ = _normalise(mean)
    sim = torch.empty(n, h, w, device=dev, dtype=f32)
    rnorm = torch.empty(n, h, w, device=dev, dtype=f32)
    pmin = torch.empty(n * r, nb, device=dev, dtype=f32)
    pmax = torch.empty(n * r, nb, device=dev, dtype=f32)
    _similarity_kernel[launch](x, gn.contiguous(), sim, rnorm, pmin, pmax, c, p, r, s, bh, bw, w, nb,
                               EPS=NORM_EPS, **cfg["channels"])
    lo, hi = pmin.amin(1), pmax.amax(1)
    lohi = torch.stack([lo, hi], 1).contiguous()
    hist = torch.zeros(n * r, k * k if cooc else k, device=dev, dtype=f32)
    _histogram_kernel[launch](sim, lohi, hist, k, p, r, s, bh, bw, w, COOC=cooc, **cfg["pixels"])
    total = hist.sum(1)
    hist = hist / (total + HIST_EPS)[:, None]
    levels = _coefficients(k, dev) * (hi - lo)[:, None] + lo[:, None]
    stats = torch.stack([lo, hi, total], 1).view(n, r, 3)
    if cooc:
        hist, levels = hist.view(n, s, s, k, k), levels.view(n, s, s, k)
    else:
        hist, levels = hist.view(n, k), levels.view(n, k)
    return hist, levels, sim, rnorm, mean, stats


def qco_backward(grad_hist, grad_levels, grad_sim, x, hist, sim, rnorm, mean, stats, num_levels,
                 grid, cooc):
    (n, c, h, w, p, s, bh, bw, r), cfg, nb, launch = _plan(x, grid)
    k, dev, f32 = num_levels, x.device, torch.float32
    st = stats.reshape(n * r, 3)
    lo, hi, total = st[:, 0], st[:, 1], st[:, 2]
    lohi = st[:, :2].contiguous()
    bins = k * k if cooc else k  # per region (explicit: -1 is ambiguous for an empty batch)
    gh = grad_hist.reshape(n * r, bins).float()
    hh = hist.reshape(n * r, bins)
    dh = ((gh - (gh * hh).sum(1, keepdim=True)) / (total + HIST_EPS)[:, None]).contiguous()
    gpart = torch.empty(n, h, w, device=dev, dtype=f32)
    glev = torch.zeros(n * r, k, device=dev, dtype=f32)
    ties = torch.zeros(n * r, 2, device=dev, dtype=f32)
    has_gs = grad_sim is not None
    _band_backward_kernel[launch](sim, grad_sim if has_gs else sim, dh, lohi, gpart, glev, ties,
                                  k, p, r, s, bh, bw, w, HAS_GSIM=has_gs, COOC=cooc, **cfg["pixels"])
    gtot = grad_levels.reshape(n * r, k).float() - glev
    coef = _coefficients(k, dev)
    ghi = (coef * gtot).sum(1)
    glo = (gtot - coef * gtot).sum(1)
    wties = torch.stack([glo / ties[:, 0].clamp_min(1), ghi / ties[:, 1].clamp_min(1)], 1).contiguous()
    coefs = torch.empty(n, 2, p, device=dev, dtype=f32)
    dgn = torch.zeros(n * r, c, device=dev, dtype=f32)
    _rowsum_backward_kernel[launch](x, sim, rnorm, gpart, lohi, wties, coefs, dgn, c, p, r, s, bh,
                                    bw, w, **cfg["channels"])
    m = mean.reshape(n * r, c)
    gn, nrm = _normalise(m)
    clamped = nrm < NORM_EPS
    proj = (gn * dgn).sum(1, keepdim=True)
    dg = torch.where(clamped, dgn, dgn - gn * proj) / nrm.clamp_min(NORM_EPS) / (bh * bw)
    gx = torch.empty_like(x)
    _input_backward_kernel[launch](x, coefs, gn.contiguous(), dg.contiguous(), gx, c, p, r, s, bh,
                                   bw, w, **cfg["channels"])
    return gx


# ---------------------------------------------------------------------------------------------
# texture_reconstruct
# ---------------------------------------------------------------------------------------------
@triton.jit
def _recon_candidates(sim_ptr, lev_ptr, lohi_ptr, n, pix, mask, K, P):
    lo, hi, delta = _band(lohi_ptr, n, K)
    simv = tl.load(sim_ptr + n * P + pix, mask=mask, other=0.0).to(tl.float32)
    l0 = tl.load(lev_ptr + n * K).to(tl.float32)
    m = _first_candidate(simv, l0, delta, K)
    return simv, m, delta


@triton.jit
def _recon_forward_kernel(sim_ptr, lev_ptr, lohi_ptr, f_ptr, out_ptr, CF, K, P,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    cb = tl.program_id(2)
    pix = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = pix < P
    simv, m, delta = _recon_candidates(sim_ptr, lev_ptr, lohi_ptr, n, pix, mask, K, P)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < CF
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for j in tl.static_range(3):
        a = m - 1 + j
        inr = (a >= 0) & (a < K) & mask
        L = tl.load(lev_ptr + n * K + a, mask=inr, other=0.0).to(tl.float32)
        wa, sa, ba = _candidate(simv, a, L, delta, K)
        ba = ba & mask
        f = tl.load(f_ptr + (n * CF + c[:, None]) * K + a[None, :], mask=cm[:, None] & ba[None, :],
                    other=0.0).to(tl.float32)
        acc += f * wa[None, :]
    tl.store(out_ptr + (n * CF + c[:, None]) * P + pix[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=cm[:, None] & mask[None, :])


@triton.jit
def _recon_backward_kernel(go_ptr, sim_ptr, lev_ptr, lohi_ptr, f_ptr, gsim_ptr, glev_ptr, gf_ptr,
                           CF, K, P, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    pix = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = pix < P
    simv, m, delta = _recon_candidates(sim_ptr, lev_ptr, lohi_ptr, n, pix, mask, K, P)
    a0 = m - 1
    a1 = m
    a2 = m + 1
    w0, s0, b0 = _candidate(simv, a0, tl.load(lev_ptr + n * K + a0, mask=mask & (a0 >= 0), other=0.0).to(tl.float32), delta, K)
    w1, s1, b1 = _candidate(simv, a1, tl.load(lev_ptr + n * K + a1, mask=mask, other=0.0).to(tl.float32), delta, K)
    w2, s2, b2 = _candidate(simv, a2, tl.load(lev_ptr + n * K + a2, mask=mask & (a2 < K), other=0.0).to(tl.float32), delta, K)
    b0 = b0 & mask
    b1 = b1 & mask
    b2 = b2 & mask
    d0 = tl.zeros([BLOCK_P], dtype=tl.float32)
    d1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    d2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    anyb = b0 | b1 | b2
    for c0 in range(0, CF, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = (c < CF)[:, None]
        g = tl.load(go_ptr + (n * CF + c[:, None]) * P + pix[None, :], mask=cm & anyb[None, :],
                    other=0.0).to(tl.float32)
        row = (n * CF + c[:, None]) * K
        f0 = tl.load(f_ptr + row + a0[None, :], mask=cm & b0[None, :], other=0.0).to(tl.float32)
        f1 = tl.load(f_ptr + row + a1[None, :], mask=cm & b1[None, :], other=0.0).to(tl.float32)
        f2 = tl.load(f_ptr + row + a2[None, :], mask=cm & b2[None, :], other=0.0).to(tl.float32)
        d0 += tl.sum(g * f0, axis=0)
        d1 += tl.sum(g * f1, axis=0)
        d2 += tl.sum(g * f2, axis=0)
        tl.atomic_add(gf_ptr + row + a0[None, :], g * w0[None, :], mask=cm & b0[None, :])
        tl.atomic_add(gf_ptr + row + a1[None, :], g * w1[None, :], mask=cm & b1[None, :])
        tl.atomic_add(gf_ptr + row + a2[None, :], g * w2[None, :], mask=cm & b2[None, :])
    v0 = d0 * s0
    v1 = d1 * s1
    v2 = d2 * s2
    gs = v0 + v1 + v2
    tl.atomic_add(glev_ptr + n * K + a0, -v0, mask=b0)
    tl.atomic_add(glev_ptr + n * K + a1, -v1, mask=b1)
    tl.atomic_add(glev_ptr + n * K + a2, -v2, mask=b2)
    tl.store(gsim_ptr + n * P + pix, gs.to(gsim_ptr.dtype.element_ty), mask=mask)


def _recon_lohi(sim):
    flat = sim.flatten(1)
    lo, hi = torch.aminmax(flat, dim=1)
    return torch.stack([lo, hi], 1).float().contiguous()


def texture_reconstruct_forward(sim, levels, features):
    n, h, w = sim.shape
    cf, k = features.shape[1:]
    p = h * w
    out = torch.empty(n, cf, h, w, device=sim.device, dtype=features.dtype)
    cfg = config(features.dtype, target_of(sim))["channels"]
    launch = (n, triton.cdiv(p, cfg["BLOCK_P"]), triton.cdiv(cf, cfg["BLOCK_C"]))
    _recon_forward_kernel[launch](sim, levels, _recon_lohi(sim), features, out, cf, k, p,
                                  **cfg)
    return out


def texture_reconstruct_backward(grad_out, sim, levels, features):
    n, h, w = sim.shape
    cf, k = features.shape[1:]
    p = h * w
    gsim = torch.empty_like(sim)
    glev = torch.zeros(n, k, device=sim.device, dtype=torch.float32)
    gf = torch.zeros(n, cf, k, device=sim.device, dtype=torch.float32)
    cfg = config(features.dtype, target_of(sim))["recon_backward"]
    launch = (n, triton.cdiv(p, cfg["BLOCK_P"]))
    _recon_backward_kernel[launch](grad_out, sim, levels, _recon_lohi(sim), features, gsim, glev, gf,
                                   cf, k, p, **cfg)
    return gsim, glev.to(levels.dtype), gf.to(features.dtype)
