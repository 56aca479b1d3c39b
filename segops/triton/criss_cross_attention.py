"""Criss-cross attention (docs/operators.md §2.1): Triton forward and backward kernels and their launchers.

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
Backward: D = <dout, out>; P = exp((e - m) - log l), dS = P * (dP - D), dP = <dout, v>; three
launches per pass (dq over keys; dk, and dv per value-channel block, over pixels, one kernel),
column pass into fp32 buffers, row pass adding them: no atomics. Every kernel recomputes the
energies with the forward's own _energies, so they agree bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from segops.triton._common import (NEG_INF, Target, channel_dot, dot_precision, load_tile,
                                   pow2_clamp, register_tiles, target_of)


@triton.jit
def _line(pid_nr, R, L):
    """Sample n and line r of program axis pid_nr = n * R + r, and the channel stride R * L."""
    return (pid_nr // R).to(tl.int64), (pid_nr % R).to(tl.int64), R.to(tl.int64) * L


@triton.jit
def _line_tile(X, n, r, RL, start, C, L, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
               TRANSPOSED: tl.constexpr):
    """Positions start .. start + BLOCK - 1 of line r of sample n, their mask, and all C channels
    of X there as a (positions x channels) tile, or (channels x positions) when TRANSPOSED."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < L
    offs_c = tl.arange(0, BLOCK_C)
    tile = load_tile(X + n * C * RL + r * L, offs, offs_c, mask, offs_c < C, RL, TRANSPOSED)
    return offs, mask, tile


@triton.jit
def _energies(q, kt, offs_p, mask_p, offs_k, mask_k, MASK_CENTRE: tl.constexpr, PREC: tl.constexpr):
    """Energies q . k of a (pixels x keys) tile from q (P, Ck) and k^T (Ck, K), and which of them
    take part. The forward and every backward kernel recompute them with this one function."""
    e = tl.dot(q, kt, input_precision=PREC)
    valid = mask_p[:, None] & mask_k[None, :]
    if MASK_CENTRE:
        valid = valid & (offs_k[None, :] != offs_p[:, None])
    return e, valid


@triton.jit
def _merge(m_i, m_other):
    """Joint maximum of two softmax parts and its finite stand-in (0 where both are empty)."""
    m_new = tl.maximum(m_i, m_other)
    return m_new, tl.where(m_new == NEG_INF, 0.0, m_new)


@triton.jit
def _stats(LSE, D, n, r, offs_p, mask_p, sl_n, sl_r, sl_l, sl_s):
    """Saved max m, log-sum log l (LSE (N, 2, ., .) through strides) and D (N, ., .) of pixels."""
    off = r * sl_r + offs_p * sl_l
    mx = tl.load(LSE + n * sl_n + off, mask=mask_p, other=0.0)
    ll = tl.load(LSE + n * sl_n + sl_s + off, mask=mask_p, other=0.0)
    dd = tl.load(D + n * (sl_n // 2) + off, mask=mask_p, other=0.0)
    return mx, ll, dd


@triton.jit
def _probabilities(q, kt, offs_p, mask_p, offs_k, mask_k, mx, ll,
                   MASK_CENTRE: tl.constexpr, PREC: tl.constexpr):
    """P = exp((e - m) - log l) of a (pixels x keys) tile, 0 where an energy does not take part."""
    e, valid = _energies(q, kt, offs_p, mask_p, offs_k, mask_k, MASK_CENTRE, PREC)
    return tl.where(valid, tl.exp((e - mx[:, None]) - ll[:, None]), 0.0)


@triton.jit
def _score_grads(p, do_base, v_base, offs_p, mask_p, offs_k, mask_k, dd, Cv, RL,
                 PREC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_CV: tl.constexpr):
    """dS = P * (dP - D) of a (pixels x keys) tile, dP = <dout, v> over the value channels."""
    dp = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
    for c0 in range(0, Cv, BLOCK_CV):
        offs_cv = c0 + tl.arange(0, BLOCK_CV)
        mask_cv = offs_cv < Cv
        do = load_tile(do_base, offs_p, offs_cv, mask_p, mask_cv, RL, False)      # [P, Cv]
        vt = load_tile(v_base, offs_k, offs_cv, mask_k, mask_cv, RL, True)        # [Cv, K]
        dp += tl.dot(do, vt, input_precision=PREC)
    return p * (dp - dd[:, None])


@triton.jit
def _store_grad(OUT, PREV, acc, n, r, offs_l, mask_l, offs_c, mask_c, so_n, so_c, so_r, so_l,
                HAS_PREV: tl.constexpr):
    """Store a (positions x channels) gradient tile, plus the other pass's part when HAS_PREV."""
    off = n * so_n + r * so_r + offs_c[None, :].to(tl.int64) * so_c + offs_l[:, None] * so_l
    mask = mask_l[:, None] & mask_c[None, :]
    if HAS_PREV:
        acc += tl.load(PREV + off, mask=mask, other=0.0)
    tl.store(OUT + off, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, PO, PLSE,
                Ck, Cv, R, L,
                so_n, so_c, so_r, so_l, sl_n, sl_r, sl_l, sl_s,
                MASK_CENTRE: tl.constexpr, HAS_PREV: tl.constexpr, PREC: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CK: tl.constexpr,
                BLOCK_CV: tl.constexpr):
    n, r, RL = _line(tl.program_id(1), R, L)
    offs_p, mask_p, q = _line_tile(Q, n, r, RL, tl.program_id(0) * BLOCK_P, Ck, L, BLOCK_P,
                                   BLOCK_CK, False)                                   # [P, Ck]
    offs_cv = tl.program_id(2) * BLOCK_CV + tl.arange(0, BLOCK_CV)
    mask_cv = offs_cv < Cv
    v_base = V + n * Cv * RL + r * L
    m_i = tl.full([BLOCK_P], NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_CV], tl.float32)
    for k0 in range(0, L, BLOCK_K):
        offs_k, mask_k, kt = _line_tile(K, n, r, RL, k0, Ck, L, BLOCK_K, BLOCK_CK, True)  # [Ck, K]
        e, valid = _energies(q, kt, offs_p, mask_p, offs_k, mask_k, MASK_CENTRE, PREC)
        e = tl.where(valid, e, NEG_INF)
        m_new, m_safe = _merge(m_i, tl.max(e, 1))
        p = tl.exp(e - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = load_tile(v_base, offs_k, offs_cv, mask_k, mask_cv, RL, False)          # [K, Cv]
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    o_off = n * so_n + r * so_r + offs_cv[None, :].to(tl.int64) * so_c + offs_p[:, None] * so_l
    l_off = n * sl_n + r * sl_r + offs_p * sl_l
    omask = mask_p[:, None] & mask_cv[None, :]
    if HAS_PREV:
        # The other branch: its max pm, log-sum pll and its own normalised output po.
        pm = tl.load(PLSE + l_off, mask=mask_p, other=NEG_INF)
        pll = tl.load(PLSE + sl_s + l_off, mask=mask_p, other=NEG_INF)
        po = tl.load(PO + o_off, mask=omask, other=0.0)
        m_new, m_safe = _merge(m_i, pm)
        a_self = tl.exp(m_i - m_safe)
        a_prev = tl.exp(pm - m_safe + pll)
        l_i = l_i * a_self + a_prev
        acc = acc * a_self[:, None] + po * a_prev[:, None]
        m_i = m_new
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(O + o_off, o.to(O.dtype.element_ty), mask=omask)
    if tl.program_id(2) == 0:
        tl.store(LSE + l_off, tl.where(has, m_i, NEG_INF), mask=mask_p)
        tl.store(LSE + sl_s + l_off, tl.where(has, tl.log(l_safe), NEG_INF), mask=mask_p)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, D, DQ, PDQ,
                   Ck, Cv, R, L,
                   so_n, so_c, so_r, so_l, sl_n, sl_r, sl_l, sl_s,
                   MASK_CENTRE: tl.constexpr, HAS_PREV: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CK: tl.constexpr,
                   BLOCK_CV: tl.constexpr):
    """dq of a block of pixels: sum over the keys of the line of dS[p, k] k[:, k]."""
    n, r, RL = _line(tl.program_id(1), R, L)
    offs_p, mask_p, q = _line_tile(Q, n, r, RL, tl.program_id(0) * BLOCK_P, Ck, L, BLOCK_P,
                                   BLOCK_CK, False)                                   # [P, Ck]
    mx, ll, dd = _stats(LSE, D, n, r, offs_p, mask_p, sl_n, sl_r, sl_l, sl_s)
    v_line = n * Cv * RL + r * L
    acc = tl.zeros([BLOCK_P, BLOCK_CK], tl.float32)
    for k0 in range(0, L, BLOCK_K):
        offs_k, mask_k, kt = _line_tile(K, n, r, RL, k0, Ck, L, BLOCK_K, BLOCK_CK, True)  # [Ck, K]
        p = _probabilities(q, kt, offs_p, mask_p, offs_k, mask_k, mx, ll, MASK_CENTRE, PREC)
        ds = _score_grads(p, DO + v_line, V + v_line, offs_p, mask_p, offs_k, mask_k, dd, Cv, RL,
                          PREC, BLOCK_P, BLOCK_K, BLOCK_CV)
        acc += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    offs_ck = tl.arange(0, BLOCK_CK)
    _store_grad(DQ, PDQ, acc, n, r, offs_p, mask_p, offs_ck, offs_ck < Ck, so_n, so_c, so_r, so_l,
                HAS_PREV)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, D, DKV, PDKV,
                     Ck, Cv, R, L,
                     so_n, so_c, so_r, so_l, sl_n, sl_r, sl_l, sl_s,
                     MASK_CENTRE: tl.constexpr, HAS_PREV: tl.constexpr, PREC: tl.constexpr,
                     DV: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_CK: tl.constexpr, BLOCK_CV: tl.constexpr, BLOCK_C: tl.constexpr):
    """For a block of keys, over the pixels of the line: dk = sum dS[p, k] q[:, p] (DV=False,
    BLOCK_C = BLOCK_CK, one channel block), or one BLOCK_C-channel block of
    dv = sum P[p, k] dout[:, p] (DV=True)."""
    n, r, RL = _line(tl.program_id(1), R, L)
    offs_k, mask_k, kt = _line_tile(K, n, r, RL, tl.program_id(0) * BLOCK_K, Ck, L, BLOCK_K,
                                    BLOCK_CK, True)                                   # [Ck, K]
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < (Cv if DV else Ck)
    v_line = n * Cv * RL + r * L
    acc = tl.zeros([BLOCK_K, BLOCK_C], tl.float32)
    for p0 in range(0, L, BLOCK_P):
        offs_p, mask_p, q = _line_tile(Q, n, r, RL, p0, Ck, L, BLOCK_P, BLOCK_CK, False)  # [P, Ck]
        mx, ll, dd = _stats(LSE, D, n, r, offs_p, mask_p, sl_n, sl_r, sl_l, sl_s)
        p = _probabilities(q, kt, offs_p, mask_p, offs_k, mask_k, mx, ll, MASK_CENTRE, PREC)
        if DV:
            do = load_tile(DO + v_line, offs_p, offs_c, mask_p, mask_c, RL, False)   # [P, Cv]
            acc += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
        else:
            ds = _score_grads(p, DO + v_line, V + v_line, offs_p, mask_p, offs_k, mask_k, dd, Cv,
                              RL, PREC, BLOCK_P, BLOCK_K, BLOCK_CV)
            acc += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    _store_grad(DKV, PDKV, acc, n, r, offs_k, mask_k, offs_c, mask_c, so_n, so_c, so_r, so_l,
                HAS_PREV)


def config(L: int, Ck: int, Cv: int, dtype: torch.dtype, target: Target) -> dict:
    """Tiles and launch options of every kernel of a pass over lines of length L.

    tl.dot needs every dimension >= 16. The whole key channel dimension at once; pixel x key
    tiles of 64 x 64 on sm_90 (32 x 32 on sm_80, whose mma.sync holds both operands in
    registers, and for fp32) and value channels in blocks of 128 on sm_90, 64 on sm_80 and for
    fp32, 8 warps, and for fp32 no software pipelining (its prefetched operand tiles would sit
    in registers): sizes at which no kernel spills
    (scripts/check_triton_compile.py). Under the interpreter the smallest tiles keep the numpy
    work per program small."""
    kind = register_tiles(dtype, target)
    line, cv = dict(interpreter=(32, 32), fp32=(32, 64), mma=(32, 64), wgmma=(64, 128))[kind]
    return dict(BLOCK_P=pow2_clamp(L, 16, line), BLOCK_K=pow2_clamp(L, 16, line),
                BLOCK_CK=pow2_clamp(Ck, 16, 1 << 16), BLOCK_CV=pow2_clamp(Cv, 16, cv),
                **target.launch(8, 1 if kind == "fp32" else 2))


def _t(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous (N, C, W, H): the columns become rows."""
    return x.transpose(2, 3).contiguous()


def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """(out, stats): out (N, Cv, H, W) in the input dtype, stats (N, 2, H, W) fp32 (max, log-sum)."""
    N, Ck, H, W = query.shape
    Cv = value.shape[1]
    HW = H * W
    dev = query.device
    target = target_of(query)
    out = torch.empty_like(value)
    lse = torch.empty((N, 2, H, W), device=dev, dtype=torch.float32)
    if out.numel() == 0 or lse.numel() == 0:
        return out.zero_(), lse.fill_(0.0)
    prec = dot_precision(query.dtype)
    out_col = torch.empty((N, Cv, H, W), device=dev, dtype=torch.float32)
    lse_col = torch.empty((N, 2, H, W), device=dev, dtype=torch.float32)
    # Column pass on the transposed tensors: line = column x (R = W lines of length H).
    b = config(H, Ck, Cv, query.dtype, target)
    grid = (triton.cdiv(H, b["BLOCK_P"]), N * W, triton.cdiv(Cv, b["BLOCK_CV"]))
    _fwd_kernel[grid](_t(query), _t(key), _t(value), out_col, lse_col, out_col, lse_col,
                      Ck, Cv, W, H,
                      Cv * HW, HW, 1, W, 2 * HW, 1, W, HW,
                      MASK_CENTRE=True, HAS_PREV=False, PREC=prec, **b)
    # Row pass on the NCHW tensors, merged with the column part.
    b = config(W, Ck, Cv, query.dtype, target)
    grid = (triton.cdiv(W, b["BLOCK_P"]), N * H, triton.cdiv(Cv, b["BLOCK_CV"]))
    _fwd_kernel[grid](query, key, value, out, lse, out_col, lse_col,
                      Ck, Cv, H, W,
                      Cv * HW, HW, W, 1, 2 * HW, W, 1, HW,
                      MASK_CENTRE=False, HAS_PREV=True, PREC=prec, **b)
    return out, lse


def _backward_pass(q, k, v, do, lse, dd, outs, prevs, R, L, strides, lstrides, mask_centre):
    N, Ck = q.shape[:2]
    Cv = v.shape[1]
    b = config(L, Ck, Cv, q.dtype, target_of(q))
    dq, dk, dv = outs
    pdq, pdk, pdv = prevs
    has_prev = pdq is not None
    nl = triton.cdiv(L, b["BLOCK_P"])
    common = dict(MASK_CENTRE=mask_centre, HAS_PREV=has_prev, PREC=dot_precision(q.dtype), **b)
    sq = strides(Ck)
    sv = strides(Cv)
    _bwd_dq_kernel[(nl, N * R)](q, k, v, do, lse, dd, dq, pdq if has_prev else dq,
                                Ck, Cv, R, L, *sq, *lstrides, **common)
    _bwd_dkdv_kernel[(nl, N * R, 1)](q, k, v, do, lse, dd, dk, pdk if has_prev else dk,
                                     Ck, Cv, R, L, *sq, *lstrides, DV=False,
                                     BLOCK_C=b["BLOCK_CK"], **common)
    _bwd_dkdv_kernel[(nl, N * R, triton.cdiv(Cv, b["BLOCK_CV"]))](
        q, k, v, do, lse, dd, dv, pdv if has_prev else dv, Ck, Cv, R, L, *sv, *lstrides, DV=True,
        BLOCK_C=b["BLOCK_CV"], **common)


def backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             out: torch.Tensor, stats: torch.Tensor):
    """(dquery, dkey, dvalue) from the saved out and lse; nothing of size (H + W) per pixel."""
    N, Ck, H, W = query.shape
    Cv = value.shape[1]
    HW = H * W
    dev = query.device
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    if query.numel() == 0 or value.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = stats.float().contiguous()
    dd = channel_dot(grad_out, out)
    # Column pass (transposed tensors, centre masked) into fp32 NCHW buffers.
    cq = torch.empty((N, Ck, H, W), device=dev, dtype=torch.float32)
    ck = torch.empty_like(cq)
    cv = torch.empty((N, Cv, H, W), device=dev, dtype=torch.float32)
    _backward_pass(_t(query), _t(key), _t(value), _t(grad_out), lse, dd, (cq, ck, cv),
                   (None, None, None), W, H, lambda C: (C * HW, HW, 1, W), (2 * HW, 1, W, HW), True)
    # Row pass (NCHW), adding the column parts.
    _backward_pass(query, key, value, grad_out, lse, dd, (dq, dk, dv), (cq, ck, cv), H, W,
                   lambda C: (C * HW, HW, W, 1), (2 * HW, W, 1, HW), False)
    return dq, dk, dv
