"""Disentangled non-local attention (docs/operators.md §2.3) — Triton kernels and launchers.

Tensors in, tensors out (no registration; see segops/ops/disentangled_non_local.py). Inputs are
contiguous and flattened: query (N, Ck, Lq), key (N, Ck, Lk), value (N, Cv, Lk), unary (N, Lk)
or None; `s` is the combined logit factor (scale / temperature).

Flash-attention style: the forward tiles the keys with an online softmax (exp2 domain, fp32
statistics) and saves only the per-query log-sum-exp; the backward recomputes the scores tile by
tile. No Lq x Lk matrix ever reaches global memory. All layouts are channel-major, so every tile
is read straight from (C, L) storage, coalesced along positions; the GEMM-shaped parts use
tl.dot (tensor cores for fp16/bf16, exact fp32 for fp32 inputs) with fp32 accumulation.

Whitening is fused: the per-channel means (a cheap reduction done by torch) are subtracted from
each query/key tile as it is loaded. Its gradient: dq = dq~ - mean_i dq~, where
mean_i dq~ = (s/Lq) sum_j (sum_i dS_ij) k~_j is a small correction built from the column sums
of dS that the dK kernel produces anyway and subtracted when dq is stored; for the key,
sum_j dS_ij = 0 makes mean_j dk~ vanish, so dk = dk~. The unary term is fused as well: the
forward carries a second online softmax over the unary logits and accumulates
g = sum_j softmax(u)_j v_j next to the pairwise term; the dV kernel adds w_j dg and produces
du's per-channel-block partial sums (dg = sum_i dout_i is accumulated from the dout tiles it
already loads).

Kernels: _fwd (grid: query blocks x Cv blocks x N), the shared channel_dot (D_i =
dout_i.(out_i - g)), _bwd_dv (key blocks x Cv blocks x N), _bwd_dk (key blocks x Ck blocks x N,
also the column sums), _bwd_dq (query blocks x Ck blocks x N).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from segops.triton._common import (LN2, LOG2E, NEG_INF, Target, channel_dot, dot_precision,
                                   load_tile, log2_scale, pow2_clamp, register_tiles, store_tile,
                                   target_of)


@triton.jit
def _program_block(LPOS, C, BP: tl.constexpr, BCH: tl.constexpr):
    """This program's sample n (program_id(2)), block of positions (program_id(0), BP of LPOS)
    and block of channels (program_id(1), BCH of C), with their masks."""
    offs_pos = tl.program_id(0) * BP + tl.arange(0, BP)
    offs_ch = tl.program_id(1) * BCH + tl.arange(0, BCH)
    return tl.program_id(2).to(tl.int64), offs_pos, offs_pos < LPOS, offs_ch, offs_ch < C


@triton.jit
def _load_whitened(base, offs_pos, offs_ch, mask_pos, mask_ch, stride, mean_base,
                   WHITEN: tl.constexpr, TRANSPOSED: tl.constexpr):
    """load_tile of (C, L) storage; when WHITEN, minus the per-channel means at mean_base."""
    x = load_tile(base, offs_pos, offs_ch, mask_pos, mask_ch, stride, TRANSPOSED)
    if WHITEN:
        mu = tl.load(mean_base + offs_ch, mask=mask_ch, other=0.0)
        if TRANSPOSED:
            xf = x.to(tl.float32) - mu[:, None]
            x = tl.where(mask_ch[:, None] & mask_pos[None, :], xf, 0.0).to(base.dtype.element_ty)
        else:
            xf = x.to(tl.float32) - mu[None, :]
            x = tl.where(mask_pos[:, None] & mask_ch[None, :], xf, 0.0).to(base.dtype.element_ty)
    return x


@triton.jit
def _scores(Q, K, MQ, MK, n, offs_m, m_mask, offs_n, n_mask, CK, LQ, LK,
            WHITEN: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            BD: tl.constexpr):
    """Raw scores q~_i . k~_j of a (queries x keys) tile of sample n. The forward and every
    backward kernel compute them with this one function."""
    s = tl.zeros([BM, BN], tl.float32)
    for d0 in range(0, CK, BD):
        offs_d = d0 + tl.arange(0, BD)
        d_mask = offs_d < CK
        qt = _load_whitened(Q + n * CK * LQ, offs_m, offs_d, m_mask, d_mask, LQ, MQ + n * CK,
                            WHITEN, False)
        kt = _load_whitened(K + n * CK * LK, offs_n, offs_d, n_mask, d_mask, LK, MK + n * CK,
                            WHITEN, True)
        s += tl.dot(qt, kt, input_precision=PREC)
    return s


@triton.jit
def _query_stats(LSE, D, n, offs_m, m_mask, LQ):
    """Saved log-sum-exp (in log2 units; +inf off the tile, so P = 0 there) and D of queries."""
    lse2 = tl.load(LSE + n * LQ + offs_m, mask=m_mask, other=float("inf")) * LOG2E
    di = tl.load(D + n * LQ + offs_m, mask=m_mask, other=0.0)
    return lse2, di


@triton.jit
def _probabilities(Q, K, MQ, MK, n, offs_m, m_mask, offs_n, n_mask, lse2, CK, LQ, LK, qk_scale,
                   WHITEN: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BD: tl.constexpr):
    """P of a (queries x keys) tile from the saved log-sum-exp, 0 for keys off the tile."""
    s = _scores(Q, K, MQ, MK, n, offs_m, m_mask, offs_n, n_mask, CK, LQ, LK, WHITEN, PREC, BM, BN,
                BD)
    return tl.where(n_mask[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)


@triton.jit
def _query_block(i0, Q, K, MQ, MK, LSE, D, n, offs_n, n_mask, CK, LQ, LK, qk_scale,
                 WHITEN: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BD: tl.constexpr):
    """Queries i0 .. i0 + BM - 1 against a key-block program's keys: offsets, mask, P and D."""
    offs_m = i0 + tl.arange(0, BM)
    m_mask = offs_m < LQ
    lse2, di = _query_stats(LSE, D, n, offs_m, m_mask, LQ)
    p = _probabilities(Q, K, MQ, MK, n, offs_m, m_mask, offs_n, n_mask, lse2, CK, LQ, LK, qk_scale,
                       WHITEN, PREC, BM, BN, BD)
    return offs_m, m_mask, p, di


@triton.jit
def _score_grads(p, GO, V, n, offs_m, m_mask, offs_n, n_mask, di, CV, LQ, LK,
                 PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr):
    """dS = P * (dP - D) of a (queries x keys) tile, dP = <dout_i, v_j>."""
    dp = tl.zeros([BM, BN], tl.float32)
    for c0 in range(0, CV, BV):
        offs_c = c0 + tl.arange(0, BV)
        c_mask = offs_c < CV
        do = load_tile(GO + n * CV * LQ, offs_m, offs_c, m_mask, c_mask, LQ, False)
        vt = load_tile(V + n * CV * LK, offs_n, offs_c, n_mask, c_mask, LK, True)
        dp += tl.dot(do, vt, input_precision=PREC)
    return p * (dp - di[:, None])


@triton.jit
def _fwd_kernel(Q, K, V, U, MQ, MK, OUT, LSE, G, LSEU,
                CK, CV, LQ, LK, qk_scale,
                WHITEN: tl.constexpr, HAS_UNARY: tl.constexpr, PREC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
    n, offs_m, m_mask, offs_v, v_mask = _program_block(LQ, CV, BM, BV)
    m_i = tl.full([BM], NEG_INF, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BV], tl.float32)
    mu_u = tl.max(tl.full([BN], NEG_INF, tl.float32), 0)
    l_u = tl.sum(tl.zeros([BN], tl.float32), 0)
    g_acc = tl.zeros([BV], tl.float32)
    for j0 in range(0, LK, BN):
        offs_n = j0 + tl.arange(0, BN)
        n_mask = offs_n < LK
        s = _scores(Q, K, MQ, MK, n, offs_m, m_mask, offs_n, n_mask, CK, LQ, LK, WHITEN, PREC, BM,
                    BN, BD)
        s = tl.where(n_mask[None, :], s * qk_scale, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = load_tile(V + n * CV * LK, offs_n, offs_v, n_mask, v_mask, LK, False)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
        if HAS_UNARY:
            ut = tl.load(U + n * LK + offs_n, mask=n_mask, other=NEG_INF).to(tl.float32) * LOG2E
            mu_new = tl.maximum(mu_u, tl.max(ut, 0))
            a_u = tl.exp2(mu_u - mu_new)
            p_u = tl.exp2(ut - mu_new)
            l_u = l_u * a_u + tl.sum(p_u, 0)
            g_acc = g_acc * a_u + tl.sum(p_u[:, None] * vt.to(tl.float32), 0)
            mu_u = mu_new
    out = acc / l_i[:, None]
    first_v = tl.program_id(1) == 0
    if HAS_UNARY:
        g = g_acc / l_u
        out += g[None, :]
        first_m = tl.program_id(0) == 0
        tl.store(G + n * CV + offs_v, g, mask=v_mask & first_m)
        tl.store(LSEU + n, (mu_u + tl.log2(l_u)) * LN2, mask=first_m & first_v)
    store_tile(OUT + n * CV * LQ, offs_m, offs_v, m_mask, v_mask, LQ, out)
    # log-sum-exp in natural-log units
    tl.store(LSE + n * LQ + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=m_mask & first_v)


@triton.jit
def _bwd_dv_kernel(Q, K, V, U, GO, MQ, MK, LSE, D, G, LSEU, DV, DUP,
                   CK, CV, LQ, LK, qk_scale, NVB,
                   WHITEN: tl.constexpr, HAS_UNARY: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
    n, offs_n, n_mask, offs_v, v_mask = _program_block(LK, CV, BN, BV)
    dv = tl.zeros([BN, BV], tl.float32)
    dg = tl.zeros([BV], tl.float32)
    for i0 in range(0, LQ, BM):
        offs_m, m_mask, p, di = _query_block(i0, Q, K, MQ, MK, LSE, D, n, offs_n, n_mask, CK, LQ,
                                             LK, qk_scale, WHITEN, PREC, BM, BN, BD)
        do = load_tile(GO + n * CV * LQ, offs_m, offs_v, m_mask, v_mask, LQ, False)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
        if HAS_UNARY:
            dg += tl.sum(do.to(tl.float32), 0)
    if HAS_UNARY:
        lse_u = tl.load(LSEU + n)
        w = tl.exp(tl.load(U + n * LK + offs_n, mask=n_mask, other=NEG_INF).to(tl.float32) - lse_u)
        dv += w[:, None] * dg[None, :]
        vt = load_tile(V + n * CV * LK, offs_n, offs_v, n_mask, v_mask, LK, False).to(tl.float32)
        gv = tl.load(G + n * CV + offs_v, mask=v_mask, other=0.0)
        part = tl.sum((vt - gv[None, :]) * dg[None, :], 1)
        tl.store(DUP + (n * NVB + tl.program_id(1)) * LK + offs_n, part, mask=n_mask)
    store_tile(DV + n * CV * LK, offs_n, offs_v, n_mask, v_mask, LK, dv)


@triton.jit
def _bwd_dk_kernel(Q, K, V, GO, MQ, MK, LSE, D, DK, COLSUM,
                   CK, CV, LQ, LK, qk_scale, sm_scale,
                   WHITEN: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                   BC: tl.constexpr):
    n, offs_n, n_mask, offs_k, k_mask = _program_block(LK, CK, BN, BC)
    dk = tl.zeros([BN, BC], tl.float32)
    colsum = tl.zeros([BN], tl.float32)
    for i0 in range(0, LQ, BM):
        offs_m, m_mask, p, di = _query_block(i0, Q, K, MQ, MK, LSE, D, n, offs_n, n_mask, CK, LQ,
                                             LK, qk_scale, WHITEN, PREC, BM, BN, BD)
        ds = _score_grads(p, GO, V, n, offs_m, m_mask, offs_n, n_mask, di, CV, LQ, LK, PREC, BM,
                          BN, BV)
        qt = _load_whitened(Q + n * CK * LQ, offs_m, offs_k, m_mask, k_mask, LQ, MQ + n * CK,
                            WHITEN, False)
        dk += tl.dot(tl.trans(ds).to(qt.dtype), qt, input_precision=PREC)
        colsum += tl.sum(ds, 0)
    store_tile(DK + n * CK * LK, offs_n, offs_k, n_mask, k_mask, LK, dk * sm_scale)
    tl.store(COLSUM + n * LK + offs_n, colsum, mask=n_mask & (tl.program_id(1) == 0))


@triton.jit
def _bwd_dq_kernel(Q, K, V, GO, MQ, MK, LSE, D, CORR, DQ,
                   CK, CV, LQ, LK, qk_scale, sm_scale,
                   WHITEN: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                   BC: tl.constexpr):
    n, offs_m, m_mask, offs_k, k_mask = _program_block(LQ, CK, BM, BC)
    lse2, di = _query_stats(LSE, D, n, offs_m, m_mask, LQ)
    dq = tl.zeros([BM, BC], tl.float32)
    for j0 in range(0, LK, BN):
        offs_n = j0 + tl.arange(0, BN)
        n_mask = offs_n < LK
        p = _probabilities(Q, K, MQ, MK, n, offs_m, m_mask, offs_n, n_mask, lse2, CK, LQ, LK,
                           qk_scale, WHITEN, PREC, BM, BN, BD)
        ds = _score_grads(p, GO, V, n, offs_m, m_mask, offs_n, n_mask, di, CV, LQ, LK, PREC, BM,
                          BN, BV)
        kt = _load_whitened(K + n * CK * LK, offs_n, offs_k, n_mask, k_mask, LK, MK + n * CK,
                            WHITEN, False)
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
    dq = dq * sm_scale
    if WHITEN:
        dq -= tl.load(CORR + n * CK + offs_k, mask=k_mask, other=0.0)[None, :]
    store_tile(DQ + n * CK * LQ, offs_m, offs_k, m_mask, k_mask, LQ, dq)


def config(ck: int, cv: int, lq: int, lk: int, dtype: torch.dtype, target: Target) -> dict:
    """Tiles and launch options of the "fwd", "dv", "dk" and "dq" kernels (tl.dot needs every dim
    >= 16). Interpreter: 64 positions, 64-channel reduction chunks, accumulators up to 128
    channels wide. On a GPU the whitened score tiles, the unary softmax and the accumulator
    must fit in registers (scripts/check_triton_compile.py found 44-600 B spilled with
    128-channel accumulators at 8 warps): 64-channel accumulators, 32-channel reduction chunks
    on sm_80 and for fp32, 32 positions and no software pipelining for fp32."""
    kind = register_tiles(dtype, target)
    pos, chunk, acc = dict(interpreter=(64, 64, 128), fp32=(32, 32, 64), mma=(64, 32, 64),
                           wgmma=(64, 64, 64))[kind]
    tiles = dict(BM=pow2_clamp(lq, 16, pos), BN=pow2_clamp(lk, 16, pos),
                 BD=pow2_clamp(ck, 16, chunk), **target.launch(8, 1 if kind == "fp32" else 2))
    wide = dict(tiles, BV=pow2_clamp(cv, 16, acc))
    grads = dict(tiles, BV=pow2_clamp(cv, 16, 64), BC=pow2_clamp(ck, 16, acc))
    return dict(fwd=wide, dv=wide, dk=grads, dq=grads)


def _check(query, key, value):
    n, ck, lq = query.shape
    lk, cv = key.shape[2], value.shape[1]
    if max(ck * lq, ck * lk, cv * lq, cv * lk) >= 2 ** 31:
        raise RuntimeError("segops.disentangled_non_local (triton): a per-sample tensor has >= 2**31 "
                           f"elements (Ck={ck}, Cv={cv}, Lq={lq}, Lk={lk}); not supported")


def _means(query, key, whiten):
    if not whiten:
        dummy = query.new_zeros((1,), dtype=torch.float32)
        return dummy, dummy
    return (torch.mean(query, dim=-1, dtype=torch.float32).contiguous(),
            torch.mean(key, dim=-1, dtype=torch.float32).contiguous())


def forward(query, key, value, unary, whiten: bool, s: float):
    _check(query, key, value)
    n, ck, lq = query.shape
    lk, cv = key.shape[2], value.shape[1]
    cfg = config(ck, cv, lq, lk, query.dtype, target_of(query))
    mq, mk = _means(query, key, whiten)
    out = torch.empty((n, cv, lq), device=query.device, dtype=value.dtype)
    lse = torch.empty((n, lq), device=query.device, dtype=torch.float32)
    g = torch.zeros((n, cv), device=query.device, dtype=torch.float32)
    lse_u = torch.zeros((n,), device=query.device, dtype=torch.float32)
    has_u = unary is not None
    grid = (triton.cdiv(lq, cfg["fwd"]["BM"]), triton.cdiv(cv, cfg["fwd"]["BV"]), n)
    _fwd_kernel[grid](query, key, value, unary if has_u else g, mq, mk, out, lse, g, lse_u,
                      ck, cv, lq, lk, log2_scale(s),
                      WHITEN=whiten, HAS_UNARY=has_u, PREC=dot_precision(query.dtype), **cfg["fwd"])
    return out, lse, g, lse_u


def backward(grad_out, query, key, value, unary, out, lse, g, lse_u, whiten: bool, s: float):
    _check(query, key, value)
    n, ck, lq = query.shape
    lk, cv = key.shape[2], value.shape[1]
    cfg = config(ck, cv, lq, lk, query.dtype, target_of(query))
    dev = query.device
    mq, mk = _means(query, key, whiten)
    has_u = unary is not None
    prec = dot_precision(query.dtype)
    D = channel_dot(grad_out, out, g if has_u else None)  # D_i = dout_i . (out_i - g)
    dq = torch.empty_like(query)
    dk = torch.empty_like(key)
    dv = torch.empty_like(value)
    nvb = triton.cdiv(cv, cfg["dv"]["BV"])
    dup = torch.empty((n, nvb, lk) if has_u else (1,), device=dev, dtype=torch.float32)
    _bwd_dv_kernel[(triton.cdiv(lk, cfg["dv"]["BN"]), nvb, n)](
        query, key, value, unary if has_u else g, grad_out, mq, mk, lse, D, g, lse_u, dv, dup,
        ck, cv, lq, lk, log2_scale(s), nvb,
        WHITEN=whiten, HAS_UNARY=has_u, PREC=prec, **cfg["dv"])
    colsum = torch.empty((n, lk), device=dev, dtype=torch.float32)
    nkb = triton.cdiv(ck, cfg["dk"]["BC"])
    _bwd_dk_kernel[(triton.cdiv(lk, cfg["dk"]["BN"]), nkb, n)](
        query, key, value, grad_out, mq, mk, lse, D, dk, colsum,
        ck, cv, lq, lk, log2_scale(s), s,
        WHITEN=whiten, PREC=prec, **cfg["dk"])
    if whiten:
        # mean_i dq~_i = (s / Lq) * sum_j colsum_j (k_j - mu_k)
        kc = torch.bmm(key.float(), colsum.unsqueeze(-1)).squeeze(-1) - mk * colsum.sum(-1, keepdim=True)
        corr = (kc * (s / max(lq, 1))).contiguous()  # no queries: colsum, so kc, is 0
    else:
        corr = mq
    _bwd_dq_kernel[(triton.cdiv(lq, cfg["dq"]["BM"]), triton.cdiv(ck, cfg["dq"]["BC"]), n)](
        query, key, value, grad_out, mq, mk, lse, D, corr, dq,
        ck, cv, lq, lk, log2_scale(s), s,
        WHITEN=whiten, PREC=prec, **cfg["dq"])
    if has_u:
        w = torch.exp(unary.float() - lse_u[:, None])
        du = (w * dup.sum(1)).to(unary.dtype)
    else:
        du = query.new_empty((0,))
    return dq, dk, dv, du
