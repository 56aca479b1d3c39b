"""Disentangled non-local attention (SPEC §2.3) — Triton kernels and launchers.

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

Kernels: _fwd (grid: query blocks x Cv blocks x N), _bwd_preprocess (D_i = dout_i.(out_i - g)),
_bwd_dv (key blocks x Cv blocks x N), _bwd_dk (key blocks x Ck blocks x N, also the column sums),
_bwd_dq (query blocks x Ck blocks x N).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from segops.triton import _interpreter_compat  # noqa: F401  (numpy>=2.3 under TRITON_INTERPRET)

LOG2E = 1.4426950408889634


@triton.jit
def _load_whitened(ptrs, mask, mean_ptrs, mean_mask, WHITEN: tl.constexpr, MEAN_AXIS: tl.constexpr):
    """Load a tile; when WHITEN, subtract the per-channel means (channels on MEAN_AXIS)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if WHITEN:
        mu = tl.load(mean_ptrs, mask=mean_mask, other=0.0)
        if MEAN_AXIS == 0:
            xf = x.to(tl.float32) - mu[:, None]
        else:
            xf = x.to(tl.float32) - mu[None, :]
        x = tl.where(mask, xf, 0.0).to(ptrs.dtype.element_ty)
    return x


@triton.jit
def _fwd_kernel(Q, K, V, U, MQ, MK, OUT, LSE, G, LSEU,
                CK, CV, LQ, LK, qk_scale,
                WHITEN: tl.constexpr, HAS_UNARY: tl.constexpr, PREC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_v = pid_v * BV + tl.arange(0, BV)
    m_mask = offs_m < LQ
    v_mask = offs_v < CV
    q_base = Q + n * CK * LQ
    k_base = K + n * CK * LK
    v_base = V + n * CV * LK

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BV], tl.float32)
    mu_u = tl.max(tl.full([BN], float("-inf"), tl.float32), 0)
    l_u = tl.sum(tl.zeros([BN], tl.float32), 0)
    g_acc = tl.zeros([BV], tl.float32)
    for j0 in range(0, LK, BN):
        offs_n = j0 + tl.arange(0, BN)
        n_mask = offs_n < LK
        s = tl.zeros([BM, BN], tl.float32)
        for d0 in range(0, CK, BD):
            offs_d = d0 + tl.arange(0, BD)
            d_mask = offs_d < CK
            qt = _load_whitened(q_base + offs_d[None, :] * LQ + offs_m[:, None],
                                m_mask[:, None] & d_mask[None, :], MQ + n * CK + offs_d, d_mask,
                                WHITEN, 1)
            kt = _load_whitened(k_base + offs_d[:, None] * LK + offs_n[None, :],
                                d_mask[:, None] & n_mask[None, :], MK + n * CK + offs_d, d_mask,
                                WHITEN, 0)
            s += tl.dot(qt, kt, input_precision=PREC)
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + offs_v[None, :] * LK + offs_n[:, None],
                     mask=n_mask[:, None] & v_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
        if HAS_UNARY:
            ut = tl.load(U + n * LK + offs_n, mask=n_mask, other=float("-inf")).to(tl.float32) * 1.4426950408889634
            mu_new = tl.maximum(mu_u, tl.max(ut, 0))
            a_u = tl.exp2(mu_u - mu_new)
            p_u = tl.exp2(ut - mu_new)
            l_u = l_u * a_u + tl.sum(p_u, 0)
            g_acc = g_acc * a_u + tl.sum(p_u[:, None] * vt.to(tl.float32), 0)
            mu_u = mu_new
    out = acc / l_i[:, None]
    if HAS_UNARY:
        g = g_acc / l_u
        out += g[None, :]
        tl.store(G + n * CV + offs_v, g, mask=v_mask & (pid_m == 0))
        tl.store(LSEU + n, (mu_u + tl.log2(l_u)) * 0.6931471805599453, mask=(pid_m == 0) & (pid_v == 0))
    tl.store(OUT + n * CV * LQ + offs_v[None, :] * LQ + offs_m[:, None], out.to(OUT.dtype.element_ty),
             mask=m_mask[:, None] & v_mask[None, :])
    # log-sum-exp in natural-log units
    tl.store(LSE + n * LQ + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453,
             mask=m_mask & (pid_v == 0))


@triton.jit
def _bwd_preprocess(GO, OUT, G, D, CV, LQ, HAS_UNARY: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr):
    pid_m = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < LQ
    acc = tl.zeros([BM], tl.float32)
    for c0 in range(0, CV, BV):
        offs_c = c0 + tl.arange(0, BV)
        c_mask = offs_c < CV
        ptrs = n * CV * LQ + offs_c[None, :] * LQ + offs_m[:, None]
        mask = m_mask[:, None] & c_mask[None, :]
        do = tl.load(GO + ptrs, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(OUT + ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_UNARY:
            o -= tl.load(G + n * CV + offs_c, mask=c_mask, other=0.0)[None, :]
        acc += tl.sum(do * o, 1)
    tl.store(D + n * LQ + offs_m, acc, mask=m_mask)


@triton.jit
def _scores_t(q_base, k_base, MQ, MK, n, offs_m, m_mask, offs_n, n_mask, CK, LQ, LK,
              WHITEN: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              BD: tl.constexpr):
    """Transposed raw scores k~_j . q~_i as a (BN, BM) tile."""
    st = tl.zeros([BN, BM], tl.float32)
    for d0 in range(0, CK, BD):
        offs_d = d0 + tl.arange(0, BD)
        d_mask = offs_d < CK
        kt = _load_whitened(k_base + offs_d[None, :] * LK + offs_n[:, None],
                            n_mask[:, None] & d_mask[None, :], MK + n * CK + offs_d, d_mask,
                            WHITEN, 1)
        qt = _load_whitened(q_base + offs_d[:, None] * LQ + offs_m[None, :],
                            d_mask[:, None] & m_mask[None, :], MQ + n * CK + offs_d, d_mask,
                            WHITEN, 0)
        st += tl.dot(kt, qt, input_precision=PREC)
    return st


@triton.jit
def _bwd_dv_kernel(Q, K, V, U, GO, MQ, MK, LSE, G, LSEU, DV, DUP,
                   CK, CV, LQ, LK, qk_scale, NVB,
                   WHITEN: tl.constexpr, HAS_UNARY: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_v = pid_v * BV + tl.arange(0, BV)
    n_mask = offs_n < LK
    v_mask = offs_v < CV
    q_base = Q + n * CK * LQ
    k_base = K + n * CK * LK
    go_base = GO + n * CV * LQ
    dv = tl.zeros([BN, BV], tl.float32)
    dg = tl.zeros([BV], tl.float32)
    for i0 in range(0, LQ, BM):
        offs_m = i0 + tl.arange(0, BM)
        m_mask = offs_m < LQ
        st = _scores_t(q_base, k_base, MQ, MK, n, offs_m, m_mask, offs_n, n_mask, CK, LQ, LK,
                       WHITEN, PREC, BM, BN, BD)
        lse2 = tl.load(LSE + n * LQ + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
        pt = tl.exp2(st * qk_scale - lse2[None, :])
        do = tl.load(go_base + offs_v[None, :] * LQ + offs_m[:, None],
                     mask=m_mask[:, None] & v_mask[None, :], other=0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        if HAS_UNARY:
            dg += tl.sum(do.to(tl.float32), 0)
    if HAS_UNARY:
        lse_u = tl.load(LSEU + n)
        w = tl.exp(tl.load(U + n * LK + offs_n, mask=n_mask, other=float("-inf")).to(tl.float32) - lse_u)
        dv += w[:, None] * dg[None, :]
        vt = tl.load(V + n * CV * LK + offs_v[None, :] * LK + offs_n[:, None],
                     mask=n_mask[:, None] & v_mask[None, :], other=0.0).to(tl.float32)
        gv = tl.load(G + n * CV + offs_v, mask=v_mask, other=0.0)
        part = tl.sum((vt - gv[None, :]) * dg[None, :], 1)
        tl.store(DUP + (n * NVB + pid_v) * LK + offs_n, part, mask=n_mask)
    tl.store(DV + n * CV * LK + offs_v[None, :] * LK + offs_n[:, None], dv.to(DV.dtype.element_ty),
             mask=n_mask[:, None] & v_mask[None, :])


@triton.jit
def _bwd_dk_kernel(Q, K, V, GO, MQ, MK, LSE, D, DK, COLSUM,
                   CK, CV, LQ, LK, qk_scale, sm_scale,
                   WHITEN: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                   BC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_c * BC + tl.arange(0, BC)
    n_mask = offs_n < LK
    k_mask = offs_k < CK
    q_base = Q + n * CK * LQ
    k_base = K + n * CK * LK
    v_base = V + n * CV * LK
    go_base = GO + n * CV * LQ
    dk = tl.zeros([BN, BC], tl.float32)
    colsum = tl.zeros([BN], tl.float32)
    for i0 in range(0, LQ, BM):
        offs_m = i0 + tl.arange(0, BM)
        m_mask = offs_m < LQ
        st = _scores_t(q_base, k_base, MQ, MK, n, offs_m, m_mask, offs_n, n_mask, CK, LQ, LK,
                       WHITEN, PREC, BM, BN, BD)
        lse2 = tl.load(LSE + n * LQ + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
        pt = tl.exp2(st * qk_scale - lse2[None, :])
        dpt = tl.zeros([BN, BM], tl.float32)
        for c0 in range(0, CV, BV):
            offs_c = c0 + tl.arange(0, BV)
            c_mask = offs_c < CV
            vt = tl.load(v_base + offs_c[None, :] * LK + offs_n[:, None],
                         mask=n_mask[:, None] & c_mask[None, :], other=0.0)
            dot_ = tl.load(go_base + offs_c[:, None] * LQ + offs_m[None, :],
                           mask=c_mask[:, None] & m_mask[None, :], other=0.0)
            dpt += tl.dot(vt, dot_, input_precision=PREC)
        di = tl.load(D + n * LQ + offs_m, mask=m_mask, other=0.0)
        dst = pt * (dpt - di[None, :])
        qt = _load_whitened(q_base + offs_k[None, :] * LQ + offs_m[:, None],
                            m_mask[:, None] & k_mask[None, :], MQ + n * CK + offs_k, k_mask,
                            WHITEN, 1)
        dk += tl.dot(dst.to(qt.dtype), qt, input_precision=PREC)
        colsum += tl.sum(dst, 1)
    tl.store(DK + n * CK * LK + offs_k[None, :] * LK + offs_n[:, None],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])
    tl.store(COLSUM + n * LK + offs_n, colsum, mask=n_mask & (pid_c == 0))


@triton.jit
def _bwd_dq_kernel(Q, K, V, GO, MQ, MK, LSE, D, CORR, DQ,
                   CK, CV, LQ, LK, qk_scale, sm_scale,
                   WHITEN: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                   BC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_c * BC + tl.arange(0, BC)
    m_mask = offs_m < LQ
    k_mask = offs_k < CK
    q_base = Q + n * CK * LQ
    k_base = K + n * CK * LK
    v_base = V + n * CV * LK
    go_base = GO + n * CV * LQ
    lse2 = tl.load(LSE + n * LQ + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
    di = tl.load(D + n * LQ + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BM, BC], tl.float32)
    for j0 in range(0, LK, BN):
        offs_n = j0 + tl.arange(0, BN)
        n_mask = offs_n < LK
        s = tl.zeros([BM, BN], tl.float32)
        for d0 in range(0, CK, BD):
            offs_d = d0 + tl.arange(0, BD)
            d_mask = offs_d < CK
            qt = _load_whitened(q_base + offs_d[None, :] * LQ + offs_m[:, None],
                                m_mask[:, None] & d_mask[None, :], MQ + n * CK + offs_d, d_mask,
                                WHITEN, 1)
            kt = _load_whitened(k_base + offs_d[:, None] * LK + offs_n[None, :],
                                d_mask[:, None] & n_mask[None, :], MK + n * CK + offs_d, d_mask,
                                WHITEN, 0)
            s += tl.dot(qt, kt, input_precision=PREC)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        p = tl.where(n_mask[None, :], p, 0.0)
        dp = tl.zeros([BM, BN], tl.float32)
        for c0 in range(0, CV, BV):
            offs_c = c0 + tl.arange(0, BV)
            c_mask = offs_c < CV
            do = tl.load(go_base + offs_c[None, :] * LQ + offs_m[:, None],
                         mask=m_mask[:, None] & c_mask[None, :], other=0.0)
            vt = tl.load(v_base + offs_c[:, None] * LK + offs_n[None, :],
                         mask=c_mask[:, None] & n_mask[None, :], other=0.0)
            dp += tl.dot(do, vt, input_precision=PREC)
        ds = p * (dp - di[:, None])
        kt2 = _load_whitened(k_base + offs_k[None, :] * LK + offs_n[:, None],
                             n_mask[:, None] & k_mask[None, :], MK + n * CK + offs_k, k_mask,
                             WHITEN, 1)
        dq += tl.dot(ds.to(kt2.dtype), kt2, input_precision=PREC)
    dq = dq * sm_scale
    if WHITEN:
        dq -= tl.load(CORR + n * CK + offs_k, mask=k_mask, other=0.0)[None, :]
    tl.store(DQ + n * CK * LQ + offs_k[None, :] * LQ + offs_m[:, None], dq.to(DQ.dtype.element_ty),
             mask=m_mask[:, None] & k_mask[None, :])


def _p2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def _config(ck: int, cv: int, lq: int, lk: int) -> dict:
    # Tiles: 64 positions, 64-channel reduction chunks, accumulators up to 128 channels wide.
    # tl.dot needs every dim >= 16.
    return dict(BM=_p2(lq, 16, 64), BN=_p2(lk, 16, 64), BD=_p2(ck, 16, 64), BV=_p2(cv, 16, 64),
                BVA=_p2(cv, 16, 128), BC=_p2(ck, 16, 128))


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


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
    cfg = _config(ck, cv, lq, lk)
    mq, mk = _means(query, key, whiten)
    out = torch.empty((n, cv, lq), device=query.device, dtype=value.dtype)
    lse = torch.empty((n, lq), device=query.device, dtype=torch.float32)
    g = torch.zeros((n, cv), device=query.device, dtype=torch.float32)
    lse_u = torch.zeros((n,), device=query.device, dtype=torch.float32)
    has_u = unary is not None
    grid = (triton.cdiv(lq, cfg["BM"]), triton.cdiv(cv, cfg["BVA"]), n)
    _fwd_kernel[grid](query, key, value, unary if has_u else g, mq, mk, out, lse, g, lse_u,
                      ck, cv, lq, lk, s * LOG2E,
                      WHITEN=whiten, HAS_UNARY=has_u, PREC=_prec(query.dtype),
                      BM=cfg["BM"], BN=cfg["BN"], BD=cfg["BD"], BV=cfg["BVA"],
                      num_warps=8 if cfg["BVA"] >= 128 else 4)
    return out, lse, g, lse_u


def backward(grad_out, query, key, value, unary, out, lse, g, lse_u, whiten: bool, s: float):
    _check(query, key, value)
    n, ck, lq = query.shape
    lk, cv = key.shape[2], value.shape[1]
    cfg = _config(ck, cv, lq, lk)
    dev = query.device
    mq, mk = _means(query, key, whiten)
    has_u = unary is not None
    prec = _prec(query.dtype)
    D = torch.empty((n, lq), device=dev, dtype=torch.float32)
    _bwd_preprocess[(triton.cdiv(lq, cfg["BM"]), n)](grad_out, out, g, D, cv, lq, HAS_UNARY=has_u,
                                                     BM=cfg["BM"], BV=cfg["BV"])
    dq = torch.empty_like(query)
    dk = torch.empty_like(key)
    dv = torch.empty_like(value)
    nvb = triton.cdiv(cv, cfg["BVA"])
    dup = torch.empty((n, nvb, lk) if has_u else (1,), device=dev, dtype=torch.float32)
    _bwd_dv_kernel[(triton.cdiv(lk, cfg["BN"]), nvb, n)](
        query, key, value, unary if has_u else g, grad_out, mq, mk, lse, g, lse_u, dv, dup,
        ck, cv, lq, lk, s * LOG2E, nvb,
        WHITEN=whiten, HAS_UNARY=has_u, PREC=prec,
        BM=cfg["BM"], BN=cfg["BN"], BD=cfg["BD"], BV=cfg["BVA"],
        num_warps=8 if cfg["BVA"] >= 128 else 4)
    colsum = torch.empty((n, lk), device=dev, dtype=torch.float32)
    nkb = triton.cdiv(ck, cfg["BC"])
    _bwd_dk_kernel[(triton.cdiv(lk, cfg["BN"]), nkb, n)](
        query, key, value, grad_out, mq, mk, lse, D, dk, colsum,
        ck, cv, lq, lk, s * LOG2E, s,
        WHITEN=whiten, PREC=prec, BM=cfg["BM"], BN=cfg["BN"], BD=cfg["BD"], BV=cfg["BV"],
        BC=cfg["BC"], num_warps=8 if cfg["BC"] >= 128 else 4)
    if whiten:
        # mean_i dq~_i = (s / Lq) * sum_j colsum_j (k_j - mu_k)
        kc = torch.bmm(key.float(), colsum.unsqueeze(-1)).squeeze(-1) - mk * colsum.sum(-1, keepdim=True)
        corr = (kc * (s / lq)).contiguous()
    else:
        corr = mq
    _bwd_dq_kernel[(triton.cdiv(lq, cfg["BM"]), nkb, n)](
        query, key, value, grad_out, mq, mk, lse, D, corr, dq,
        ck, cv, lq, lk, s * LOG2E, s,
        WHITEN=whiten, PREC=prec, BM=cfg["BM"], BN=cfg["BN"], BD=cfg["BD"], BV=cfg["BV"],
        BC=cfg["BC"], num_warps=8 if cfg["BC"] >= 128 else 4)
    if has_u:
        w = torch.exp(unary.float() - lse_u[:, None])
        du = (w * dup.sum(1)).to(unary.dtype)
    else:
        du = query.new_empty((0,))
    return dq, dk, dv, du
