"""Interlaced sparse self-attention (SPEC §2.2): Triton forward and backward kernels + launchers.

Flash-attention style, straight on the (N, C, H, W) layout: a program owns a tile of one group's
members (one sample, one group) and reads the group's pixels in place by index arithmetic
(`group_member_offset`), so there is no permuted copy and no attention matrix in global memory.
Forward: online softmax over key tiles (exp2 domain), the per-position log-sum-exp saved (fp32).
Backward: delta = <dO, O> per position, then separate dQ, dK and dV kernels that recompute the
probabilities from the saved lse. Each program also owns one chunk of its output channels (so
Ck, Cv up to 512 fit in registers); the logits are rebuilt per chunk by looping over channels.

Tensors in, tensors out; no registration here (segops/ops/interlaced_sparse_attention.py does it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from segops.triton import _interpreter_compat  # noqa: F401  (numpy>=2.3 under TRITON_INTERPRET)

LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------ group mapping
@triton.jit
def group_member_offset(g, m, W, GW, PH, PW, LONG: tl.constexpr):
    """Pixel offset y * W + x (int64) of member(s) `m` of group `g` for block size (PH, PW).

    The map is a (H/PH) x (W/PW) lattice of PH x PW blocks, y = gy * PH + ly, x = gx * PW + lx,
    GW = W / PW. LONG: group g = (ly, lx) = (g // PW, g % PW), members (gy, gx) row-major over the
    lattice (ISA's long-range groups, stride (PH, PW)). Short: group g = (gy, gx) = (g // GW,
    g % GW), members (ly, lx) row-major inside the block (windows: ISA short-range, Swin, ...).
    """
    if LONG:
        ly = g // PW
        lx = g % PW
        gy = m // GW
        gx = m % GW
    else:
        gy = g // GW
        gx = g % GW
        ly = m // PW
        lx = m % PW
    return (gy * PH + ly).to(tl.int64) * W + (gx * PW + lx)


def group_counts(h: int, w: int, ph: int, pw: int, long: bool) -> tuple[int, int]:
    """(number of groups, members per group) of an H x W map (host side of the mapping)."""
    inner, outer = ph * pw, (h // ph) * (w // pw)
    return (inner, outer) if long else (outer, inner)


# ------------------------------------------------------------------------------ tile helpers
@triton.jit
def _load_tile(base, pix, offs_c, mask_p, mask_c, HW, CHANNEL_MAJOR: tl.constexpr):
    """A (positions x channels) tile, or (channels x positions) when CHANNEL_MAJOR."""
    if CHANNEL_MAJOR:
        ptr = base + offs_c.to(tl.int64)[:, None] * HW + pix[None, :]
        return tl.load(ptr, mask=mask_c[:, None] & mask_p[None, :], other=0.0)
    ptr = base + offs_c.to(tl.int64)[None, :] * HW + pix[:, None]
    return tl.load(ptr, mask=mask_p[:, None] & mask_c[None, :], other=0.0)


@triton.jit
def _logits(a_base, b_base, pix_a, pix_b, mask_a, mask_b, C, HW,
            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
            PREC: tl.constexpr):
    """sum_c a[c, pix_a] * b[c, pix_b] -> (BLOCK_A, BLOCK_B) fp32, looping over C in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, C, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < C
        a = _load_tile(a_base, pix_a, offs_d, mask_a, mask_d, HW, False)
        b = _load_tile(b_base, pix_b, offs_d, mask_b, mask_d, HW, True)
        acc += tl.dot(a, b, input_precision=PREC)
    return acc


# ------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CK, CV, HW, W, GW, PH, PW, L, G, qk_scale,
                LONG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
    pid_ng = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_c = tl.program_id(2)
    n = (pid_ng // G).to(tl.int64)
    g = pid_ng % G
    q_base = Q + n * CK * HW
    k_base = K + n * CK * HW
    v_base = V + n * CV * HW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < L
    pix_m = group_member_offset(g, offs_m, W, GW, PH, PW, LONG)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < CV

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < L
        pix_n = group_member_offset(g, offs_n, W, GW, PH, PW, LONG)
        s = _logits(q_base, k_base, pix_m, pix_n, mask_m, mask_n, CK, HW,
                    BLOCK_M, BLOCK_N, BLOCK_D, PREC) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, pix_n, offs_c, mask_n, mask_c, HW, False)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptr = O + n * CV * HW + offs_c.to(tl.int64)[None, :] * HW + pix_m[:, None]
    tl.store(o_ptr, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])
    if pid_c == 0:
        tl.store(LSE + n * HW + pix_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_m)


# ------------------------------------------------------------------------------ backward
@triton.jit
def _delta_kernel(O, DO, DELTA, CV, HW, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """delta[n, p] = sum_c dO[n, c, p] * O[n, c, p] (fp32)."""
    n = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, CV, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        ptr = n * CV * HW + offs_c.to(tl.int64)[:, None] * HW + offs_p[None, :]
        mask = (offs_c < CV)[:, None] & mask_p[None, :]
        o = tl.load(O + ptr, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + ptr, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(o * do, 0)
    tl.store(DELTA + n * HW + offs_p, acc, mask=mask_p)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CK, CV, HW, W, GW, PH, PW, L, G, scale,
                   LONG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
    """dQ[:, i] = scale * sum_j P_ij (dP_ij - delta_i) K[:, j], for one chunk of Ck."""
    pid_ng = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_c = tl.program_id(2)
    n = (pid_ng // G).to(tl.int64)
    g = pid_ng % G
    q_base = Q + n * CK * HW
    k_base = K + n * CK * HW
    v_base = V + n * CV * HW
    do_base = DO + n * CV * HW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < L
    pix_m = group_member_offset(g, offs_m, W, GW, PH, PW, LONG)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < CK
    lse2 = tl.load(LSE + n * HW + pix_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + n * HW + pix_m, mask=mask_m, other=0.0)
    qk_scale = scale * 1.4426950408889634

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < L
        pix_n = group_member_offset(g, offs_n, W, GW, PH, PW, LONG)
        s = _logits(q_base, k_base, pix_m, pix_n, mask_m, mask_n, CK, HW,
                    BLOCK_M, BLOCK_N, BLOCK_D, PREC)
        p = tl.where(mask_n[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        dp = _logits(do_base, v_base, pix_m, pix_n, mask_m, mask_n, CV, HW,
                     BLOCK_M, BLOCK_N, BLOCK_D, PREC)
        ds = p * (dp - delta[:, None])
        k = _load_tile(k_base, pix_n, offs_c, mask_n, mask_c, HW, False)
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    acc = acc * scale
    ptr = DQ + n * CK * HW + offs_c.to(tl.int64)[None, :] * HW + pix_m[:, None]
    tl.store(ptr, acc.to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


@triton.jit
def _bwd_dk_kernel(Q, K, V, DO, LSE, DELTA, DK, CK, CV, HW, W, GW, PH, PW, L, G, scale,
                   LONG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
    """dK[:, j] = scale * sum_i P_ij (dP_ij - delta_i) Q[:, i], for one chunk of Ck (transposed tiles)."""
    pid_ng = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_c = tl.program_id(2)
    n = (pid_ng // G).to(tl.int64)
    g = pid_ng % G
    q_base = Q + n * CK * HW
    k_base = K + n * CK * HW
    v_base = V + n * CV * HW
    do_base = DO + n * CV * HW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < L
    pix_n = group_member_offset(g, offs_n, W, GW, PH, PW, LONG)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < CK
    qk_scale = scale * 1.4426950408889634

    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < L
        pix_m = group_member_offset(g, offs_m, W, GW, PH, PW, LONG)
        lse2 = tl.load(LSE + n * HW + pix_m, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + n * HW + pix_m, mask=mask_m, other=0.0)
        st = _logits(k_base, q_base, pix_n, pix_m, mask_n, mask_m, CK, HW,
                     BLOCK_N, BLOCK_M, BLOCK_D, PREC)
        pt = tl.where(mask_m[None, :], tl.exp2(st * qk_scale - lse2[None, :]), 0.0)
        dpt = _logits(v_base, do_base, pix_n, pix_m, mask_n, mask_m, CV, HW,
                      BLOCK_N, BLOCK_M, BLOCK_D, PREC)
        dst = pt * (dpt - delta[None, :])
        q = _load_tile(q_base, pix_m, offs_c, mask_m, mask_c, HW, False)
        acc += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    acc = acc * scale
    ptr = DK + n * CK * HW + offs_c.to(tl.int64)[None, :] * HW + pix_n[:, None]
    tl.store(ptr, acc.to(DK.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _bwd_dv_kernel(Q, K, DO, LSE, DV, CK, CV, HW, W, GW, PH, PW, L, G, scale,
                   LONG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
    """dV[:, j] = sum_i P_ij dO[:, i], for one chunk of Cv."""
    pid_ng = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_c = tl.program_id(2)
    n = (pid_ng // G).to(tl.int64)
    g = pid_ng % G
    q_base = Q + n * CK * HW
    k_base = K + n * CK * HW
    do_base = DO + n * CV * HW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < L
    pix_n = group_member_offset(g, offs_n, W, GW, PH, PW, LONG)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < CV
    qk_scale = scale * 1.4426950408889634

    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < L
        pix_m = group_member_offset(g, offs_m, W, GW, PH, PW, LONG)
        lse2 = tl.load(LSE + n * HW + pix_m, mask=mask_m, other=0.0) * 1.4426950408889634
        st = _logits(k_base, q_base, pix_n, pix_m, mask_n, mask_m, CK, HW,
                     BLOCK_N, BLOCK_M, BLOCK_D, PREC)
        pt = tl.where(mask_m[None, :], tl.exp2(st * qk_scale - lse2[None, :]), 0.0)
        do = _load_tile(do_base, pix_m, offs_c, mask_m, mask_c, HW, False)
        acc += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
    ptr = DV + n * CV * HW + offs_c.to(tl.int64)[None, :] * HW + pix_n[:, None]
    tl.store(ptr, acc.to(DV.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


# ------------------------------------------------------------------------------ launchers
def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def _config(L: int, ck: int, cv: int, dtype: torch.dtype):
    block_mn = _pow2(L, 16, 64)
    block_d = _pow2(min(ck, cv), 16, 64)
    prec = "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 products
    return block_mn, block_d, prec


def _geometry(query, ph, pw, long):
    n, ck, h, w = query.shape
    groups, members = group_counts(h, w, ph, pw, long)
    return n, ck, h, w, groups, members


def forward(query, key, value, ph: int, pw: int, long: bool, scale: float):
    """-> (out (N, Cv, H, W), lse (N, H, W) fp32, natural log of the scaled-logit sums)."""
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    n, ck, h, w, groups, L = _geometry(q, ph, pw, long)
    cv = v.shape[1]
    out = torch.empty((n, cv, h, w), device=v.device, dtype=v.dtype)
    lse = torch.empty((n, h, w), device=q.device, dtype=torch.float32)
    if out.numel() == 0 or lse.numel() == 0:
        return out, lse
    block_mn, block_d, prec = _config(L, ck, cv, q.dtype)
    block_c = _pow2(cv, 16, 128)
    grid = (n * groups, triton.cdiv(L, block_mn), triton.cdiv(cv, block_c))
    _fwd_kernel[grid](q, k, v, out, lse, ck, cv, h * w, w, w // pw, ph, pw, L, groups,
                      float(scale) * LOG2E, LONG=bool(long), BLOCK_M=block_mn, BLOCK_N=block_mn,
                      BLOCK_D=block_d, BLOCK_C=block_c, PREC=prec, num_warps=4, num_stages=2)
    return out, lse


def backward(grad_out, query, key, value, out, lse, ph: int, pw: int, long: bool, scale: float):
    """-> (dquery, dkey, dvalue), recomputing the probabilities from `lse`."""
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    do, o, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    n, ck, h, w, groups, L = _geometry(q, ph, pw, long)
    cv = v.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    hw = h * w
    delta = torch.empty((n, h, w), device=q.device, dtype=torch.float32)
    block_p = 128
    _delta_kernel[(n, triton.cdiv(hw, block_p))](o, do, delta, cv, hw, BLOCK_P=block_p,
                                                 BLOCK_C=_pow2(cv, 1, 32))
    block_mn, block_d, prec = _config(L, ck, cv, q.dtype)
    geo = (hw, w, w // pw, ph, pw, L, groups, float(scale))
    tiles = triton.cdiv(L, block_mn)
    blocks = dict(LONG=bool(long), BLOCK_M=block_mn, BLOCK_N=block_mn, BLOCK_D=block_d, PREC=prec,
                  num_warps=4, num_stages=2)
    bck, bcv = _pow2(ck, 16, 64), _pow2(cv, 16, 128)
    _bwd_dq_kernel[(n * groups, tiles, triton.cdiv(ck, bck))](
        q, k, v, do, lse, delta, dq, ck, cv, *geo, BLOCK_C=bck, **blocks)
    _bwd_dk_kernel[(n * groups, tiles, triton.cdiv(ck, bck))](
        q, k, v, do, lse, delta, dk, ck, cv, *geo, BLOCK_C=bck, **blocks)
    _bwd_dv_kernel[(n * groups, tiles, triton.cdiv(cv, bcv))](
        q, k, do, lse, dv, ck, cv, *geo, BLOCK_C=bcv, **blocks)
    return dq, dk, dv


__all__ = ["forward", "backward", "group_member_offset", "group_counts"]
