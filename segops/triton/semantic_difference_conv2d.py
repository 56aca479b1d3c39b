"""Triton kernels for semantic difference convolution (SDN, SPEC §2.4): tensors in, tensors out.

Forward: an implicit GEMM. Output tile [BLOCK_P pixels x BLOCK_O out-channels]; the reduction
runs over the Cin*k^2 axis as (tap t) x (channel block): each K-step builds its [BLOCK_P, BLOCK_C]
tile of similarity-weighted differences S * (U[c, p+d_t] - U[c, p]) on the fly from U and V
(masked loads: zero outside the image) and feeds it to tl.dot with fp32 accumulation. The
k^2-unfolded U or V is never materialised. "gaussian" needs sum_c over Cg before the per-tap
scalar is known, so a small pre-pass writes S as an fp32 (N, k^2, H*W) tensor (k^2/Cin of the
unfold size); "charbonnier" computes S per channel inside the K-step.

Backward (deterministic, no atomics):
- dW[t, c, o] = sum_{n,p} D[n,c,t,p] dY[n,o,p]: a tl.dot over pixels with D rebuilt on the fly,
  split over pixel chunks into fp32 partial buffers that are summed afterwards.
- dU, dV by gathering: for an input pixel q and tap t, dD(c,t,q) and dD(c,t,q-d_t) are two
  implicit GEMMs W[t]^T dY (the second with dY loaded at the shifted pixels). Then
  dU[q] = sum_t S(q-d_t) dD(q-d_t) - S(q) dD(q); the charbonnier dV follows from the same two
  terms; the gaussian dV needs G(t,p) = sum_c dD * (U[p+d]-U[p]) first (per-channel-block fp32
  partials, summed), then one gather pass.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from segops.triton import _interpreter_compat  # noqa: F401  (numpy>=2.3 under TRITON_INTERPRET)

SIM_NONE, SIM_CHARBONNIER, SIM_GAUSSIAN = 0, 1, 2
_SIM = {"none": SIM_NONE, "charbonnier": SIM_CHARBONNIER, "gaussian": SIM_GAUSSIAN}
_DW_SPLITS = None  # override of the grad_weight split count (tests only)


@triton.jit
def _gaussian_similarity_kernel(V, S, Cg, H, W, HW, KS: tl.constexpr, DIL, scale,
                                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """S[n, t, p] = exp(scale * sum_c (V[c, p+d_t] - V[c, p])^2), fp32."""
    pid_p = tl.program_id(0)
    t = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    HALF: tl.constexpr = (KS - 1) // 2
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    y = p // W
    x = p % W
    yy = y + (t // KS - HALF) * DIL
    xx = x + (t % KS - HALF) * DIL
    inb = pmask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
    q = yy * W + xx
    base = V + n * Cg * HW
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, Cg, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < Cg
        off = c.to(tl.int64)[None, :] * HW
        v = tl.load(base + off + p[:, None], mask=pmask[:, None] & cm[None, :], other=0.0).to(tl.float32)
        vn = tl.load(base + off + q[:, None], mask=inb[:, None] & cm[None, :], other=0.0).to(tl.float32)
        e = vn - v
        acc += tl.sum(e * e, axis=1)
    tl.store(S + (n * KS * KS + t) * HW + p, tl.exp(acc * scale), mask=pmask)


@triton.jit
def _weighted_difference(U, V, S, n, t, c, cm, p, pmask, y, x, Cin, H, W, HW,
                         KS: tl.constexpr, DIL, inv_s2, SIM: tl.constexpr):
    """[BLOCK_P, BLOCK_C] tile of S(c,p,t) * (U[c,p+d_t] - U[c,p]), fp32, zero off the tile."""
    HALF: tl.constexpr = (KS - 1) // 2
    yy = y + (t // KS - HALF) * DIL
    xx = x + (t % KS - HALF) * DIL
    inb = pmask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
    q = yy * W + xx
    off = n * Cin * HW + c.to(tl.int64)[None, :] * HW
    m = pmask[:, None] & cm[None, :]
    mn = inb[:, None] & cm[None, :]
    d = (tl.load(U + off + q[:, None], mask=mn, other=0.0).to(tl.float32)
         - tl.load(U + off + p[:, None], mask=m, other=0.0).to(tl.float32))
    if SIM == 1:  # charbonnier, Cg == Cin
        e = (tl.load(V + off + q[:, None], mask=mn, other=0.0).to(tl.float32)
             - tl.load(V + off + p[:, None], mask=m, other=0.0).to(tl.float32))
        d = d / tl.sqrt(1.0 + e * e * inv_s2)
    elif SIM == 2:  # gaussian: one scalar per (pixel, tap)
        s = tl.load(S + (n * KS * KS + t) * HW + p, mask=pmask, other=0.0)
        d = d * s[:, None]
    return d


@triton.jit
def _forward_kernel(U, V, S, Wt, B, Y, Cin, Cout, H, W, HW, KS: tl.constexpr, DIL, inv_s2,
                    SIM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    y = p // W
    x = p % W
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    om = o < Cout
    acc = tl.zeros([BLOCK_P, BLOCK_O], dtype=tl.float32)
    for t in range(KS * KS):
        for c0 in range(0, Cin, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < Cin
            d = _weighted_difference(U, V, S, n, t, c, cm, p, pmask, y, x, Cin, H, W, HW, KS, DIL,
                                     inv_s2, SIM)
            w = tl.load(Wt + (t * Cin + c.to(tl.int64))[:, None] * Cout + o[None, :],
                        mask=cm[:, None] & om[None, :], other=0.0)
            acc = tl.dot(d.to(w.dtype), w, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(B + o, mask=om, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + (n * Cout + o.to(tl.int64))[None, :] * HW + p[:, None],
             acc.to(Y.dtype.element_ty), mask=pmask[:, None] & om[None, :])


@triton.jit
def _grad_weight_kernel(U, V, S, G, DWp, N, Cin, Cout, H, W, HW, blocks_per_image,
                        blocks_per_split, KS: tl.constexpr, DIL, inv_s2, SIM: tl.constexpr,
                        DOT_PREC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_O: tl.constexpr):
    """DWp[split, t, c, o] = sum over this split's pixel blocks of D[n,c,t,p] dY[n,o,p] (fp32)."""
    KK: tl.constexpr = KS * KS
    t = tl.program_id(0) % KK
    split = tl.program_id(0) // KK
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < Cin
    o = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    om = o < Cout
    acc = tl.zeros([BLOCK_C, BLOCK_O], dtype=tl.float32)
    b0 = split * blocks_per_split
    b1 = tl.minimum(b0 + blocks_per_split, N * blocks_per_image)
    for b in range(b0, b1):  # pixel block b: image b // blocks_per_image, never spanning two
        n = (b // blocks_per_image).to(tl.int64)
        p = (b % blocks_per_image) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < HW
        y = p // W
        x = p % W
        d = _weighted_difference(U, V, S, n, t, c, cm, p, pmask, y, x, Cin, H, W, HW, KS, DIL,
                                 inv_s2, SIM)
        g = tl.load(G + (n * Cout + o.to(tl.int64))[None, :] * HW + p[:, None],
                    mask=pmask[:, None] & om[None, :], other=0.0)
        acc = tl.dot(tl.trans(d.to(g.dtype)), g, acc, input_precision=DOT_PREC)
    tl.store(DWp + ((split * KK + t) * Cin + c.to(tl.int64))[:, None] * Cout + o[None, :], acc,
             mask=cm[:, None] & om[None, :])


@triton.jit
def _grad_input_kernel(U, V, S, Wt, G, DU, DV, GS, N, Cin, Cout, H, W, HW,
                       KS: tl.constexpr, DIL, inv_s2, SIM: tl.constexpr, DOT_PREC: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr):
    """dU (and the charbonnier dV) for a [BLOCK_P, BLOCK_C] tile by gathering from neighbours;
    for gaussian, GS[cblk, n, t, p] = sum_{c in block} dD(c,t,p) (U[c,p+d_t] - U[c,p])."""
    HALF: tl.constexpr = (KS - 1) // 2
    KK: tl.constexpr = KS * KS
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    q = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qm = q < HW
    y = q // W
    x = q % W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < Cin
    off = n * Cin * HW + c.to(tl.int64)[None, :] * HW
    m = qm[:, None] & cm[None, :]
    u_q = tl.load(U + off + q[:, None], mask=m, other=0.0).to(tl.float32)
    if SIM == 1:
        v_q = tl.load(V + off + q[:, None], mask=m, other=0.0).to(tl.float32)
    du = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    dv = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    g_base = G + n * Cout * HW
    for t in range(KK):
        dy = (t // KS - HALF) * DIL
        dx = (t % KS - HALF) * DIL
        # p = q + d: the neighbour that tap t of pixel q reads; r = q - d: the pixel whose tap t reads q.
        yp = y + dy
        xp = x + dx
        inp = qm & (yp >= 0) & (yp < H) & (xp >= 0) & (xp < W)
        qp = yp * W + xp
        yr = y - dy
        xr = x - dx
        inr = qm & (yr >= 0) & (yr < H) & (xr >= 0) & (xr < W)
        qr = yr * W + xr
        acc_q = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # dD(c, t, q)
        acc_r = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # dD(c, t, q - d)
        for o0 in range(0, Cout, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O)
            om = o < Cout
            go = o.to(tl.int64)[None, :] * HW
            g_q = tl.load(g_base + go + q[:, None], mask=qm[:, None] & om[None, :], other=0.0)
            g_r = tl.load(g_base + go + qr[:, None], mask=inr[:, None] & om[None, :], other=0.0)
            w = tl.load(Wt + (t * Cin + c.to(tl.int64))[None, :] * Cout + o[:, None],
                        mask=om[:, None] & cm[None, :], other=0.0)
            acc_q = tl.dot(g_q, w, acc_q, input_precision=DOT_PREC)
            acc_r = tl.dot(g_r, w, acc_r, input_precision=DOT_PREC)
        mp = inp[:, None] & cm[None, :]
        mr = inr[:, None] & cm[None, :]
        u_p = tl.load(U + off + qp[:, None], mask=mp, other=0.0).to(tl.float32)
        u_r = tl.load(U + off + qr[:, None], mask=mr, other=0.0).to(tl.float32)
        if SIM == 1:
            # centre term (p = q): S = (1 + e^2/s^2)^-1/2, e = V[q+d] - V[q]; dS/de = -S^3 e / s^2.
            e = tl.load(V + off + qp[:, None], mask=mp, other=0.0).to(tl.float32) - v_q
            s = 1.0 / tl.sqrt(1.0 + e * e * inv_s2)
            du -= acc_q * s
            dv += acc_q * (u_p - u_q) * s * s * s * e * inv_s2
            # shifted term (p = q - d, its neighbour is q): e = V[q] - V[q-d].
            e = v_q - tl.load(V + off + qr[:, None], mask=mr, other=0.0).to(tl.float32)
            s = 1.0 / tl.sqrt(1.0 + e * e * inv_s2)
            du += acc_r * s
            dv -= acc_r * (u_q - u_r) * s * s * s * e * inv_s2
        elif SIM == 2:
            s_q = tl.load(S + (n * KK + t) * HW + q, mask=qm, other=0.0)
            s_r = tl.load(S + (n * KK + t) * HW + qr, mask=inr, other=0.0)
            du += acc_r * s_r[:, None] - acc_q * s_q[:, None]
            gs = tl.sum(acc_q * (u_p - u_q), axis=1)
            tl.store(GS + ((pid_c * N + n) * KK + t) * HW + q, gs, mask=qm)
        else:
            du += acc_r - acc_q
    tl.store(DU + off + q[:, None], du.to(DU.dtype.element_ty), mask=m)
    if SIM == 1:
        tl.store(DV + off + q[:, None], dv.to(DV.dtype.element_ty), mask=m)


@triton.jit
def _grad_guidance_gaussian_kernel(V, S, GS, DV, Cg, H, W, HW, KS: tl.constexpr, DIL, coef,
                                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dV for gaussian: dd(c,p,t) = -G(p,t) S(p,t) (V[c,p+d]-V[c,p]) coef; dV[p] -= dd, dV[p+d] += dd."""
    HALF: tl.constexpr = (KS - 1) // 2
    KK: tl.constexpr = KS * KS
    pid_p = tl.program_id(0)
    n = tl.program_id(2).to(tl.int64)
    q = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qm = q < HW
    y = q // W
    x = q % W
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < Cg
    off = n * Cg * HW + c.to(tl.int64)[None, :] * HW
    m = qm[:, None] & cm[None, :]
    v_q = tl.load(V + off + q[:, None], mask=m, other=0.0).to(tl.float32)
    dv = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for t in range(KK):
        dy = (t // KS - HALF) * DIL
        dx = (t % KS - HALF) * DIL
        yp = y + dy
        xp = x + dx
        inp = qm & (yp >= 0) & (yp < H) & (xp >= 0) & (xp < W)
        yr = y - dy
        xr = x - dx
        inr = qm & (yr >= 0) & (yr < H) & (xr >= 0) & (xr < W)
        qr = yr * W + xr
        sg_q = (tl.load(S + (n * KK + t) * HW + q, mask=qm, other=0.0)
                * tl.load(GS + (n * KK + t) * HW + q, mask=qm, other=0.0))
        sg_r = (tl.load(S + (n * KK + t) * HW + qr, mask=inr, other=0.0)
                * tl.load(GS + (n * KK + t) * HW + qr, mask=inr, other=0.0))
        v_p = tl.load(V + off + (yp * W + xp)[:, None], mask=inp[:, None] & cm[None, :], other=0.0).to(tl.float32)
        v_r = tl.load(V + off + qr[:, None], mask=inr[:, None] & cm[None, :], other=0.0).to(tl.float32)
        dv += sg_q[:, None] * (v_p - v_q) * coef - sg_r[:, None] * (v_q - v_r) * coef
    tl.store(DV + off + q[:, None], dv.to(DV.dtype.element_ty), mask=m)


# ---- launchers --------------------------------------------------------------------------------

def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, v))))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: exact products (SPEC §3)


def _on_gpu(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _geometry(input, weight):
    n, cin, h, w = input.shape
    cout, _, k, _ = weight.shape
    return n, cin, cout, h, w, h * w, k


def _gaussian_similarity(guidance, k, dilation, sigma):
    n, cg, h, w = guidance.shape
    hw = h * w
    S = torch.empty((n, k * k, hw), device=guidance.device, dtype=torch.float32)
    bp = _pow2(hw, 16, 128)
    bc = _pow2(cg, 16, 32)
    _gaussian_similarity_kernel[(triton.cdiv(hw, bp), k * k, n)](
        guidance, S, cg, h, w, hw, k, dilation, -1.0 / (2.0 * sigma * sigma * cg),
        BLOCK_P=bp, BLOCK_C=bc)
    return S


def _tap_major(weight):
    """(Cout, Cin, k, k) -> (k*k, Cin, Cout) contiguous: the B operand, K-major per tap."""
    cout, cin, k, _ = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(k * k, cin, cout).contiguous()


def forward(input: torch.Tensor, guidance: torch.Tensor, weight: torch.Tensor,
            bias: Optional[torch.Tensor], dilation: int, similarity: str, sigma: float) -> torch.Tensor:
    n, cin, cout, h, w, hw, k = _geometry(input, weight)
    sim = _SIM[similarity]
    out = torch.empty((n, cout, h, w), device=input.device, dtype=input.dtype)
    if out.numel() == 0:
        return out
    S = _gaussian_similarity(guidance, k, dilation, sigma) if sim == SIM_GAUSSIAN else input
    gpu = _on_gpu(input)
    bp = _pow2(hw, 16, 128 if gpu else 64)
    bo = _pow2(cout, 16, 128 if gpu else 32)
    bc = _pow2(cin, 16, 32 if gpu else 16)
    grid = (triton.cdiv(hw, bp), triton.cdiv(cout, bo), n)
    _forward_kernel[grid](input, guidance, S, _tap_major(weight), bias if bias is not None else input,
                          out, cin, cout, h, w, hw, k, dilation, 1.0 / (sigma * sigma), SIM=sim,
                          HAS_BIAS=bias is not None, DOT_PREC=_dot_precision(input.dtype),
                          BLOCK_P=bp, BLOCK_C=bc, BLOCK_O=bo,
                          **({"num_warps": 8, "num_stages": 3} if gpu else {}))
    return out


def backward(grad_out: torch.Tensor, input: torch.Tensor, guidance: torch.Tensor,
             weight: torch.Tensor, dilation: int, similarity: str, sigma: float):
    n, cin, cout, h, w, hw, k = _geometry(input, weight)
    kk = k * k
    sim = _SIM[similarity]
    dev = input.device
    grad_bias = grad_out.sum((0, 2, 3), dtype=torch.float32).to(weight.dtype)
    if grad_out.numel() == 0 or input.numel() == 0:
        return (torch.zeros_like(input), torch.zeros_like(guidance), torch.zeros_like(weight),
                grad_bias)
    gpu = _on_gpu(input)
    prec = _dot_precision(input.dtype)
    inv_s2 = 1.0 / (sigma * sigma)
    S = _gaussian_similarity(guidance, k, dilation, sigma) if sim == SIM_GAUSSIAN else input
    wt = _tap_major(weight)

    # grad_weight: the N * ceil(HW / BLOCK_P) pixel blocks are split into chunks reduced by
    # separate programs into fp32 partials (deterministic), enough to fill the GPU.
    bp = _pow2(hw, 16, 64 if gpu else 64)
    bc = _pow2(cin, 16, 64 if gpu else 16)
    bo = _pow2(cout, 16, 128 if gpu else 32)
    blocks_per_image = triton.cdiv(hw, bp)
    nblocks = n * blocks_per_image
    tiles = kk * triton.cdiv(cin, bc) * triton.cdiv(cout, bo)
    splits = max(1, min(nblocks, (4 * _sm_count(dev)) // max(1, tiles))) if gpu else 1
    if _DW_SPLITS is not None:  # tests force the split-K path under the interpreter
        splits = max(1, min(nblocks, _DW_SPLITS))
    blocks_per_split = triton.cdiv(nblocks, splits)
    splits = triton.cdiv(nblocks, blocks_per_split)
    dwp = torch.empty((splits, kk, cin, cout), device=dev, dtype=torch.float32)
    _grad_weight_kernel[(kk * splits, triton.cdiv(cin, bc), triton.cdiv(cout, bo))](
        input, guidance, S, grad_out, dwp, n, cin, cout, h, w, hw, blocks_per_image,
        blocks_per_split, k, dilation, inv_s2, SIM=sim, DOT_PREC=prec, BLOCK_P=bp, BLOCK_C=bc,
        BLOCK_O=bo, **({"num_warps": 8, "num_stages": 3} if gpu else {}))
    grad_weight = dwp.sum(0).view(k, k, cin, cout).permute(3, 2, 0, 1).to(weight.dtype).contiguous()

    # grad_input (+ charbonnier grad_guidance, + gaussian dL/dS partials); four [BLOCK_P, BLOCK_C]
    # fp32 tiles live across the loop (du, dv, and the two dD accumulators): keep them small.
    bp = _pow2(hw, 16, 64 if gpu else 64)
    bc = _pow2(cin, 16, 32 if gpu else 16)
    bo = _pow2(cout, 16, 64 if gpu else 32)
    ncb = triton.cdiv(cin, bc)
    grad_input = torch.empty_like(input)
    grad_guidance = torch.empty_like(guidance) if sim == SIM_CHARBONNIER else torch.zeros_like(guidance)
    gs = (torch.empty((ncb, n, kk, hw), device=dev, dtype=torch.float32) if sim == SIM_GAUSSIAN
          else input)
    _grad_input_kernel[(triton.cdiv(hw, bp), ncb, n)](
        input, guidance, S, wt, grad_out, grad_input, grad_guidance, gs, n, cin, cout, h, w, hw,
        k, dilation, inv_s2, SIM=sim, DOT_PREC=prec, BLOCK_P=bp, BLOCK_C=bc, BLOCK_O=bo,
        **({"num_warps": 8, "num_stages": 2} if gpu else {}))
    if sim == SIM_GAUSSIAN:
        gsum = gs.sum(0)
        cg = guidance.shape[1]
        bpg = _pow2(hw, 16, 64 if gpu else 64)
        bcg = _pow2(cg, 16, 32 if gpu else 16)
        _grad_guidance_gaussian_kernel[(triton.cdiv(hw, bpg), triton.cdiv(cg, bcg), n)](
            guidance, S, gsum, grad_guidance, cg, h, w, hw, k, dilation,
            1.0 / (sigma * sigma * cg), BLOCK_P=bpg, BLOCK_C=bcg)
    return grad_input, grad_guidance, grad_weight, grad_bias
