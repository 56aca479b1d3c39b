"""`segops.interlaced_sparse_attention` (docs/operators.md §2.2): description, validation, public
function.

The fused forward returns (out, lse): lse is the per-position softmax log-sum-exp (N, H, W) of
the full logits (scaled products plus bias and mask; natural log), fp32 (fp64 for fp64 inputs):
all the backward needs besides the inputs and the output. The backward returns (grad_query,
grad_key, grad_value, grad_bias), grad_bias empty when there is no bias; the mask is constant.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from segops.ops import _spec
from segops.ops import _validate as V
from segops.ops._spec import ErrorSample, OpSpec, Sample
from segops.reference.interlaced_sparse_attention import MODES
from segops.reference.interlaced_sparse_attention import \
    interlaced_sparse_attention as _reference

OP = "interlaced_sparse_attention"

# Mask entries below this (-inf included) are raised to it before any backend runs (no host
# sync), so the kernels see finite logits. exp(-1000) is 0 in every dtype, fp64 included, so such
# an entry drops its key exactly whenever its row has a key within ~100 of the row's largest
# logit; and -1000 plus a logit keeps ~6e-5 absolute precision in fp32, so the backward still
# recovers the probabilities from the saved log-sum-exp. (finfo.min / 2 would swallow the logits
# and the log-sum-exp's log(L) alike, and the backward would see every probability of a fully
# masked row as 1.) A row masked entirely has every logit shifted by the same constant: it
# attends as if unmasked.
MASK_FLOOR = -1000.0


def _fake(query, key, value, bias, mask, ph, pw, long, scale):
    n, _, h, w = query.shape
    return (value.new_empty((n, value.shape[1], h, w)),
            query.new_empty((n, h, w), dtype=V.accumulation_dtype(query.dtype)))


def _group_counts(h, w, block, mode):
    """(G, L): groups per sample and members per group."""
    inner, outer = block[0] * block[1], (h // block[0]) * (w // block[1])
    return (inner, outer) if mode == "long" else (outer, inner)


def _window_mask(g, nm, members, regions=3):
    """A shifted-window-like mask (nm, L, L): 0 between members of one region, -100 across."""
    label = torch.randint(regions, (nm, members, 1), generator=g)
    return torch.where(label == label.transpose(1, 2), 0.0, -100.0).double()


def _qkv(g, name, shape, block, mode, scale=1.0, logit_scale=None, gradcheck=False,
         bias_heads=0, mask_windows=0):
    """bias_heads: nb of a (nb, L, L) bias (0: none); mask_windows: nm of a 0/-100 mask."""
    n, ck, cv, h, w = shape
    kwargs = dict(block_size=block, mode=mode)
    if logit_scale is not None:
        kwargs["scale"] = logit_scale
    tensors = dict(query=_spec.randn(g, n, ck, h, w, scale=scale),
                   key=_spec.randn(g, n, ck, h, w, scale=scale),
                   value=_spec.randn(g, n, cv, h, w))
    members = _group_counts(h, w, block, mode)[1]
    if bias_heads:
        tensors["bias"] = _spec.randn(g, bias_heads, members, members)
    if mask_windows:
        tensors["mask"] = _window_mask(g, mask_windows, members)
    grads = tuple(k for k in tensors if k != "mask")
    return Sample(f"{name}_{mode}", tensors, kwargs, grads=grads, gradcheck=gradcheck)


def _large_samples():
    g = torch.Generator().manual_seed(1)
    return [_qkv(g, "large", (2, 64, 80, 40, 48), (8, 8), "long"),
            _qkv(g, "large", (2, 64, 80, 40, 48), (4, 6), "short")]


def _samples():
    g = torch.Generator().manual_seed(0)

    def qkv(*args, **kwargs):
        return _qkv(g, *args, **kwargs)
    out = []
    for mode in MODES:
        out += [qkv("batch2_uneven_block", (2, 4, 3, 8, 12), (4, 2), mode),
                qkv("small", (2, 2, 2, 2, 6), (2, 3), mode, scale=0.5, gradcheck=True),
                qkv("default_block", (1, 3, 5, 16, 8), (8, 8), mode),
                qkv("unit_block", (1, 5, 4, 6, 10), (1, 1), mode),
                qkv("whole_map_block", (1, 4, 3, 6, 10), (6, 10), mode),
                qkv("one_pixel", (1, 3, 2, 1, 1), (1, 1), mode),
                qkv("empty_batch", (0, 4, 3, 4, 4), (2, 2), mode),
                qkv("empty_map", (1, 4, 3, 0, 4), (2, 2), mode),
                qkv("no_key_channels", (1, 0, 3, 4, 4), (2, 2), mode)]
    out += [qkv("two_key_tiles", (1, 20, 24, 10, 10), (10, 10), "short"),
            qkv("group_of_256", (1, 40, 72, 16, 16), (16, 16), "short"),
            qkv("channel_chunks", (1, 512, 512, 4, 8), (4, 4), "short"),
            qkv("large_logits", (1, 4, 3, 4, 6), (2, 2), "long", scale=3.0, logit_scale=2.5)]
    for mode in MODES:
        # (N, Ck, Cv, H, W), block: long groups = 8 (L = 12), short groups = 12 (L = 8).
        out += [qkv("bias", (6, 4, 3, 8, 12), (4, 2), mode, bias_heads=3),
                qkv("mask", (2, 4, 3, 8, 12), (4, 2), mode, mask_windows=4),
                qkv("bias_and_mask", (4, 4, 3, 8, 12), (4, 2), mode, bias_heads=2,
                    mask_windows=_group_counts(8, 12, (4, 2), mode)[0]),
                qkv("bias_one_head", (2, 5, 4, 4, 6), (2, 3), mode, bias_heads=1, mask_windows=2),
                qkv("small_bias_mask", (2, 2, 2, 2, 6), (2, 3), mode, scale=0.5, gradcheck=True,
                    bias_heads=2, mask_windows=2),
                qkv("empty_batch_bias_mask", (0, 4, 3, 4, 4), (2, 2), mode, bias_heads=3,
                    mask_windows=2)]
    # Swin-like: 3 heads x batch 2, 4x4 windows of 16 tokens over an 8x12 map, shift mask per window.
    out += [qkv("swin_windows", (6, 8, 8, 8, 12), (4, 4), "short", bias_heads=3, mask_windows=6),
            qkv("bias_two_key_tiles", (2, 20, 24, 10, 14), (10, 14), "short", bias_heads=2,
                mask_windows=1)]
    return out


def _error_samples():
    # Valid call: query/key (2, 4, 8, 12), value (2, 3, 8, 12), block (4, 2).
    return _spec.qkv_error_samples(2, 4, 3, 8, 12) + [
        ErrorSample("block_not_dividing", dict(block_size=(3, 2)), r"divisible by `block_size`"),
        ErrorSample("block_zero", dict(block_size=(2, 0)), "`block_size` must be"),
        ErrorSample("block_rank", dict(block_size=(2, 2, 2)), "`block_size` must be"),
        ErrorSample("block_float", dict(block_size=2.0), "`block_size` must be"),
        ErrorSample("mode", dict(mode="medium"), "`mode` must be"),
        ErrorSample("scale_nan", dict(scale=float("nan")), "`scale` must be"),
        # long mode, block (4, 2): G = 8 groups of L = 12 members.
        ErrorSample("bias_rank", dict(bias=torch.randn(12, 12)), "`bias` must be 3-D"),
        ErrorSample("bias_members", dict(bias=torch.randn(2, 12, 11)), "`bias` must have"),
        ErrorSample("bias_heads_not_dividing", dict(bias=torch.randn(3, 12, 12)),
                    r"`bias`.*divide"),
        ErrorSample("bias_no_heads", dict(bias=torch.randn(0, 12, 12)), r"`bias`.*divide"),
        ErrorSample("bias_dtype", dict(bias=torch.randn(2, 12, 12, dtype=torch.float64)), "dtype"),
        ErrorSample("mask_members", dict(mask=torch.randn(8, 11, 12)), "`mask` must have"),
        ErrorSample("mask_windows_not_dividing", dict(mask=torch.randn(3, 12, 12)),
                    r"`mask`.*divide"),
        ErrorSample("mask_dtype", dict(mask=torch.zeros(8, 12, 12, dtype=torch.float16)), "dtype"),
        ErrorSample("mask_not_a_tensor", dict(mask=[[0.0]]), "must be a torch.Tensor", TypeError),
    ]


SPEC = _spec.define(OpSpec(
    name=OP, public=1,
    inputs=("query", "key", "value", "bias?", "mask?"),
    params=(("ph", int), ("pw", int), ("long", bool), ("scale", float)),
    results=("out", "lse"), saves=("query", "key", "value", "bias", "mask", "out", "lse"),
    differentiable=("query", "key", "value", "bias"), fake=_fake,
    make=_qkv, samples=_samples, error_samples=_error_samples, large_samples=_large_samples,
    reference=_reference))


def _block_size(block_size) -> tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    ok = (isinstance(block_size, Sequence) and len(block_size) == 2
          and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block_size))
    if not ok:
        raise ValueError(f"segops.{OP}: `block_size` must be a positive int or a pair of positive "
                         f"ints (Ph, Pw), got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def _check_logit_term(name: str, t: Tensor, query: Tensor, members: int, count: int,
                      what: str) -> None:
    """bias / mask: (k, L, L) with k dividing `count` (N for the bias, G for the mask)."""
    V.check_tensor(OP, name, t, ndim=3)
    V.check_same_device_dtype(OP, query=query, **{name: t})
    V.check_dims(OP, name, t, (1, 2), (members, members), "(L, L) = members per group squared")
    if t.shape[0] == 0 or count % t.shape[0]:
        raise ValueError(f"segops.{OP}: the first dim of `{name}` ({t.shape[0]}) must divide the "
                         f"number of {what} ({count}): {what[:-1]} i uses {name}[i % "
                         f"{name}.shape[0]]")


def _validate(query: Tensor, key: Tensor, value: Tensor, block_size, mode, scale, bias, mask):
    V.check_qkv(OP, query, key, value)
    ph, pw = _block_size(block_size)
    if mode not in MODES:
        raise ValueError(f"segops.{OP}: `mode` must be 'long' or 'short', got {mode!r}")
    h, w = query.shape[2:]
    if h % ph or w % pw:
        raise ValueError(f"segops.{OP}: the map size (H, W) = ({h}, {w}) must be divisible by "
                         f"`block_size` (Ph, Pw) = ({ph}, {pw}); pad the input (the "
                         "InterlacedSparseAttention module does)")
    if scale is not None:
        V.check_finite_number(OP, "scale", scale)
    groups, members = _group_counts(h, w, (ph, pw), mode)
    if bias is not None:
        _check_logit_term("bias", bias, query, members, query.shape[0], "samples")
    if mask is not None:
        _check_logit_term("mask", mask, query, members, groups, "groups")
    return ph, pw


def interlaced_sparse_attention(query: Tensor, key: Tensor, value: Tensor,
                                block_size=(8, 8), mode: str = "long", *,
                                scale: Optional[float] = None, bias: Optional[Tensor] = None,
                                mask: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Interlaced sparse self-attention: dense attention inside each group of positions.

    query, key: (N, Ck, H, W); value: (N, Cv, H, W) -> (N, Cv, H, W), with H % Ph == 0 and
    W % Pw == 0 for block_size = (Ph, Pw). mode="long": groups of positions with equal
    (y mod Ph, x mod Pw); mode="short": the contiguous Ph x Pw blocks. With L members and G
    groups per sample, logits[n, g, i, j] = scale * <q_i, k_j> + bias[n % nb, i, j]
    + mask[g % nm, i, j]; `out_i = sum_j softmax_j(logits) v_j`, scale = Ck**-0.5 when None.
    bias (nb, L, L) receives a gradient (window attention: the relative position bias, with
    the heads folded into N); mask (nm, L, L) is constant, -inf allowed (a row masked
    entirely attends as if unmasked; see MASK_FLOOR).
    """
    ph, pw = _validate(query, key, value, block_size, mode, scale, bias, mask)
    ck = query.shape[1]
    if scale is None:
        scale = ck ** -0.5 if ck > 0 else 1.0
    scale = float(scale)
    if mask is not None:
        mask = mask.detach().clamp_min(MASK_FLOOR)
    name = SPEC.select(backend, query)
    if name == "reference":
        return _reference(query, key, value, (ph, pw), mode, scale=scale, bias=bias, mask=mask)
    query, key = _spec.logits_need_a_channel(query, key)
    return SPEC.fused(name, query, key, value, bias, mask, ph, pw, mode == "long", scale)


SPEC.function = interlaced_sparse_attention
