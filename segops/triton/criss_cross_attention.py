"""Criss-cross attention (SPEC §2.1): Triton forward and backward kernels and their launchers.

Every kernel is a "row attention": the pixels of one line attend to the keys of the same line
(a block of pixels per program, the keys of the line in blocks, tensor-core `tl.dot`s over the
channels). A line is a row of the NCHW tensors (loads contiguous along W), or — for the column
branch — a row of the H/W-transposed copies of q, k, v (and dout) the launcher makes once, so
the vertical branch is read as coalesced as the horizontal one (the old CCNet/mmcv kernels read
it strided). Outputs are written through explicit strides, so the column pass writes straight
into NCHW-shaped fp32 buffers that the row pass then reads (coalesced) and merges.

Forward: column pass (centre masked) -> out_col (normalised by its own softmax) and its
statistics; row pass with an online softmax over the row, merged in its epilogue with the column
part: one joint softmax over the H + W - 1 positions, no attention matrix in global memory.
Saves only the statistics (N, 2, H, W) fp32: the maximum energy m and log l, l = sum exp(e - m).
Backward: D = <dout, out>; P = exp((e - m) - log l), dS = P * (dP - D), dP = <dout, v>; three kernels
per pass (dq over keys, dk over pixels, dv over pixels per value-channel block), column pass into
fp32 buffers, row pass adding them: no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from segops.triton import _interpreter_compat  # noqa: F401  (numpy>=2.3 and the interpreter)

_NEG_INF = float("-inf")


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, PO, PLSE,
                Ck, Cv, R, L,
                so_n, so_c, so_r, so_l, sl_n, sl_r, sl_l, sl_s,
                MASK_CENTRE: tl.constexpr, HAS_PREV: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CK: tl.constexpr,
                BLOCK_CV: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_nr = tl.program_id(1)
    pid_cv = tl.program_id(2)
    n = (pid_nr // R).to(tl.int64)
    r = (pid_nr % R).to(tl.int64)
    RL = R.to(tl.int64) * L
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_ck = tl.arange(0, BLOCK_CK)
    offs_cv = pid_cv * BLOCK_CV + tl.arange(0, BLOCK_CV)
    mask_p = offs_p < L
    mask_ck = offs_ck < Ck
    mask_cv = offs_cv < Cv
    q_base = Q + n * Ck * RL + r * L
    k_base = K + n * Ck * RL + r * L
    v_base = V + n * Cv * RL + r * L

    q = tl.load(q_base + offs_ck[None, :] * RL + offs_p[:, None],
                mask=mask_p[:, None] & mask_ck[None, :], other=0.0)          # [P, Ck]
    m_i = tl.full([BLOCK_P], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_CV], tl.float32)
    for k0 in range(0, L, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < L
        kt = tl.load(k_base + offs_ck[:, None] * RL + offs_k[None, :],
                     mask=mask_ck[:, None] & mask_k[None, :], other=0.0)     # [Ck, K]
        e = tl.dot(q, kt, input_precision="ieee")                             # [P, K]
        valid = mask_k[None, :] & (offs_p[:, None] >= 0)
        if MASK_CENTRE:
            valid = valid & (offs_k[None, :] != offs_p[:, None])
        e = tl.where(valid, e, _NEG_INF)
        m_new = tl.maximum(m_i, tl.max(e, 1))
        m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)
        p = tl.exp(e - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + offs_cv[None, :] * RL + offs_k[:, None],
                     mask=mask_k[:, None] & mask_cv[None, :], other=0.0)     # [K, Cv]
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        m_i = m_new
    o_off = n * so_n + r * so_r + offs_cv[None, :].to(tl.int64) * so_c + offs_p[:, None] * so_l
    l_off = n * sl_n + r * sl_r + offs_p * sl_l
    omask = mask_p[:, None] & mask_cv[None, :]
    if HAS_PREV:
        # The other branch: its max pm, log-sum pll and its own normalised output po.
        pm = tl.load(PLSE + l_off, mask=mask_p, other=_NEG_INF)
        pll = tl.load(PLSE + sl_s + l_off, mask=mask_p, other=_NEG_INF)
        po = tl.load(PO + o_off, mask=omask, other=0.0)
        m_new = tl.maximum(m_i, pm)
        m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)
        a_self = tl.exp(m_i - m_safe)
        a_prev = tl.exp(pm - m_safe + pll)
        l_i = l_i * a_self + a_prev
        acc = acc * a_self[:, None] + po * a_prev[:, None]
        m_i = m_new
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(O + o_off, o.to(O.dtype.element_ty), mask=omask)
    if pid_cv == 0:
        tl.store(LSE + l_off, tl.where(has, m_i, _NEG_INF), mask=mask_p)
        tl.store(LSE + sl_s + l_off, tl.where(has, tl.log(l_safe), _NEG_INF), mask=mask_p)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, D, DQ, PDQ,
                   Ck, Cv, R, L,
                   so_n, so_c, so_r, so_l, sl_n, sl_r, sl_l, sl_s,
                   MASK_CENTRE: tl.constexpr, HAS_PREV: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CK: tl.constexpr,
                   BLOCK_CV: tl.constexpr):
    """dq of a block of pixels: sum over the keys of the line of dS[p, k] k[:, k]."""
    pid_p = tl.program_id(0)
    pid_nr = tl.program_id(1)
    n = (pid_nr // R).to(tl.int64)
    r = (pid_nr % R).to(tl.int64)
    RL = R.to(tl.int64) * L
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_ck = tl.arange(0, BLOCK_CK)
    mask_p = offs_p < L
    mask_ck = offs_ck < Ck
    q_base = Q + n * Ck * RL + r * L
    k_base = K + n * Ck * RL + r * L
    v_base = V + n * Cv * RL + r * L
    do_base = DO + n * Cv * RL + r * L
    l_off = n * sl_n + r * sl_r + offs_p * sl_l
    mx = tl.load(LSE + l_off, mask=mask_p, other=0.0)
    ll = tl.load(LSE + sl_s + l_off, mask=mask_p, other=0.0)
    dd = tl.load(D + l_off - (n * sl_n) + n * (sl_n // 2), mask=mask_p, other=0.0)
    q = tl.load(q_base + offs_ck[None, :] * RL + offs_p[:, None],
                mask=mask_p[:, None] & mask_ck[None, :], other=0.0)          # [P, Ck]
    acc = tl.zeros([BLOCK_P, BLOCK_CK], tl.float32)
    for k0 in range(0, L, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < L
        kt = tl.load(k_base + offs_ck[:, None] * RL + offs_k[None, :],
                     mask=mask_ck[:, None] & mask_k[None, :], other=0.0)     # [Ck, K]
        e = tl.dot(q, kt, input_precision="ieee")
        valid = mask_k[None, :] & mask_p[:, None]
        if MASK_CENTRE:
            valid = valid & (offs_k[None, :] != offs_p[:, None])
        p = tl.where(valid, tl.exp((e - mx[:, None]) - ll[:, None]), 0.0)
        dp = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
        for c0 in range(0, Cv, BLOCK_CV):
            offs_cv = c0 + tl.arange(0, BLOCK_CV)
            mask_cv = offs_cv < Cv
            do = tl.load(do_base + offs_cv[None, :].to(tl.int64) * RL + offs_p[:, None],
                         mask=mask_p[:, None] & mask_cv[None, :], other=0.0)  # [P, Cv]
            vt = tl.load(v_base + offs_cv[:, None].to(tl.int64) * RL + offs_k[None, :],
                         mask=mask_cv[:, None] & mask_k[None, :], other=0.0)  # [Cv, K]
            dp += tl.dot(do, vt, input_precision="ieee")
        ds = p * (dp - dd[:, None])
        k2 = tl.load(k_base + offs_ck[None, :] * RL + offs_k[:, None],
                     mask=mask_k[:, None] & mask_ck[None, :], other=0.0)     # [K, Ck]
        acc += tl.dot(ds.to(k2.dtype), k2, input_precision="ieee")
    o_off = n * so_n + r * so_r + offs_ck[None, :].to(tl.int64) * so_c + offs_p[:, None] * so_l
    omask = mask_p[:, None] & mask_ck[None, :]
    if HAS_PREV:
        acc += tl.load(PDQ + o_off, mask=omask, other=0.0)
    tl.store(DQ + o_off, acc.to(DQ.dtype.element_ty), mask=omask)


@triton.jit
def _bwd_dk_kernel(Q, K, V, DO, LSE, D, DK, PDK,
                   Ck, Cv, R, L,
                   so_n, so_c, so_r, so_l, sl_n, sl_r, sl_l, sl_s,
                   MASK_CENTRE: tl.constexpr, HAS_PREV: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CK: tl.constexpr,
                   BLOCK_CV: tl.constexpr):
    """dk of a block of keys: sum over the pixels of the line of dS[p, k] q[:, p]."""
    pid_k = tl.program_id(0)
    pid_nr = tl.program_id(1)
    n = (pid_nr // R).to(tl.int64)
    r = (pid_nr % R).to(tl.int64)
    RL = R.to(tl.int64) * L
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_ck = tl.arange(0, BLOCK_CK)
    mask_k = offs_k < L
    mask_ck = offs_ck < Ck
    q_base = Q + n * Ck * RL + r * L
    k_base = K + n * Ck * RL + r * L
    v_base = V + n * Cv * RL + r * L
    do_base = DO + n * Cv * RL + r * L
    k2 = tl.load(k_base + offs_ck[None, :] * RL + offs_k[:, None],
                 mask=mask_k[:, None] & mask_ck[None, :], other=0.0)         # [K, Ck]
    acc = tl.zeros([BLOCK_K, BLOCK_CK], tl.float32)
    for p0 in range(0, L, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < L
        l_off = n * sl_n + r * sl_r + offs_p * sl_l
        mx = tl.load(LSE + l_off, mask=mask_p, other=0.0)
        ll = tl.load(LSE + sl_s + l_off, mask=mask_p, other=0.0)
        dd = tl.load(D + l_off - (n * sl_n) + n * (sl_n // 2), mask=mask_p, other=0.0)
        qt = tl.load(q_base + offs_ck[:, None] * RL + offs_p[None, :],
                     mask=mask_ck[:, None] & mask_p[None, :], other=0.0)     # [Ck, P]
        et = tl.dot(k2, qt, input_precision="ieee")                          # [K, P]
        valid = mask_k[:, None] & mask_p[None, :]
        if MASK_CENTRE:
            valid = valid & (offs_k[:, None] != offs_p[None, :])
        pt = tl.where(valid, tl.exp((et - mx[None, :]) - ll[None, :]), 0.0)
        dpt = tl.zeros([BLOCK_K, BLOCK_P], tl.float32)
        for c0 in range(0, Cv, BLOCK_CV):
            offs_cv = c0 + tl.arange(0, BLOCK_CV)
            mask_cv = offs_cv < Cv
            v2 = tl.load(v_base + offs_cv[None, :].to(tl.int64) * RL + offs_k[:, None],
                         mask=mask_k[:, None] & mask_cv[None, :], other=0.0)  # [K, Cv]
            dot_ = tl.load(do_base + offs_cv[:, None].to(tl.int64) * RL + offs_p[None, :],
                           mask=mask_cv[:, None] & mask_p[None, :], other=0.0)  # [Cv, P]
            dpt += tl.dot(v2, dot_, input_precision="ieee")
        dst = pt * (dpt - dd[None, :])
        q2 = tl.load(q_base + offs_ck[None, :] * RL + offs_p[:, None],
                     mask=mask_p[:, None] & mask_ck[None, :], other=0.0)     # [P, Ck]
        acc += tl.dot(dst.to(q2.dtype), q2, input_precision="ieee")
    o_off = n * so_n + r * so_r + offs_ck[None, :].to(tl.int64) * so_c + offs_k[:, None] * so_l
    omask = mask_k[:, None] & mask_ck[None, :]
    if HAS_PREV:
        acc += tl.load(PDK + o_off, mask=omask, other=0.0)
    tl.store(DK + o_off, acc.to(DK.dtype.element_ty), mask=omask)


@triton.jit
def _bwd_dv_kernel(Q, K, DO, LSE, DV, PDV,
                   Ck, Cv, R, L,
                   so_n, so_c, so_r, so_l, sl_n, sl_r, sl_l, sl_s,
                   MASK_CENTRE: tl.constexpr, HAS_PREV: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CK: tl.constexpr,
                   BLOCK_CV: tl.constexpr):
    """dv of a block of keys and value channels: sum over the pixels of P[p, k] dout[:, p]."""
    pid_k = tl.program_id(0)
    pid_nr = tl.program_id(1)
    pid_cv = tl.program_id(2)
    n = (pid_nr // R).to(tl.int64)
    r = (pid_nr % R).to(tl.int64)
    RL = R.to(tl.int64) * L
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_ck = tl.arange(0, BLOCK_CK)
    offs_cv = pid_cv * BLOCK_CV + tl.arange(0, BLOCK_CV)
    mask_k = offs_k < L
    mask_ck = offs_ck < Ck
    mask_cv = offs_cv < Cv
    q_base = Q + n * Ck * RL + r * L
    k_base = K + n * Ck * RL + r * L
    do_base = DO + n * Cv * RL + r * L
    k2 = tl.load(k_base + offs_ck[None, :] * RL + offs_k[:, None],
                 mask=mask_k[:, None] & mask_ck[None, :], other=0.0)         # [K, Ck]
    acc = tl.zeros([BLOCK_K, BLOCK_CV], tl.float32)
    for p0 in range(0, L, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < L
        l_off = n * sl_n + r * sl_r + offs_p * sl_l
        mx = tl.load(LSE + l_off, mask=mask_p, other=0.0)
        ll = tl.load(LSE + sl_s + l_off, mask=mask_p, other=0.0)
        qt = tl.load(q_base + offs_ck[:, None] * RL + offs_p[None, :],
                     mask=mask_ck[:, None] & mask_p[None, :], other=0.0)     # [Ck, P]
        et = tl.dot(k2, qt, input_precision="ieee")                          # [K, P]
        valid = mask_k[:, None] & mask_p[None, :]
        if MASK_CENTRE:
            valid = valid & (offs_k[:, None] != offs_p[None, :])
        pt = tl.where(valid, tl.exp((et - mx[None, :]) - ll[None, :]), 0.0)
        do = tl.load(do_base + offs_cv[None, :].to(tl.int64) * RL + offs_p[:, None],
                     mask=mask_p[:, None] & mask_cv[None, :], other=0.0)     # [P, Cv]
        acc += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
    o_off = n * so_n + r * so_r + offs_cv[None, :].to(tl.int64) * so_c + offs_k[:, None] * so_l
    omask = mask_k[:, None] & mask_cv[None, :]
    if HAS_PREV:
        acc += tl.load(PDV + o_off, mask=omask, other=0.0)
    tl.store(DV + o_off, acc.to(DV.dtype.element_ty), mask=omask)


@triton.jit
def _dot_rows_kernel(A, B, D, C, HW, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """D[n, s] = sum_c A[n, c, s] * B[n, c, s] in fp32 (loads contiguous along s)."""
    pid_s = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < HW
    acc = tl.zeros([BLOCK_S], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        off = n * C * HW + offs_c[:, None].to(tl.int64) * HW + offs_s[None, :]
        m = (offs_c[:, None] < C) & mask_s[None, :]
        a = tl.load(A + off, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + off, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, 0)
    tl.store(D + n * HW + offs_s, acc, mask=mask_s)


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def _blocks(L: int, Ck: int, Cv: int, on_gpu: bool) -> dict:
    # tl.dot needs every dimension >= 16. On a GPU: 64-pixel by 64-key tiles, the whole key
    # channel dimension at once, value channels in 128-wide blocks; under the interpreter the
    # smallest tiles keep the numpy work per program small.
    line = _pow2(L, 16, 64 if on_gpu else 32)
    return dict(BLOCK_P=line, BLOCK_K=line, BLOCK_CK=_pow2(Ck, 16, 1 << 16),
                BLOCK_CV=_pow2(Cv, 16, 128 if on_gpu else 32))


def _t(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous (N, C, W, H): the columns become rows."""
    return x.transpose(2, 3).contiguous()


def _launch_opts(on_gpu: bool, blocks: dict) -> dict:
    if not on_gpu:
        return {}
    big = blocks["BLOCK_P"] * max(blocks["BLOCK_CV"], blocks["BLOCK_CK"]) >= 64 * 128
    return dict(num_warps=8 if big else 4, num_stages=2)


def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """(out, stats): out (N, Cv, H, W) in the input dtype, stats (N, 2, H, W) fp32 (max, log-sum)."""
    N, Ck, H, W = query.shape
    Cv = value.shape[1]
    HW = H * W
    dev = query.device
    on_gpu = dev.type == "cuda"
    out = torch.empty_like(value)
    lse = torch.empty((N, 2, H, W), device=dev, dtype=torch.float32)
    if out.numel() == 0 or lse.numel() == 0:
        return out.zero_(), lse.fill_(0.0)
    out_col = torch.empty((N, Cv, H, W), device=dev, dtype=torch.float32)
    lse_col = torch.empty((N, 2, H, W), device=dev, dtype=torch.float32)
    # Column pass on the transposed tensors: line = column x (R = W lines of length H).
    b = _blocks(H, Ck, Cv, on_gpu)
    grid = (triton.cdiv(H, b["BLOCK_P"]), N * W, triton.cdiv(Cv, b["BLOCK_CV"]))
    _fwd_kernel[grid](_t(query), _t(key), _t(value), out_col, lse_col, out_col, lse_col,
                      Ck, Cv, W, H,
                      Cv * HW, HW, 1, W, 2 * HW, 1, W, HW,
                      MASK_CENTRE=True, HAS_PREV=False, **b, **_launch_opts(on_gpu, b))
    # Row pass on the NCHW tensors, merged with the column part.
    b = _blocks(W, Ck, Cv, on_gpu)
    grid = (triton.cdiv(W, b["BLOCK_P"]), N * H, triton.cdiv(Cv, b["BLOCK_CV"]))
    _fwd_kernel[grid](query, key, value, out, lse, out_col, lse_col,
                      Ck, Cv, H, W,
                      Cv * HW, HW, W, 1, 2 * HW, W, 1, HW,
                      MASK_CENTRE=False, HAS_PREV=True, **b, **_launch_opts(on_gpu, b))
    return out, lse


def _backward_pass(q, k, v, do, lse, dd, outs, prevs, R, L, strides, lstrides, mask_centre,
                   on_gpu):
    N, Ck = q.shape[:2]
    Cv = v.shape[1]
    b = _blocks(L, Ck, Cv, on_gpu)
    opts = _launch_opts(on_gpu, b)
    dq, dk, dv = outs
    pdq, pdk, pdv = prevs
    has_prev = pdq is not None
    nl = triton.cdiv(L, b["BLOCK_P"])
    common = dict(MASK_CENTRE=mask_centre, HAS_PREV=has_prev, **b, **opts)
    sq = strides(Ck)
    sv = strides(Cv)
    _bwd_dq_kernel[(nl, N * R)](q, k, v, do, lse, dd, dq, pdq if has_prev else dq,
                                Ck, Cv, R, L, *sq, *lstrides, **common)
    _bwd_dk_kernel[(nl, N * R)](q, k, v, do, lse, dd, dk, pdk if has_prev else dk,
                                Ck, Cv, R, L, *sq, *lstrides, **common)
    _bwd_dv_kernel[(nl, N * R, triton.cdiv(Cv, b["BLOCK_CV"]))](
        q, k, do, lse, dv, pdv if has_prev else dv, Ck, Cv, R, L, *sv, *lstrides, **common)


def backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             out: torch.Tensor, stats: torch.Tensor):
    """(dquery, dkey, dvalue) from the saved out and lse; nothing of size (H + W) per pixel."""
    N, Ck, H, W = query.shape
    Cv = value.shape[1]
    HW = H * W
    dev = query.device
    on_gpu = dev.type == "cuda"
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    if query.numel() == 0 or value.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = stats.float().contiguous()
    dd = torch.empty((N, H, W), device=dev, dtype=torch.float32)
    block_s = 128 if on_gpu else 64
    _dot_rows_kernel[(triton.cdiv(HW, block_s), N)](grad_out, out, dd, Cv, HW,
                                                     BLOCK_C=16 if on_gpu else 32, BLOCK_S=block_s)
    # Column pass (transposed tensors, centre masked) into fp32 NCHW buffers.
    cq = torch.empty((N, Ck, H, W), device=dev, dtype=torch.float32)
    ck = torch.empty_like(cq)
    cv = torch.empty((N, Cv, H, W), device=dev, dtype=torch.float32)
    _backward_pass(_t(query), _t(key), _t(value), _t(grad_out), lse, dd, (cq, ck, cv),
                   (None, None, None), W, H, lambda C: (C * HW, HW, 1, W), (2 * HW, 1, W, HW), True,
                   on_gpu)
    # Row pass (NCHW), adding the column parts.
    _backward_pass(query, key, value, grad_out, lse, dd, (dq, dk, dv), (cq, ck, cv), H, W,
                   lambda C: (C * HW, HW, W, 1), (2 * HW, W, 1, HW), False, on_gpu)
    return dq, dk, dv
