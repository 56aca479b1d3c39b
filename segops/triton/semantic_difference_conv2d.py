"""Triton kernels for semantic difference convolution (SDN, docs/operators.md §2.4): tensors in, tensors out.

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

from typing import Optional

import torch
import triton
import triton.language as tl

from segops.triton._common import Target, dot_precision, pow2_clamp, register_tiles, target_of

SIM_NONE, SIM_CHARBONNIER, SIM_GAUSSIAN = 0, 1, 2
_SIM = {"none": SIM_NONE, "charbonnier": SIM_CHARBONNIER, "gaussian": SIM_GAUSSIAN}
_DW_SPLITS = None  # override of the grad_weight split count (tests only)


@triton.jit
def _pixel_block(block, HW, W, BLOCK_P: tl.constexpr):
    """Flat pixels of pixel block `block`, their mask and their (y, x)."""
    p = block * BLOCK_P + tl.arange(0, BLOCK_P)
    return p, p < HW, p // W, p % W


@triton.jit
def _tap_offset(t, KS: tl.constexpr, DIL):
    """(dy, dx) of tap t of a KS x KS kernel with dilation DIL."""
    HALF: tl.constexpr = (KS - 1) // 2
    return (t // KS - HALF) * DIL, (t % KS - HALF) * DIL


@triton.jit
def _shifted(y, x, mask, dy, dx, H, W):
    """Pixels (y + dy, x + dx): where they are masked in and inside the image, and flat offsets."""
    yy = y + dy
    xx = x + dx
    return mask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W), yy * W + xx


@triton.jit
def _gather(X, off, pix, mask_pix, mask_c):
    """(pixels x channels) fp32 tile X[off + c * HW + pix] (off carries the channel offsets)."""
    return tl.load(X + off + pix[:, None], mask=mask_pix[:, None] & mask_c[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _gaussian_similarity_kernel(V, S, Cg, H, W, HW, KS: tl.constexpr, DIL, scale,
                                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """S[n, t, p] = exp(scale * sum_c (V[c, p+d_t] - V[c, p])^2), fp32."""
    t = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    p, pmask, y, x = _pixel_block(tl.program_id(0), HW, W, BLOCK_P)
    dy, dx = _tap_offset(t, KS, DIL)
    inb, q = _shifted(y, x, pmask, dy, dx, H, W)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, Cg, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < Cg
        off = n * Cg * HW + c.to(tl.int64)[None, :] * HW
        e = _gather(V, off, q, inb, cm) - _gather(V, off, p, pmask, cm)
        acc += tl.sum(e * e, axis=1)
    tl.store(S + (n * KS * KS + t) * HW + p, tl.exp(acc * scale), mask=pmask)


@triton.jit
def _weighted_difference(U, V, S, n, t, c, cm, p, pmask, y, x, Cin, H, W, HW,
                         KS: tl.constexpr, DIL, inv_s2, SIM: tl.constexpr):
    """[BLOCK_P, BLOCK_C] tile of S(c,p,t) * (U[c,p+d_t] - U[c,p]), fp32, zero off the tile."""
    dy, dx = _tap_offset(t, KS, DIL)
    inb, q = _shifted(y, x, pmask, dy, dx, H, W)
    off = n * Cin * HW + c.to(tl.int64)[None, :] * HW
    d = _gather(U, off, q, inb, cm) - _gather(U, off, p, pmask, cm)
    if SIM == 1:  # charbonnier, Cg == Cin
        e = _gather(V, off, q, inb, cm) - _gather(V, off, p, pmask, cm)
        d = d / tl.sqrt(1.0 + e * e * inv_s2)
    elif SIM == 2:  # gaussian: one scalar per (pixel, tap)
        s = tl.load(S + (n * KS * KS + t) * HW + p, mask=pmask, other=0.0)
        d = d * s[:, None]
    return d


@triton.jit
def _forward_kernel(U, V, S, Wt, B, Y, Cin, Cout, H, W, HW, KS: tl.constexpr, DIL, inv_s2,
                    SIM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr):
    n = tl.program_id(2).to(tl.int64)
    p, pmask, y, x = _pixel_block(tl.program_id(0), HW, W, BLOCK_P)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
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
        p, pmask, y, x = _pixel_block(b % blocks_per_image, HW, W, BLOCK_P)
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
    KK: tl.constexpr = KS * KS
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    q, qm, y, x = _pixel_block(tl.program_id(0), HW, W, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < Cin
    off = n * Cin * HW + c.to(tl.int64)[None, :] * HW
    m = qm[:, None] & cm[None, :]
    u_q = _gather(U, off, q, qm, cm)
    if SIM == 1:
        v_q = _gather(V, off, q, qm, cm)
    du = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    dv = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    g_base = G + n * Cout * HW
    for t in range(KK):
        dy, dx = _tap_offset(t, KS, DIL)
        # p = q + d: the neighbour that tap t of pixel q reads; r = q - d: the pixel whose tap t reads q.
        inp, qp = _shifted(y, x, qm, dy, dx, H, W)
        inr, qr = _shifted(y, x, qm, -dy, -dx, H, W)
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
        u_p = _gather(U, off, qp, inp, cm)
        u_r = _gather(U, off, qr, inr, cm)
        if SIM == 1:
            # centre term (p = q): S = (1 + e^2/s^2)^-1/2, e = V[q+d] - V[q]; dS/de = -S^3 e / s^2.
            e = _gather(V, off, qp, inp, cm) - v_q
            s = 1.0 / tl.sqrt(1.0 + e * e * inv_s2)
            du -= acc_q * s
            dv += acc_q * (u_p - u_q) * s * s * s * e * inv_s2
            # shifted term (p = q - d, its neighbour is q): e = V[q] - V[q-d].
            e = v_q - _gather(V, off, qr, inr, cm)
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
    KK: tl.constexpr = KS * KS
    n = tl.program_id(2).to(tl.int64)
    q, qm, y, x = _pixel_block(tl.program_id(0), HW, W, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < Cg
    off = n * Cg * HW + c.to(tl.int64)[None, :] * HW
    v_q = _gather(V, off, q, qm, cm)
    dv = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for t in range(KK):
        dy, dx = _tap_offset(t, KS, DIL)
        inp, qp = _shifted(y, x, qm, dy, dx, H, W)
        inr, qr = _shifted(y, x, qm, -dy, -dx, H, W)
        sg_q = (tl.load(S + (n * KK + t) * HW + q, mask=qm, other=0.0)
                * tl.load(GS + (n * KK + t) * HW + q, mask=qm, other=0.0))
        sg_r = (tl.load(S + (n * KK + t) * HW + qr, mask=inr, other=0.0)
                * tl.load(GS + (n * KK + t) * HW + qr, mask=inr, other=0.0))
        v_p = _gather(V, off, qp, inp, cm)
        v_r = _gather(V, off, qr, inr, cm)
        dv += sg_q[:, None] * (v_p - v_q) * coef - sg_r[:, None] * (v_q - v_r) * coef
    tl.store(DV + off + q[:, None], dv.to(DV.dtype.element_ty), mask=qm[:, None] & cm[None, :])


# ---- launchers --------------------------------------------------------------------------------

def config(cin: int, cout: int, cg: int, hw: int, dtype: torch.dtype, target: Target) -> dict:
    """Tiles and launch options of every kernel ("similarity", "forward", "grad_weight",
    "grad_input", "grad_guidance") for Cin -> Cout channels, Cg guidance channels and HW pixels.
    grad_input keeps four [BLOCK_P, BLOCK_C] fp32 tiles live across its loop (du, dv and the
    two dD accumulators): small tiles there. fp32 on a GPU halves the GEMM tiles and drops the
    software pipelining (fp32 tl.dot holds its operands in registers; the 16-bit tiles spilled
    36-940 B in fp32 and took 176 KB of shared memory, over sm_80's limit,
    scripts/check_triton_compile.py)."""
    kind = register_tiles(dtype, target)
    fwd, dw, di, guide = dict(interpreter=((64, 16, 32), (64, 16, 32), (64, 16, 32), (64, 16)),
                              fp32=((64, 16, 64), (64, 32, 64), (64, 16, 32), (64, 32)),
                              mma=((128, 32, 128), (64, 64, 128), (64, 32, 64), (64, 32)),
                              wgmma=((128, 32, 128), (64, 64, 128), (64, 32, 64), (64, 32)))[kind]

    def tiles(p, c, channels, o=None):
        out = dict(BLOCK_P=pow2_clamp(hw, 16, p), BLOCK_C=pow2_clamp(channels, 16, c))
        if o is not None:
            out["BLOCK_O"] = pow2_clamp(cout, 16, o)
        return out
    gemm = target.launch(8, 1 if kind == "fp32" else 3)
    return dict(similarity=dict(tiles(128, 32, cg), **target.launch(4, 3)),
                forward=dict(tiles(fwd[0], fwd[1], cin, fwd[2]), **gemm),
                grad_weight=dict(tiles(dw[0], dw[1], cin, dw[2]), **gemm),
                grad_input=dict(tiles(di[0], di[1], cin, di[2]),
                                **target.launch(8, 1 if kind == "fp32" else 2)),
                grad_guidance=dict(tiles(guide[0], guide[1], cg), **target.launch(4, 3)))


def _geometry(input, weight):
    n, cin, h, w = input.shape
    cout, _, k, _ = weight.shape
    return n, cin, cout, h, w, h * w, k


def _gaussian_similarity(guidance, k, dilation, sigma):
    n, cg, h, w = guidance.shape
    hw = h * w
    S = torch.empty((n, k * k, hw), device=guidance.device, dtype=torch.float32)
    cfg = config(cg, cg, cg, hw, guidance.dtype, target_of(guidance))["similarity"]
    _gaussian_similarity_kernel[(triton.cdiv(hw, cfg["BLOCK_P"]), k * k, n)](
        guidance, S, cg, h, w, hw, k, dilation, -1.0 / (2.0 * sigma * sigma * cg), **cfg)
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
    cfg = config(cin, cout, guidance.shape[1], hw, input.dtype, target_of(input))["forward"]
    grid = (triton.cdiv(hw, cfg["BLOCK_P"]), triton.cdiv(cout, cfg["BLOCK_O"]), n)
    _forward_kernel[grid](input, guidance, S, _tap_major(weight), bias if bias is not None else input,
                          out, cin, cout, h, w, hw, k, dilation, 1.0 / (sigma * sigma), SIM=sim,
                          HAS_BIAS=bias is not None, DOT_PREC=dot_precision(input.dtype), **cfg)
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
    target = target_of(input)
    cfgs = config(cin, cout, guidance.shape[1], hw, input.dtype, target)
    prec = dot_precision(input.dtype)
    inv_s2 = 1.0 / (sigma * sigma)
    S = _gaussian_similarity(guidance, k, dilation, sigma) if sim == SIM_GAUSSIAN else input
    wt = _tap_major(weight)

    # grad_weight: the N * ceil(HW / BLOCK_P) pixel blocks are split into chunks reduced by
    # separate programs into fp32 partials (deterministic), enough to fill the GPU.
    cfg = cfgs["grad_weight"]
    blocks_per_image = triton.cdiv(hw, cfg["BLOCK_P"])
    nblocks = n * blocks_per_image
    tiles = kk * triton.cdiv(cin, cfg["BLOCK_C"]) * triton.cdiv(cout, cfg["BLOCK_O"])
    splits = max(1, min(nblocks, (4 * target.sm_count) // max(1, tiles))) if target.gpu else 1
    if _DW_SPLITS is not None:  # tests force the split-K path under the interpreter
        splits = max(1, min(nblocks, _DW_SPLITS))
    blocks_per_split = triton.cdiv(nblocks, splits)
    splits = triton.cdiv(nblocks, blocks_per_split)
    dwp = torch.empty((splits, kk, cin, cout), device=dev, dtype=torch.float32)
    _grad_weight_kernel[(kk * splits, triton.cdiv(cin, cfg["BLOCK_C"]),
                         triton.cdiv(cout, cfg["BLOCK_O"]))](
        input, guidance, S, grad_out, dwp, n, cin, cout, h, w, hw, blocks_per_image,
        blocks_per_split, k, dilation, inv_s2, SIM=sim, DOT_PREC=prec, **cfg)
    grad_weight = dwp.sum(0).view(k, k, cin, cout).permute(3, 2, 0, 1).to(weight.dtype).contiguous()

    # grad_input (+ charbonnier grad_guidance, + gaussian dL/dS partials)
    cfg = cfgs["grad_input"]
    ncb = triton.cdiv(cin, cfg["BLOCK_C"])
    grad_input = torch.empty_like(input)
    grad_guidance = torch.empty_like(guidance) if sim == SIM_CHARBONNIER else torch.zeros_like(guidance)
    gs = (torch.empty((ncb, n, kk, hw), device=dev, dtype=torch.float32) if sim == SIM_GAUSSIAN
          else input)
    _grad_input_kernel[(triton.cdiv(hw, cfg["BLOCK_P"]), ncb, n)](
        input, guidance, S, wt, grad_out, grad_input, grad_guidance, gs, n, cin, cout, h, w, hw,
        k, dilation, inv_s2, SIM=sim, DOT_PREC=prec, **cfg)
    if sim == SIM_GAUSSIAN:
        gsum = gs.sum(0)
        cg = guidance.shape[1]
        cfg = cfgs["grad_guidance"]
        _grad_guidance_gaussian_kernel[(triton.cdiv(hw, cfg["BLOCK_P"]),
                                        triton.cdiv(cg, cfg["BLOCK_C"]), n)](
            guidance, S, gsum, grad_guidance, cg, h, w, hw, k, dilation,
            1.0 / (sigma * sigma * cg), **cfg)
    return grad_input, grad_guidance, grad_weight, grad_bias
