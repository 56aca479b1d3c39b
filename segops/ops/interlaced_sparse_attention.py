"""`segops.interlaced_sparse_attention` — schema, fake, autograd, validation, dispatch (SPEC §2.2)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from segops._backend import FusedBackend, op_backends
from segops.ops import _validate as V
from segops.reference.interlaced_sparse_attention import MODES
from segops.reference.interlaced_sparse_attention import \
    interlaced_sparse_attention as _reference

OP = "interlaced_sparse_attention"
BACKENDS = op_backends(OP)


# The segops._C kernels; the dispatcher picks the CPU or CUDA implementation by device.
def _compiled_forward(query, key, value, ph, pw, long, scale):
    return torch.ops.segops_C.interlaced_sparse_attention_forward(query, key, value, ph, pw, long, scale)


def _compiled_backward(grad_out, query, key, value, out, lse, ph, pw, long, scale):
    return torch.ops.segops_C.interlaced_sparse_attention_backward(
        grad_out, query, key, value, out, lse, ph, pw, long, scale)


BACKENDS.register(FusedBackend(
    "cpu", _compiled_forward, _compiled_backward,
    kernels=("interlaced_sparse_attention_forward", "interlaced_sparse_attention_backward")))
BACKENDS.register(FusedBackend(
    "cuda", _compiled_forward, _compiled_backward, dtypes=V.CUDA_DTYPES,
    kernels=("interlaced_sparse_attention_forward", "interlaced_sparse_attention_backward")))
BACKENDS.register(FusedBackend(
    "triton", "segops.triton.interlaced_sparse_attention:forward",
    "segops.triton.interlaced_sparse_attention:backward",
    dtypes=(torch.float16, torch.bfloat16, torch.float32)))


# The fused forward returns (out, lse): lse is the per-position softmax log-sum-exp (N, H, W) of
# the scaled logits (natural log), fp32 (fp64 for fp64 inputs): all the backward needs besides
# the inputs and the output.
@torch.library.custom_op("segops::interlaced_sparse_attention", mutates_args=())
def _forward_op(query: Tensor, key: Tensor, value: Tensor, ph: int, pw: int, long: bool,
                scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return BACKENDS.fused[backend].fn("forward")(query, key, value, ph, pw, long, scale)


@_forward_op.register_fake
def _(query, key, value, ph, pw, long, scale, backend):
    n, _, h, w = query.shape
    return (value.new_empty((n, value.shape[1], h, w)),
            query.new_empty((n, h, w), dtype=V.accumulation_dtype(query.dtype)))


@torch.library.custom_op("segops::interlaced_sparse_attention_backward", mutates_args=())
def _backward_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                 lse: Tensor, ph: int, pw: int, long: bool, scale: float,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return BACKENDS.fused[backend].fn("backward")(grad_out, query, key, value, out, lse,
                                                  ph, pw, long, scale)


@_backward_op.register_fake
def _(grad_out, query, key, value, out, lse, ph, pw, long, scale, backend):
    # The kernels return contiguous gradients whatever the inputs' strides.
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_context(ctx, inputs, output):
    query, key, value, ph, pw, long, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.args = (ph, pw, long, scale, backend)


def _backward(ctx, grad_out, _grad_lse):
    query, key, value, out, lse = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out.contiguous(), query, key, value, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


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
    for name, t in (("query", query), ("key", key), ("value", value)):
        V.check_tensor(OP, name, t, ndim=4)
    V.check_same_device_dtype(OP, query=query, key=key, value=value)
    V.check_dims(OP, "key", key, (0, 1, 2, 3), query.shape, "the shape of `query` (N, Ck, H, W)")
    V.check_dims(OP, "value", value, (0, 2, 3), (query.shape[0],) + tuple(query.shape[2:]),
                 "(N, H, W) of `query`")
    ph, pw = _block_size(block_size)
    if mode not in MODES:
        raise ValueError(f"segops.{OP}: `mode` must be 'long' or 'short', got {mode!r}")
    h, w = query.shape[2:]
    if h % ph or w % pw:
        raise ValueError(f"segops.{OP}: the map size (H, W) = ({h}, {w}) must be divisible by "
                         f"`block_size` (Ph, Pw) = ({ph}, {pw}); pad the input (the "
                         "InterlacedSparseAttention module does)")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"segops.{OP}: `scale` must be None or a finite float, got {scale!r}")
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
    name = BACKENDS.select(backend, query.device, query.dtype)
    if name == "reference" or V.is_empty(query, key, value):
        return _reference(query, key, value, (ph, pw), mode, scale=scale)
    out, _ = _forward_op(query.contiguous(), key.contiguous(), value.contiguous(), ph, pw,
                         mode == "long", scale, name)
    return out
