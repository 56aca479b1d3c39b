"""Interlaced sparse self-attention (docs/operators.md §2.2): Triton forward and backward kernels + launchers.

Flash-attention style, straight on the (N, C, H, W) layout: a program owns a tile of one group's
members (one sample, one group) and reads the group's pixels in place by index arithmetic
(`group_member_offset`), so there is no permuted copy and no attention matrix in global memory.
Forward: online softmax over key tiles (exp2 domain), the per-position log-sum-exp saved (fp32).
Backward: delta = <dO, O> per position, then separate dQ, dK and dV kernels that recompute the
probabilities from the saved lse. Each program also owns one chunk of its output channels (so
Ck, Cv up to 512 fit in registers); the logits are rebuilt per chunk by looping over channels.
Optional additive logit terms (window attention): bias[n % nb, i, j] and mask[g % nm, i, j],
loaded per tile pair under constexpr flags (without them the kernels compile as before); the
dQ kernel's first channel chunk adds dS into an fp32 grad_bias buffer with atomics.

Tensors in, tensors out; no registration here (segops/ops/interlaced_sparse_attention.py does it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from segops.triton._common import (LN2, LOG2E, NEG_INF, Target, channel_dot, dot_precision,
                                   load_tile, log2_scale, pow2_clamp, register_tiles, store_tile,
                                   target_of)


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
    PACKED (small groups, LP = nextpow2_clamp(L) <= BLOCK / 2): BLOCK // LP whole groups per tile,
    row r -> group pid * (BLOCK // LP) + r // LP, member r % LP.
    Returns (flat group index per row, member index, validity, offsets into a Ck-channel tensor
    at channel 0, offsets into a Cv-channel tensor at channel 0).
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
    return ng, m, valid, n * CK * HW + pix, n * CV * HW + pix


@triton.jit
def _own_rows(NG, G, L, CK, CV, HW, W, GW, PH, PW,
              BLOCK: tl.constexpr, LP: tl.constexpr, PACKED: tl.constexpr, LONG: tl.constexpr):
    """_rows of this program's tile: group tile program_id(0), member tile program_id(1)."""
    return _rows(tl.program_id(0), tl.program_id(1) * BLOCK, NG, G, L, CK, CV, HW, W, GW, PH, PW,
                 BLOCK, LP, PACKED, LONG)


@triton.jit
def _channel_block(C, BLOCK_C: tl.constexpr):
    """This program's block of output channels (program_id(2)) and its mask."""
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    return offs_c, offs_c < C


@triton.jit
def _logits(A, B, rows_a, rows_b, mask_a, mask_b, C, HW,
            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
            PREC: tl.constexpr):
    """sum_c A[c, rows_a] * B[c, rows_b] -> (BLOCK_A, BLOCK_B) fp32, over C in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, C, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < C
        a = load_tile(A, rows_a, offs_d, mask_a, mask_d, HW, False)
        b = load_tile(B, rows_b, offs_d, mask_b, mask_d, HW, True)
        acc += tl.dot(a, b, input_precision=PREC)
    return acc


@triton.jit
def _attends(ng_m, mask_m, ng_n, mask_n, PACKED: tl.constexpr):
    """Which (query, key) pairs of a tile attend: both valid and, in PACKED tiles, one group's."""
    attend = mask_m[:, None] & mask_n[None, :]
    if PACKED:
        attend = attend & (ng_m[:, None] == ng_n[None, :])
    return attend


@triton.jit
def _pair_offsets(mem_m, mem_n, L):
    """Offsets of the entries (i, j) of an L x L matrix for a tile's (query, key) members."""
    return mem_m.to(tl.int64)[:, None] * L + mem_n[None, :]


@triton.jit
def _term_matrix(T, ng_m, G, COUNT, L, BY_SAMPLE: tl.constexpr, PACKED: tl.constexpr):
    """Start of each query row's matrix of a (COUNT, L, L) term: [n % COUNT] (BY_SAMPLE, the
    bias) or [g % COUNT] (the mask). Unpacked tiles hold one group (program_id(0)): one scalar
    start, so that the pair offsets are shared by both terms and no offset tile is per row."""
    if PACKED:
        ng = ng_m
    else:
        ng = tl.program_id(0)
    if BY_SAMPLE:
        matrix = (ng // G) % COUNT
    else:
        matrix = (ng % G) % COUNT
    start = T + matrix.to(tl.int64) * L * L
    if PACKED:
        start = start[:, None]
    return start


@triton.jit
def _load_term(T, ng_m, mem_m, mem_n, attend, q_start, k_start, G, COUNT, L,
               BY_SAMPLE: tl.constexpr, PACKED: tl.constexpr, BLOCK: tl.constexpr):
    """A term's entries at a (queries x keys) tile's attending pairs, fp32 in log2 units (0
    elsewhere). Unpacked tiles are the block (q_start.., k_start..) of one matrix: a block
    pointer, with no per-element offset tile held in registers (those spilled on sm_90)."""
    start = _term_matrix(T, ng_m, G, COUNT, L, BY_SAMPLE, PACKED)
    if PACKED:
        term = tl.load(start + _pair_offsets(mem_m, mem_n, L), mask=attend, other=0.0)
    else:
        block = tl.make_block_ptr(start, (L, L), (L, 1), (q_start, k_start), (BLOCK, BLOCK), (1, 0))
        term = tl.load(block, boundary_check=(0, 1), padding_option="zero")
    return term.to(tl.float32) * LOG2E


@triton.jit
def _scaled_logits(Q, K, BIAS, MASK, ng_m, mem_m, mask_m, qrow, ng_n, mem_n, mask_n, krow,
                   q_start, k_start, G, L, CK, HW, NB, NM, qk_scale, PACKED: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """log2-domain logits of a (queries x keys) tile, scale q.k + bias[n % NB] + mask[g % NM]
    (the terms present), -inf where a pair does not attend. The forward and every backward
    kernel compute them with this one function. q_start, k_start: the first query and key
    member of an unpacked tile."""
    s = _logits(Q, K, qrow, krow, mask_m, mask_n, CK, HW, BLOCK, BLOCK, BLOCK_D, PREC) * qk_scale
    attend = _attends(ng_m, mask_m, ng_n, mask_n, PACKED)
    if HAS_BIAS:
        s += _load_term(BIAS, ng_m, mem_m, mem_n, attend, q_start, k_start, G, NB, L, True,
                        PACKED, BLOCK)
    if HAS_MASK:
        s += _load_term(MASK, ng_m, mem_m, mem_n, attend, q_start, k_start, G, NM, L, False,
                        PACKED, BLOCK)
    return tl.where(attend, s, NEG_INF)


# ------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_kernel(Q, K, V, BIAS, MASK, O, LSE, NG, G, L, CK, CV, HW, W, GW, PH, PW, NT, NB, NM,
                qk_scale, LONG: tl.constexpr, PACKED: tl.constexpr, LP: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
    ng_m, mem_m, mask_m, qrow, vrow = _own_rows(NG, G, L, CK, CV, HW, W, GW, PH, PW, BLOCK, LP,
                                                PACKED, LONG)
    offs_c, mask_c = _channel_block(CV, BLOCK_C)
    m_i = tl.full((BLOCK,), NEG_INF, dtype=tl.float32)
    l_i = tl.zeros((BLOCK,), dtype=tl.float32)
    acc = tl.zeros((BLOCK, BLOCK_C), dtype=tl.float32)
    for t in range(0, NT):  # key tiles (1 when PACKED: the tile's own groups)
        ng_n, mem_n, mask_n, krow, vrow_n = _rows(tl.program_id(0), t * BLOCK, NG, G, L, CK, CV,
                                                  HW, W, GW, PH, PW, BLOCK, LP, PACKED, LONG)
        s = _scaled_logits(Q, K, BIAS, MASK, ng_m, mem_m, mask_m, qrow, ng_n, mem_n, mask_n, krow,
                           tl.program_id(1) * BLOCK, t * BLOCK, G, L, CK, HW, NB, NM, qk_scale,
                           PACKED, HAS_BIAS, HAS_MASK, BLOCK, BLOCK_D, PREC)
        # Rows with no key stay finite; masked logits never come near -1e30 (the ops layer
        # raises mask entries to MASK_FLOOR).
        m_new = tl.maximum(tl.maximum(m_i, tl.max(s, 1)), -1e30)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(V, vrow_n, offs_c, mask_n, mask_c, HW, False)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(mask_m, l_i, 1.0)
    store_tile(O, vrow, offs_c, mask_m, mask_c, HW, acc / l_safe[:, None])
    if tl.program_id(2) == 0:
        # Natural-log lse of the scaled logits, stored at (n, y, x) = vrow's pixel: the LSE
        # tensor is (N, H, W), so its row offset is the Ck = 1 offset.
        lse_row = (qrow // HW // CK) * HW + qrow % HW
        tl.store(LSE + lse_row, (m_i + tl.log2(l_safe)) * LN2, mask=mask_m)


# ------------------------------------------------------------------------------ backward
@triton.jit
def _stats(LSE, DELTA, qrow, mask, CK, HW):
    """(lse in log2 units, delta) of query rows."""
    row = (qrow // HW // CK) * HW + qrow % HW
    lse2 = tl.load(LSE + row, mask=mask, other=0.0) * LOG2E
    delta = tl.load(DELTA + row, mask=mask, other=0.0)
    return lse2, delta


@triton.jit
def _probs_and_grads(Q, K, V, DO, LSE, DELTA, BIAS, MASK, ng_m, mem_m, mask_m, qrow, vrow, ng_n,
                     mem_n, mask_n, krow, vrow_n, q_start, k_start, G, L, CK, CV, HW, NB, NM,
                     qk_scale,
                     PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                     GRADS: tl.constexpr):
    """P of a (queries x keys) tile from the saved lse and, when GRADS, dS = P (dP - delta)
    (the logit gradient, before the factor `scale`); else dS is P."""
    lse2, delta = _stats(LSE, DELTA, qrow, mask_m, CK, HW)
    s = _scaled_logits(Q, K, BIAS, MASK, ng_m, mem_m, mask_m, qrow, ng_n, mem_n, mask_n, krow,
                       q_start, k_start, G, L, CK, HW, NB, NM, qk_scale, PACKED, HAS_BIAS,
                       HAS_MASK, BLOCK, BLOCK_D, PREC)
    p = tl.exp2(s - lse2[:, None])
    ds = p
    if GRADS:
        dp = _logits(DO, V, vrow, vrow_n, mask_m, mask_n, CV, HW, BLOCK, BLOCK, BLOCK_D, PREC)
        ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, BIAS, MASK, DQ, DBIAS, NG, G, L, CK, CV, HW, W, GW,
                   PH, PW, NT, NB, NM, scale, qk_scale, LONG: tl.constexpr, PACKED: tl.constexpr,
                   LP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                   BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                   PREC: tl.constexpr):
    """dQ[:, i] = scale * sum_j P_ij (dP_ij - delta_i) K[:, j], for one chunk of Ck; with a
    bias, the first chunk's programs also add dS_ij into DBIAS[n % NB, i, j] (fp32)."""
    ng_m, mem_m, mask_m, qrow, vrow = _own_rows(NG, G, L, CK, CV, HW, W, GW, PH, PW, BLOCK, LP,
                                                PACKED, LONG)
    offs_c, mask_c = _channel_block(CK, BLOCK_C)
    acc = tl.zeros((BLOCK, BLOCK_C), dtype=tl.float32)
    for t in range(0, NT):
        ng_n, mem_n, mask_n, krow, vrow_n = _rows(tl.program_id(0), t * BLOCK, NG, G, L, CK, CV,
                                                  HW, W, GW, PH, PW, BLOCK, LP, PACKED, LONG)
        p, ds = _probs_and_grads(Q, K, V, DO, LSE, DELTA, BIAS, MASK, ng_m, mem_m, mask_m, qrow,
                                 vrow, ng_n, mem_n, mask_n, krow, vrow_n, tl.program_id(1) * BLOCK,
                                 t * BLOCK, G, L, CK, CV, HW, NB, NM, qk_scale, PACKED, HAS_BIAS,
                                 HAS_MASK, BLOCK, BLOCK_D, PREC, True)
        if HAS_BIAS:
            attend = _attends(ng_m, mask_m, ng_n, mask_n, PACKED) & (tl.program_id(2) == 0)
            dbias = _term_matrix(DBIAS, ng_m, G, NB, L, True, PACKED)
            tl.atomic_add(dbias + _pair_offsets(mem_m, mem_n, L), ds, mask=attend)
        k = load_tile(K, krow, offs_c, mask_n, mask_c, HW, False)
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    store_tile(DQ, qrow, offs_c, mask_m, mask_c, HW, acc * scale)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, BIAS, MASK, DKV, NG, G, L, CK, CV, HW, W, GW, PH,
                     PW, NT, NB, NM, scale, qk_scale, LONG: tl.constexpr, PACKED: tl.constexpr,
                     LP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                     PREC: tl.constexpr, DV: tl.constexpr):
    """One chunk of dK (DV=False) or dV (DV=True) for a tile of keys:
    dK[:, j] = scale * sum_i P_ij (dP_ij - delta_i) Q[:, i];  dV[:, j] = sum_i P_ij dO[:, i]."""
    ng_n, mem_n, mask_n, krow, vrow_n = _own_rows(NG, G, L, CK, CV, HW, W, GW, PH, PW, BLOCK, LP,
                                                  PACKED, LONG)
    offs_c, mask_c = _channel_block(CV if DV else CK, BLOCK_C)
    acc = tl.zeros((BLOCK, BLOCK_C), dtype=tl.float32)
    for t in range(0, NT):  # query tiles
        ng_m, mem_m, mask_m, qrow, vrow = _rows(tl.program_id(0), t * BLOCK, NG, G, L, CK, CV,
                                                HW, W, GW, PH, PW, BLOCK, LP, PACKED, LONG)
        p, ds = _probs_and_grads(Q, K, V, DO, LSE, DELTA, BIAS, MASK, ng_m, mem_m, mask_m, qrow,
                                 vrow, ng_n, mem_n, mask_n, krow, vrow_n, t * BLOCK,
                                 tl.program_id(1) * BLOCK, G, L, CK, CV, HW, NB, NM, qk_scale,
                                 PACKED, HAS_BIAS, HAS_MASK, BLOCK, BLOCK_D, PREC, not DV)
        if DV:
            do = load_tile(DO, vrow, offs_c, mask_m, mask_c, HW, False)
            acc += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
        else:
            q = load_tile(Q, qrow, offs_c, mask_m, mask_c, HW, False)
            acc += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    if DV:
        store_tile(DKV, vrow_n, offs_c, mask_n, mask_c, HW, acc)
    else:
        store_tile(DKV, krow, offs_c, mask_n, mask_c, HW, acc * scale)


# ------------------------------------------------------------------------------ launchers
def config(ck: int, cv: int, members: int, dtype: torch.dtype, target: Target,
           terms: bool = False) -> dict:
    """Tiles and launch options of the forward ("fwd") and the dq, dk, dv backward kernels for
    groups of `members` pixels: BLOCK-row tiles (whole groups packed into one tile when a group
    fills at most half of it), BLOCK_D-channel reduction chunks, output channels in chunks.
    Interpreter: 64 rows, 64-channel chunks, 128 output channels for fwd and dv. On a GPU the
    logit tiles, the output accumulator and the int64 row offsets of the group gather must fit
    in registers (scripts/check_triton_compile.py found up to 2.5 KB spilled at 4 warps and
    128-channel chunks): 8 warps, 64 output channels, 32-channel reduction chunks on sm_80, and
    for fp32 32-row tiles and no software pipelining, the forward and dq at 4 warps (at 8 the
    group gather's index arithmetic did not fit ptxas's 128-register budget). With bias / mask
    `terms` in fp32, dk and dv also run at 4 warps and dq in 16-channel chunks (the term tiles
    spilled at the Swin benchmark shape otherwise)."""
    kind = register_tiles(dtype, target)
    block, chunk, out_wide = dict(interpreter=(64, 64, 128), fp32=(32, 32, 64), mma=(64, 32, 64),
                                  wgmma=(64, 64, 64))[kind]
    lp = triton.next_power_of_2(members)
    tiles = dict(BLOCK=block, LP=lp, PACKED=2 * lp <= block,
                 BLOCK_D=pow2_clamp(min(ck, cv), 16, chunk))
    stages = 1 if kind == "fp32" else 2
    by_row = target.launch(4 if kind == "fp32" else 8, stages)  # fwd, dq: one program per query tile
    narrow = kind == "fp32" and terms
    by_key = target.launch(4 if narrow else 8, stages)
    return dict(fwd=dict(tiles, BLOCK_C=pow2_clamp(cv, 16, out_wide), **by_row),
                dq=dict(tiles, BLOCK_C=pow2_clamp(ck, 16, 16 if narrow else 64), **by_row),
                dk=dict(tiles, BLOCK_C=pow2_clamp(ck, 16, 64), **by_key),
                dv=dict(tiles, BLOCK_C=pow2_clamp(cv, 16, out_wide), **by_key))


class _Plan:
    """One call: its kernel configs, the packing of small groups, the grid over (group tiles,
    member tiles, channel chunks), the shared kernel arguments and the logit terms present."""

    def __init__(self, query, value, bias, mask, ph, pw, long):
        n, ck, h, w = query.shape
        self.ck, self.cv = ck, value.shape[1]
        self.groups, self.L = group_counts(h, w, ph, pw, long)
        self.ng = n * self.groups
        self.cfg = config(ck, self.cv, self.L, query.dtype, target_of(query),
                          terms=bias is not None or mask is not None)
        tiles = self.cfg["fwd"]
        if tiles["PACKED"]:  # whole groups per tile, keys = the tile's own groups
            self.group_tiles = triton.cdiv(self.ng, tiles["BLOCK"] // tiles["LP"])
            self.member_tiles = 1
        else:
            self.group_tiles, self.member_tiles = self.ng, triton.cdiv(self.L, tiles["BLOCK"])
        self.args = (self.ng, self.groups, self.L, ck, self.cv, h * w, w, w // pw, ph, pw,
                     self.member_tiles, _matrices(bias), _matrices(mask))
        self.meta = dict(LONG=bool(long), PREC=dot_precision(query.dtype),
                         HAS_BIAS=bias is not None, HAS_MASK=mask is not None)
        # Absent terms are never read: any tensor stands in for their pointers.
        self.terms = tuple(query if t is None else t.contiguous() for t in (bias, mask))

    def launch(self, kernel, which: str, channels: int, tensors: tuple, scalars: tuple, **meta):
        """kernel(*tensors, *the shared arguments, *scalars) with config `which`, over
        `channels` output channels."""
        cfg = self.cfg[which]
        grid = (self.group_tiles, self.member_tiles, triton.cdiv(channels, cfg["BLOCK_C"]))
        kernel[grid](*tensors, *self.args, *scalars, **self.meta, **cfg, **meta)


def _matrices(term) -> int:
    """Leading size of an optional (n, L, L) bias or mask (1 when absent)."""
    return 1 if term is None else term.shape[0]


def forward(query, key, value, bias, mask, ph: int, pw: int, long: bool, scale: float):
    """-> (out (N, Cv, H, W), lse (N, H, W) fp32, natural log of the sums of exp(logits)).
    bias (nb, L, L), mask (nm, L, L): optional logit terms of sample n % nb, group g % nm."""
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    n, ck, h, w = q.shape
    out = torch.empty((n, v.shape[1], h, w), device=v.device, dtype=v.dtype)
    lse = torch.empty((n, h, w), device=q.device, dtype=torch.float32)
    if out.numel() == 0 or lse.numel() == 0:
        return out, lse
    plan = _Plan(q, v, bias, mask, ph, pw, long)
    plan.launch(_fwd_kernel, "fwd", plan.cv, (q, k, v, *plan.terms, out, lse),
                (log2_scale(scale),))
    return out, lse


def backward(grad_out, query, key, value, bias, mask, out, lse, ph: int, pw: int, long: bool,
             scale: float):
    """-> (dquery, dkey, dvalue, dbias), recomputing the probabilities from `lse`; dbias is
    summed in fp32 and returned in bias's dtype, an empty (0,) tensor without a bias."""
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    do, o, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    n, ck, h, w = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias_acc = (torch.zeros(bias.shape, device=q.device, dtype=torch.float32)
                 if bias is not None else q.new_empty((0,)))
    if q.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias_acc.to(q.dtype)
    plan = _Plan(q, v, bias, mask, ph, pw, long)
    delta = channel_dot(o, do)
    common = (q, k, v, do, lse, delta, *plan.terms)
    scales = (float(scale), log2_scale(scale))
    plan.launch(_bwd_dq_kernel, "dq", ck, (*common, dq, dbias_acc if bias is not None else dq),
                scales)
    plan.launch(_bwd_dkdv_kernel, "dk", ck, (*common, dk), scales, DV=False)
    plan.launch(_bwd_dkdv_kernel, "dv", plan.cv, (*common, dv), scales, DV=True)
    return dq, dk, dv, dbias_acc.to(q.dtype)


__all__ = ["forward", "backward", "group_member_offset", "group_counts"]
