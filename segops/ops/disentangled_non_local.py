"""`segops.disentangled_non_local` — schema, fakes, autograd, validation and dispatch (SPEC §2.3).

The custom ops work on flattened, contiguous tensors: query (N, Ck, Lq), key (N, Ck, Lk),
value (N, Cv, Lk), unary (N, Lk) or None, and one combined logit factor
`s = (Ck**-0.5 if scale is None else scale) / temperature`. The public function reshapes.

The fused forward returns (out, lse, g, lse_u):
  lse   (N, Lq)  per-query log-sum-exp of the pairwise logits s*<q~_i, k~_j>,
  g     (N, Cv)  the unary vector sum_j softmax(unary)_j v_j (zeros without unary),
  lse_u (N,)     log-sum-exp of the unary logits (zeros without unary),
all fp32 (fp64 for fp64 inputs): O(Lq + Lk) statistics, enough for a recomputing backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from segops._backend import FusedBackend, op_backends
from segops.ops import _validate as V
from segops.reference.disentangled_non_local import disentangled_non_local as _reference

OP = "disentangled_non_local"
BACKENDS = op_backends(OP)


# The segops._C kernels; the dispatcher picks the CPU or CUDA implementation by device.
def _compiled_forward(query, key, value, unary, whiten, s):
    return torch.ops.segops_C.disentangled_non_local_forward(query, key, value, unary, whiten, s)


def _compiled_backward(grad_out, query, key, value, unary, out, lse, g, lse_u, whiten, s):
    return torch.ops.segops_C.disentangled_non_local_backward(
        grad_out, query, key, value, unary, out, lse, g, lse_u, whiten, s)


BACKENDS.register(FusedBackend(
    "cpu", _compiled_forward, _compiled_backward,
    kernels=("disentangled_non_local_forward", "disentangled_non_local_backward")))
BACKENDS.register(FusedBackend(
    "cuda", _compiled_forward, _compiled_backward, dtypes=V.CUDA_DTYPES,
    kernels=("disentangled_non_local_forward", "disentangled_non_local_backward")))
BACKENDS.register(FusedBackend(
    "triton", "segops.triton.disentangled_non_local:forward",
    "segops.triton.disentangled_non_local:backward",
    dtypes=(torch.float16, torch.bfloat16, torch.float32)))


@torch.library.custom_op("segops::disentangled_non_local", mutates_args=())
def _forward_op(query: Tensor, key: Tensor, value: Tensor, unary: Optional[Tensor], whiten: bool,
                s: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return BACKENDS.fused[backend].fn("forward")(query, key, value, unary, whiten, s)


@_forward_op.register_fake
def _(query, key, value, unary, whiten, s, backend):
    n, _, lq = query.shape
    cv = value.shape[1]
    sd = V.accumulation_dtype(query.dtype)
    return (value.new_empty((n, cv, lq)), query.new_empty((n, lq), dtype=sd),
            query.new_empty((n, cv), dtype=sd), query.new_empty((n,), dtype=sd))


@torch.library.custom_op("segops::disentangled_non_local_backward", mutates_args=())
def _backward_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                 unary: Optional[Tensor], out: Tensor, lse: Tensor, g: Tensor, lse_u: Tensor,
                 whiten: bool, s: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_query, grad_key, grad_value, grad_unary); grad_unary is empty without unary."""
    return BACKENDS.fused[backend].fn("backward")(grad_out, query, key, value, unary, out, lse, g,
                                                  lse_u, whiten, s)


@_backward_op.register_fake
def _(grad_out, query, key, value, unary, out, lse, g, lse_u, whiten, s, backend):
    du = torch.empty_like(unary) if unary is not None else query.new_empty((0,))
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), du


def _setup_context(ctx, inputs, output):
    query, key, value, unary, whiten, s, backend = inputs
    out, lse, g, lse_u = output
    ctx.save_for_backward(query, key, value, unary, out, lse, g, lse_u)
    ctx.whiten, ctx.s, ctx.backend = whiten, s, backend


def _backward(ctx, grad_out, _g_lse, _g_g, _g_lse_u):
    query, key, value, unary, out, lse, g, lse_u = ctx.saved_tensors
    dq, dk, dv, du = _backward_op(grad_out.contiguous(), query, key, value, unary, out, lse, g,
                                  lse_u, ctx.whiten, ctx.s, ctx.backend)
    return dq, dk, dv, (du if unary is not None else None), None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(query, key, value, unary, whiten, scale, temperature) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        V.check_tensor(OP, name, t, min_ndim=3)
    if unary is not None:
        V.check_tensor(OP, "unary", unary, min_ndim=3)
    V.check_same_device_dtype(OP, query=query, key=key, value=value, unary=unary)
    if key.dim() < 3 or key.shape[:2] != query.shape[:2]:
        raise ValueError(f"segops.{OP}: `key` must have (N, Ck) = {tuple(query.shape[:2])} of "
                         f"`query`, got {V._desc(key)}")
    if value.dim() != key.dim() or value.shape[0] != key.shape[0] or value.shape[2:] != key.shape[2:]:
        raise ValueError(f"segops.{OP}: `value` must have shape (N, Cv, *Sk) with N = {key.shape[0]} "
                         f"and Sk = {tuple(key.shape[2:])} of `key`, got {V._desc(value)}")
    if unary is not None and (unary.dim() != key.dim() or unary.shape[:2] != (key.shape[0], 1)
                              or unary.shape[2:] != key.shape[2:]):
        raise ValueError(f"segops.{OP}: `unary` must have shape (N, 1, *Sk) = "
                         f"{(key.shape[0], 1) + tuple(key.shape[2:])}, got {V._desc(unary)}")
    if not isinstance(whiten, bool):
        raise TypeError(f"segops.{OP}: `whiten` must be a bool, got {type(whiten).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"segops.{OP}: `scale` must be None or a finite number, got {scale!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(f"segops.{OP}: `temperature` must be a finite number > 0, got {temperature!r}")


def disentangled_non_local(query: Tensor, key: Tensor, value: Tensor, unary: Optional[Tensor] = None,
                           *, whiten: bool = True, scale: Optional[float] = None,
                           temperature: float = 1.0, backend: str = "auto") -> Tensor:
    """(Disentangled) non-local attention: `out_i = sum_j softmax_j(s <q~_i, k~_j>) v_j [+ unary]`.

    query: (N, Ck, *Sq); key: (N, Ck, *Sk); value: (N, Cv, *Sk); unary: (N, 1, *Sk) or None;
    output (N, Cv, *Sq). Sq and Sk are any spatial shapes of rank >= 1 and may differ.
    whiten: subtract the per-sample per-channel mean over positions from query and key.
    s = (Ck**-0.5 if scale is None else scale) / temperature. With unary, adds
    `sum_j softmax_j(unary_j) v_j` to every query position. `whiten=False, unary=None` is
    embedded-Gaussian non-local (scale=1.0: DANet's position attention).
    """
    _validate(query, key, value, unary, whiten, scale, temperature)
    name = BACKENDS.select(backend, query.device, query.dtype)
    if name == "reference" or V.is_empty(query, key, value, unary):
        return _reference(query, key, value, unary, whiten=whiten, scale=scale,
                          temperature=temperature)
    n, ck = query.shape[:2]
    cv = value.shape[1]
    s = float((ck ** -0.5 if scale is None else scale) / temperature)
    u = None if unary is None else unary.reshape(n, -1).contiguous()
    out, _, _, _ = _forward_op(query.reshape(n, ck, -1).contiguous(),
                               key.reshape(n, ck, -1).contiguous(),
                               value.reshape(n, cv, -1).contiguous(), u, whiten, s, name)
    return out.reshape(n, cv, *query.shape[2:])
