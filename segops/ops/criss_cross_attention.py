"""`segops.criss_cross_attention` — schema, fake, autograd, validation and dispatch (SPEC §2.1)."""
from __future__ import annotations

import torch
from torch import Tensor

from segops._backend import FusedBackend, op_backends
from segops.ops import _validate as V
from segops.reference.criss_cross_attention import criss_cross_attention as _reference

OP = "criss_cross_attention"
BACKENDS = op_backends(OP)


# The segops._C kernels; the dispatcher picks the CPU or CUDA implementation by device.
def _compiled_forward(query, key, value):
    return torch.ops.segops_C.criss_cross_attention_forward(query, key, value)


def _compiled_backward(grad_out, query, key, value, out, stats):
    return torch.ops.segops_C.criss_cross_attention_backward(grad_out, query, key, value, out, stats)


BACKENDS.register(FusedBackend(
    "cpu", _compiled_forward, _compiled_backward,
    kernels=("criss_cross_attention_forward", "criss_cross_attention_backward")))
BACKENDS.register(FusedBackend(
    "cuda", _compiled_forward, _compiled_backward, dtypes=V.CUDA_DTYPES,
    kernels=("criss_cross_attention_forward", "criss_cross_attention_backward")))
BACKENDS.register(FusedBackend(
    "triton", "segops.triton.criss_cross_attention:forward",
    "segops.triton.criss_cross_attention:backward",
    dtypes=(torch.float16, torch.bfloat16, torch.float32)))


# The fused forward returns (out, stats): stats (N, 2, H, W) holds, per position, the maximum
# energy m and log l with l = sum over the H+W-1 positions of exp(e - m) (so the log-sum-exp is
# m + log l), in the accumulation dtype (fp64 for fp64 inputs, else fp32). That is all the
# backward needs besides the inputs and the output: P = exp((e - m) - log l). Keeping m apart
# from log l keeps P accurate when the energies are large (one fp32 log-sum-exp of ~1000 would
# be off by ~3e-5 and so would every P).
@torch.library.custom_op("segops::criss_cross_attention", mutates_args=())
def _forward_op(query: Tensor, key: Tensor, value: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return BACKENDS.fused[backend].fn("forward")(query, key, value)


@_forward_op.register_fake
def _(query, key, value, backend):
    n, _, h, w = query.shape
    return (value.new_empty((n, value.shape[1], h, w)),
            query.new_empty((n, 2, h, w), dtype=V.accumulation_dtype(query.dtype)))


@torch.library.custom_op("segops::criss_cross_attention_backward", mutates_args=())
def _backward_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                 stats: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return BACKENDS.fused[backend].fn("backward")(grad_out, query, key, value, out, stats)


@_backward_op.register_fake
def _(grad_out, query, key, value, out, stats, backend):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, backend = inputs
    out, stats = output
    ctx.save_for_backward(query, key, value, out, stats)
    ctx.backend = backend


def _backward(ctx, grad_out, _grad_stats):
    query, key, value, out, stats = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out.contiguous(), query, key, value, out, stats, ctx.backend)
    return dq, dk, dv, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(query: Tensor, key: Tensor, value: Tensor) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        V.check_tensor(OP, name, t, ndim=4)
    V.check_same_device_dtype(OP, query=query, key=key, value=value)
    V.check_dims(OP, "key", key, (0, 1, 2, 3), query.shape, "the shape of `query` (N, Ck, H, W)")
    V.check_dims(OP, "value", value, (0, 2, 3), (query.shape[0],) + tuple(query.shape[2:]),
                 "(N, H, W) of `query`")


def criss_cross_attention(query: Tensor, key: Tensor, value: Tensor, *,
                          backend: str = "auto") -> Tensor:
    """Criss-cross attention: each position attends to its row and column (centre once).

    query, key: (N, Ck, H, W); value: (N, Cv, H, W) -> (N, Cv, H, W). One joint softmax over the
    H + W - 1 positions, no scaling (mmcv/CCNet semantics).
    """
    _validate(query, key, value)
    name = BACKENDS.select(backend, query.device, query.dtype)
    if name == "reference" or V.is_empty(query, key, value):
        return _reference(query, key, value)
    out, _ = _forward_op(query.contiguous(), key.contiguous(), value.contiguous(), name)
    return out
