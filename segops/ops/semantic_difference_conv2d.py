"""`segops.semantic_difference_conv2d` — schema, fake, autograd, validation and dispatch (SPEC §2.4).

The fused forward returns only the output: the backward recomputes the similarity-weighted
differences from (input, guidance) instead of saving anything k^2 times the input.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from segops._backend import FusedBackend, op_backends
from segops.ops import _validate as V
from segops.reference.semantic_difference_conv2d import SIMILARITIES
from segops.reference.semantic_difference_conv2d import semantic_difference_conv2d as _reference

OP = "semantic_difference_conv2d"
BACKENDS = op_backends(OP)


# The segops._C kernels; the dispatcher picks the CPU or CUDA implementation by device.
def _compiled_forward(input, guidance, weight, bias, dilation, similarity, sigma):
    return torch.ops.segops_C.semantic_difference_conv2d_forward(
        input, guidance, weight, bias, dilation, similarity, sigma)


def _compiled_backward(grad_out, input, guidance, weight, dilation, similarity, sigma):
    return torch.ops.segops_C.semantic_difference_conv2d_backward(
        grad_out, input, guidance, weight, dilation, similarity, sigma)


BACKENDS.register(FusedBackend(
    "cpu", _compiled_forward, _compiled_backward,
    kernels=("semantic_difference_conv2d_forward", "semantic_difference_conv2d_backward")))
BACKENDS.register(FusedBackend(
    "cuda", _compiled_forward, _compiled_backward, dtypes=V.CUDA_DTYPES,
    kernels=("semantic_difference_conv2d_forward", "semantic_difference_conv2d_backward")))
BACKENDS.register(FusedBackend(
    "triton", "segops.triton.semantic_difference_conv2d:forward",
    "segops.triton.semantic_difference_conv2d:backward",
    dtypes=(torch.float16, torch.bfloat16, torch.float32)))


@torch.library.custom_op("segops::semantic_difference_conv2d", mutates_args=())
def _forward_op(input: Tensor, guidance: Tensor, weight: Tensor, bias: Optional[Tensor],
                dilation: int, similarity: str, sigma: float, backend: str) -> Tensor:
    return BACKENDS.fused[backend].fn("forward")(input, guidance, weight, bias, dilation,
                                                 similarity, sigma)


@_forward_op.register_fake
def _(input, guidance, weight, bias, dilation, similarity, sigma, backend):
    n, _, h, w = input.shape
    return input.new_empty((n, weight.shape[0], h, w))


@torch.library.custom_op("segops::semantic_difference_conv2d_backward", mutates_args=())
def _backward_op(grad_out: Tensor, input: Tensor, guidance: Tensor, weight: Tensor,
                 dilation: int, similarity: str, sigma: float,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_guidance, grad_weight, grad_bias); grad_bias = grad_out summed."""
    return BACKENDS.fused[backend].fn("backward")(grad_out, input, guidance, weight, dilation,
                                                  similarity, sigma)


@_backward_op.register_fake
def _(grad_out, input, guidance, weight, dilation, similarity, sigma, backend):
    return (torch.empty_like(input), torch.empty_like(guidance), torch.empty_like(weight),
            weight.new_empty((weight.shape[0],)))


def _setup_context(ctx, inputs, output):
    input, guidance, weight, bias, dilation, similarity, sigma, backend = inputs
    ctx.save_for_backward(input, guidance, weight)
    ctx.args = (dilation, similarity, sigma, backend)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    input, guidance, weight = ctx.saved_tensors
    dilation, similarity, sigma, backend = ctx.args
    du, dv, dw, db = _backward_op(grad_out.contiguous(), input, guidance, weight, dilation,
                                  similarity, sigma, backend)
    return du, dv, dw, (db if ctx.has_bias else None), None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(input, guidance, weight, bias, dilation, similarity, sigma) -> None:
    V.check_tensor(OP, "input", input, ndim=4)
    V.check_tensor(OP, "guidance", guidance, ndim=4)
    V.check_tensor(OP, "weight", weight, ndim=4)
    if bias is not None:
        V.check_tensor(OP, "bias", bias, ndim=1)
    V.check_same_device_dtype(OP, input=input, guidance=guidance, weight=weight, bias=bias)
    n, cin, h, w = input.shape
    V.check_dims(OP, "guidance", guidance, (0, 2, 3), (n, h, w), "(N, H, W) of `input`")
    V.check_dim(OP, "weight", weight, 1, cin, "in channels (Cin of `input`)")
    k = weight.shape[2]
    if weight.shape[3] != k or k % 2 == 0:
        raise ValueError(f"segops.{OP}: `weight` must be (Cout, Cin, k, k) with k odd, got shape "
                         f"{tuple(weight.shape)}")
    if bias is not None:
        V.check_dim(OP, "bias", bias, 0, weight.shape[0], "Cout of `weight`")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"segops.{OP}: `dilation` must be a positive int, got {dilation!r}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"segops.{OP}: `similarity` must be one of {', '.join(SIMILARITIES)}, "
                         f"got {similarity!r}")
    if similarity == "charbonnier" and guidance.shape[1] != cin:
        raise ValueError(f"segops.{OP}: similarity='charbonnier' is per channel and needs "
                         f"`guidance` with Cg == Cin = {cin} channels, got shape {tuple(guidance.shape)}")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not (
            math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"segops.{OP}: `sigma` must be a finite number > 0, got {sigma!r}")


def _empty(input, guidance, weight, bias):
    """Zero-size inputs: the (possibly empty) result, still connected to every input's graph."""
    n, _, h, w = input.shape
    out = input.new_zeros((n, weight.shape[0], h, w))
    out = out + 0 * (input.sum() + guidance.sum() + weight.sum())
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def semantic_difference_conv2d(input: Tensor, guidance: Tensor, weight: Tensor,
                               bias: Optional[Tensor] = None, *, dilation: int = 1,
                               similarity: str = "charbonnier", sigma: float = 1.0,
                               backend: str = "auto") -> Tensor:
    """Semantic difference convolution (SDN): a k x k convolution of similarity-weighted
    neighbour differences, `Y[o,p] = b[o] + sum_{c,t} w[o,c,t] S(c,p,t) (U[c,p+d_t] - U[c,p])`.

    input U: (N, Cin, H, W); guidance V: (N, Cg, H, W) (Cg == Cin for "charbonnier");
    weight: (Cout, Cin, k, k), k odd; stride 1, "same" zero padding -> (N, Cout, H, W).
    similarity: "charbonnier" (per channel), "gaussian" (one scalar per pixel pair) or "none".
    Parity with the SDN authors (no official code) is unverified.
    """
    _validate(input, guidance, weight, bias, dilation, similarity, sigma)
    sigma = float(sigma)
    name = BACKENDS.select(backend, input.device, input.dtype)
    if V.is_empty(input, guidance, weight):
        return _empty(input, guidance, weight, bias)
    if name == "reference":
        return _reference(input, guidance, weight, bias, dilation=dilation,
                          similarity=similarity, sigma=sigma)
    return _forward_op(input.contiguous(), guidance.contiguous(), weight.contiguous(),
                       None if bias is None else bias.contiguous(), dilation, similarity, sigma,
                       name)
