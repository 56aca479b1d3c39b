"""`segops.interlaced_sparse_attention` (docs/operators.md §2.2): description, validation, public
function.

The fused forward returns (out, lse): lse is the per-position softmax log-sum-exp (N, H, W) of
the scaled logits (natural log), fp32 (fp64 for fp64 inputs): all the backward needs besides
the inputs and the output.
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


def _fake(query, key, value, ph, pw, long, scale):
    n, _, h, w = query.shape
    return (value.new_empty((n, value.shape[1], h, w)),
            query.new_empty((n, h, w), dtype=V.accumulation_dtype(query.dtype)))


def _qkv(g, name, shape, block, mode, scale=1.0, logit_scale=None, gradcheck=False):
    n, ck, cv, h, w = shape
    kwargs = dict(block_size=block, mode=mode)
    if logit_scale is not None:
        kwargs["scale"] = logit_scale
    return Sample(f"{name}_{mode}", dict(query=_spec.randn(g, n, ck, h, w, scale=scale),
                                         key=_spec.randn(g, n, ck, h, w, scale=scale),
                                         value=_spec.randn(g, n, cv, h, w)),
                  kwargs, grads=("query", "key", "value"), gradcheck=gradcheck)


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
    ]


SPEC = _spec.define(OpSpec(
    name=OP, public=1,
    inputs=("query", "key", "value"),
    params=(("ph", int), ("pw", int), ("long", bool), ("scale", float)),
    results=("out", "lse"), saves=("query", "key", "value", "out", "lse"),
    differentiable=("query", "key", "value"), fake=_fake,
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


def _validate(query: Tensor, key: Tensor, value: Tensor, block_size, mode, scale):
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
    return ph, pw


def interlaced_sparse_attention(query: Tensor, key: Tensor, value: Tensor,
                                block_size=(8, 8), mode: str = "long", *,
                                scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Interlaced sparse self-attention: dense attention inside each group of positions.

    query, key: (N, Ck, H, W); value: (N, Cv, H, W) -> (N, Cv, H, W), with H % Ph == 0 and
    W % Pw == 0 for block_size = (Ph, Pw). mode="long": groups of positions with equal
    (y mod Ph, x mod Pw); mode="short": the contiguous Ph x Pw blocks.
    `out_i = sum_{j in g(i)} softmax_j(scale * <q_i, k_j>) v_j`, scale = Ck**-0.5 when None.
    """
    ph, pw = _validate(query, key, value, block_size, mode, scale)
    ck = query.shape[1]
    if scale is None:
        scale = ck ** -0.5 if ck > 0 else 1.0
    scale = float(scale)
    name = SPEC.select(backend, query)
    if name == "reference":
        return _reference(query, key, value, (ph, pw), mode, scale=scale)
    query, key = _spec.logits_need_a_channel(query, key)
    return SPEC.fused(name, query, key, value, ph, pw, mode == "long", scale)


SPEC.function = interlaced_sparse_attention
