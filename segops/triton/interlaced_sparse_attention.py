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
def _rows(pid, start, NG, G, L, CK, CV, HW, W, GW, PH, PW,
          BLOCK: tl.constexpr, LP: tl.constexpr, PACKED: tl.constexpr, LONG: tl.constexpr):
    """The BLOCK (sample, group, member) rows of a tile and their element offsets.

    Not PACKED: one group (flat index n * G + g = pid), members start .. start + BLOCK.
    PACKED (small groups, LP = next_pow2(L) <= BLOCK / 2): BLOCK // LP whole groups per tile,
    row r -> group pid * (BLOCK // LP) + r // LP, member r % LP.
    Returns (flat group index per row, validity, offsets into a Ck-channel tensor at channel 0,
    offsets into a Cv-channel tensor at channel 0).
    """
    r = tl.arange(0, BLOCK)
    if PACKED:
        ng = pid * (BLOCK // LP) + r // LP
        m = r % LP
    else:
        ng = pid + r * 0
        m = start + r
    valid = (m < L) & (ng < NG)
    n = (ng // G).to(tl.int64)
    pix = group_member_offset(ng % G, m, W, GW, PH, PW, LONG)
    return ng, valid, n * CK * HW + pix, n * CV * HW + pix


@triton.jit
def _load_tile(base, rows, offs_c, mask_r, mask_c, HW, CHANNEL_MAJOR: tl.constexpr):
    """A (rows x channels) tile, or (channels x rows) when CHANNEL_MAJOR."""
    if CHANNEL_MAJOR:
        ptr = base + offs_c.to(tl.int64)[:, None] * HW + rows[None, :]
        return tl.load(ptr, mask=mask_c[:, None] & mask_r[None, :], other=0.0)
    ptr = base + offs_c.to(tl.int64)[None, :] * HW + rows[:, None]
    return tl.load(ptr, mask=mask_r[:, None] & mask_c[None, :], other=0.0)


@triton.jit
def _store_tile(base, rows, offs_c, mask_r, mask_c, HW, val):
    ptr = base + offs_c.to(tl.int64)[None, :] * HW + rows[:, None]
    tl.store(ptr, val.to(base.dtype.element_ty), mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def _logits(A, B, rows_a, rows_b, mask_a, mask_b, C, HW,
            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
            PREC: tl.constexpr):
    """sum_c A[c, rows_a] * B[c, rows_b] -> (BLOCK_A, BLOCK_B) fp32, over C in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, C, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < C
        a = _load_tile(A, rows_a, offs_d, mask_a, mask_d, HW, False)
        b = _load_tile(B, rows_b, offs_d, mask_b, mask_d, HW, True)
        acc += tl.dot(a, b, input_precision=PREC)
    return acc


@triton.jit
def _pair_mask(ng_a, valid_a, ng_b, valid_b, PACKED: tl.constexpr):
    """Which (row a, row b) pairs attend: both valid, and in PACKED tiles in the same group."""
    valid = valid_a[:, None] & valid_b[None, :]
    if PACKED:
        return valid & (ng_a[:, None] == ng_b[None, :])
    return valid


# ------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, NG, G, L, CK, CV, HW, W, GW, PH, PW, NT, qk_scale,
                LONG: tl.constexpr, PACKED: tl.constexpr, LP: tl.constexpr,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                PREC: tl.constexpr):
    pid_g = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_c = tl.program_id(2)
    ng_m, mask_m, qrow, vrow = _rows(pid_g, pid_m * BLOCK, NG, G, L, CK, CV, HW, W, GW, PH, PW,
                                     BLOCK, LP, PACKED, LONG)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < CV

    m_i = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK,), dtype=tl.float32)
    acc = tl.zeros((BLOCK, BLOCK_C), dtype=tl.float32)
    for t in range(0, NT):  # key tiles (1 when PACKED: the tile's own groups)
        ng_n, mask_n, krow, vrow_n = _rows(pid_g, t * BLOCK, NG, G, L, CK, CV, HW, W, GW, PH, PW,
                                           BLOCK, LP, PACKED, LONG)
        s = _logits(Q, K, qrow, krow, mask_m, mask_n, CK, HW, BLOCK, BLOCK, BLOCK_D, PREC) * qk_scale
        s = tl.where(_pair_mask(ng_m, mask_m, ng_n, mask_n, PACKED), s, float("-inf"))
        m_new = tl.maximum(tl.maximum(m_i, tl.max(s, 1)), -1e30)  # rows with no key stay finite
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V, vrow_n, offs_c, mask_n, mask_c, HW, False)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(mask_m, l_i, 1.0)
    _store_tile(O, vrow, offs_c, mask_m, mask_c, HW, acc / l_safe[:, None])
    if pid_c == 0:
        # Natural-log lse of the scaled logits, stored at (n, y, x) = vrow's pixel: the LSE
        # tensor is (N, H, W), so its row offset is the Ck = 1 offset.
        lse_row = (qrow // HW // CK) * HW + qrow % HW
        tl.store(LSE + lse_row, (m_i + tl.log2(l_safe)) * 0.6931471805599453, mask=mask_m)


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
def _stats(LSE, DELTA, qrow, mask, CK, HW):
    """(lse in log2 units, delta) of query rows."""
    row = (qrow // HW // CK) * HW + qrow % HW
    lse2 = tl.load(LSE + row, mask=mask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=mask, other=0.0)
    return lse2, delta


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, NG, G, L, CK, CV, HW, W, GW, PH, PW, NT, scale,
                   LONG: tl.constexpr, PACKED: tl.constexpr, LP: tl.constexpr,
                   BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                   PREC: tl.constexpr):
    """dQ[:, i] = scale * sum_j P_ij (dP_ij - delta_i) K[:, j], for one chunk of Ck."""
    pid_g = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_c = tl.program_id(2)
    ng_m, mask_m, qrow, vrow = _rows(pid_g, pid_m * BLOCK, NG, G, L, CK, CV, HW, W, GW, PH, PW,
                                     BLOCK, LP, PACKED, LONG)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < CK
    lse2, delta = _stats(LSE, DELTA, qrow, mask_m, CK, HW)
    qk_scale = scale * 1.4426950408889634

    acc = tl.zeros((BLOCK, BLOCK_C), dtype=tl.float32)
    for t in range(0, NT):
        ng_n, mask_n, krow, vrow_n = _rows(pid_g, t * BLOCK, NG, G, L, CK, CV, HW, W, GW, PH, PW,
                                           BLOCK, LP, PACKED, LONG)
        s = _logits(Q, K, qrow, krow, mask_m, mask_n, CK, HW, BLOCK, BLOCK, BLOCK_D, PREC)
        p = tl.exp2(tl.where(_pair_mask(ng_m, mask_m, ng_n, mask_n, PACKED), s * qk_scale - lse2[:, None],
                             float("-inf")))
        dp = _logits(DO, V, vrow, vrow_n, mask_m, mask_n, CV, HW, BLOCK, BLOCK, BLOCK_D, PREC)
        ds = p * (dp - delta[:, None])
        k = _load_tile(K, krow, offs_c, mask_n, mask_c, HW, False)
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    _store_tile(DQ, qrow, offs_c, mask_m, mask_c, HW, acc * scale)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DKV, NG, G, L, CK, CV, HW, W, GW, PH, PW, NT, scale,
                     LONG: tl.constexpr, PACKED: tl.constexpr, LP: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                     PREC: tl.constexpr, DV: tl.constexpr):
    """One chunk of dK (DV=False) or dV (DV=True) for a tile of keys (transposed tiles):
    dK[:, j] = scale * sum_i P_ij (dP_ij - delta_i) Q[:, i];  dV[:, j] = sum_i P_ij dO[:, i]."""
    pid_g = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_c = tl.program_id(2)
    ng_n, mask_n, krow, vrow_n = _rows(pid_g, pid_n * BLOCK, NG, G, L, CK, CV, HW, W, GW, PH, PW,
                                       BLOCK, LP, PACKED, LONG)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < (CV if DV else CK)
    qk_scale = scale * 1.4426950408889634

    acc = tl.zeros((BLOCK, BLOCK_C), dtype=tl.float32)
    for t in range(0, NT):  # query tiles
        ng_m, mask_m, qrow, vrow = _rows(pid_g, t * BLOCK, NG, G, L, CK, CV, HW, W, GW, PH, PW,
                                         BLOCK, LP, PACKED, LONG)
        lse2, delta = _stats(LSE, DELTA, qrow, mask_m, CK, HW)
        st = _logits(K, Q, krow, qrow, mask_n, mask_m, CK, HW, BLOCK, BLOCK, BLOCK_D, PREC)
        pt = tl.exp2(tl.where(_pair_mask(ng_n, mask_n, ng_m, mask_m, PACKED), st * qk_scale - lse2[None, :],
                              float("-inf")))
        if DV:
            do = _load_tile(DO, vrow, offs_c, mask_m, mask_c, HW, False)
            acc += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        else:
            dpt = _logits(V, DO, vrow_n, vrow, mask_n, mask_m, CV, HW, BLOCK, BLOCK, BLOCK_D, PREC)
            dst = pt * (dpt - delta[None, :])
            q = _load_tile(Q, qrow, offs_c, mask_m, mask_c, HW, False)
            acc += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    if DV:
        _store_tile(DKV, vrow_n, offs_c, mask_n, mask_c, HW, acc)
    else:
        _store_tile(DKV, krow, offs_c, mask_n, mask_c, HW, acc * scale)


# ------------------------------------------------------------------------------ launchers
def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


class _Plan:
    """Tiling of one call: tile rows, packing of small groups, grid over (group tiles, member tiles)."""

    def __init__(self, query, value, ph, pw, long):
        n, ck, h, w = query.shape
        self.ck, self.cv, self.hw, self.w = ck, value.shape[1], h * w, w
        self.groups, self.L = group_counts(h, w, ph, pw, long)
        self.ng = n * self.groups
        self.block = 64
        self.lp = triton.next_power_of_2(self.L)
        self.packed = 2 * self.lp <= self.block
        if self.packed:  # whole groups per tile, keys = the tile's own groups
            self.group_tiles, self.member_tiles = triton.cdiv(self.ng, self.block // self.lp), 1
        else:
            self.group_tiles, self.member_tiles = self.ng, triton.cdiv(self.L, self.block)
        self.block_d = _pow2(min(ck, self.cv), 16, 64)
        # fp32 inputs: exact fp32 products (no TF32), to meet the fp32 tolerance.
        self.prec = "ieee" if query.dtype == torch.float32 else "tf32"
        self.args = (self.ng, self.groups, self.L, ck, self.cv, self.hw, w, w // pw, ph, pw,
                     self.member_tiles)
        self.meta = dict(LONG=bool(long), PACKED=self.packed, LP=self.lp, BLOCK=self.block,
                         BLOCK_D=self.block_d, PREC=self.prec, num_warps=4, num_stages=2)

    def grid(self, channels: int, block_c: int):
        return (self.group_tiles, self.member_tiles, triton.cdiv(channels, block_c))


def forward(query, key, value, ph: int, pw: int, long: bool, scale: float):
    """-> (out (N, Cv, H, W), lse (N, H, W) fp32, natural log of the scaled-logit sums)."""
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    n, ck, h, w = q.shape
    out = torch.empty((n, v.shape[1], h, w), device=v.device, dtype=v.dtype)
    lse = torch.empty((n, h, w), device=q.device, dtype=torch.float32)
    if out.numel() == 0 or lse.numel() == 0:
        return out, lse
    plan = _Plan(q, v, ph, pw, long)
    block_c = _pow2(plan.cv, 16, 128)
    _fwd_kernel[plan.grid(plan.cv, block_c)](q, k, v, out, lse, *plan.args, float(scale) * LOG2E,
                                             BLOCK_C=block_c, **plan.meta)
    return out, lse


def backward(grad_out, query, key, value, out, lse, ph: int, pw: int, long: bool, scale: float):
    """-> (dquery, dkey, dvalue), recomputing the probabilities from `lse`."""
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    do, o, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    n, ck, h, w = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    plan = _Plan(q, v, ph, pw, long)
    delta = torch.empty((n, h, w), device=q.device, dtype=torch.float32)
    block_p = 128
    _delta_kernel[(n, triton.cdiv(plan.hw, block_p))](o, do, delta, plan.cv, plan.hw,
                                                      BLOCK_P=block_p, BLOCK_C=_pow2(plan.cv, 1, 32))
    bck, bcv = _pow2(ck, 16, 64), _pow2(plan.cv, 16, 128)
    common = (q, k, v, do, lse, delta)
    _bwd_dq_kernel[plan.grid(ck, bck)](*common, dq, *plan.args, float(scale), BLOCK_C=bck, **plan.meta)
    _bwd_dkdv_kernel[plan.grid(ck, bck)](*common, dk, *plan.args, float(scale), BLOCK_C=bck,
                                         DV=False, **plan.meta)
    _bwd_dkdv_kernel[plan.grid(plan.cv, bcv)](*common, dv, *plan.args, float(scale), BLOCK_C=bcv,
                                              DV=True, **plan.meta)
    return dq, dk, dv


__all__ = ["forward", "backward", "group_member_offset", "group_counts"]
