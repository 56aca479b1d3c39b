"""`segops.semantic_difference_conv2d` (docs/operators.md §2.4): description, validation, public
function.

The fused forward returns only the output: the backward recomputes the similarity-weighted
differences from (input, guidance) instead of saving anything k^2 times the input. It returns
(grad_input, grad_guidance, grad_weight, grad_bias), grad_bias = grad_out summed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from segops.ops import _spec
from segops.ops import _validate as V
from segops.ops._spec import ErrorSample, OpSpec, Sample
from segops.reference.semantic_difference_conv2d import SIMILARITIES
from segops.reference.semantic_difference_conv2d import semantic_difference_conv2d as _reference

OP = "semantic_difference_conv2d"


def _fake(input, guidance, weight, bias, dilation, similarity, sigma):
    n, _, h, w = input.shape
    return input.new_empty((n, weight.shape[0], h, w))


def _case(g, name, similarity, k, dilation, n, cin, cg, cout, h, w, bias, sigma=0.9,
          gradcheck=False):
    t = dict(input=_spec.randn(g, n, cin, h, w), guidance=_spec.randn(g, n, cg, h, w),
             weight=_spec.randn(g, cout, cin, k, k, scale=max(cin * k * k, 1) ** -0.5))
    if bias:
        t["bias"] = _spec.randn(g, cout)
    return Sample(name, t, dict(dilation=dilation, similarity=similarity, sigma=sigma),
                  grads=tuple(t), gradcheck=gradcheck)


def _large_samples():
    g = torch.Generator().manual_seed(1)
    return [_case(g, "large_charbonnier", "charbonnier", 3, 2, 2, 24, 24, 40, 41, 37, True),
            _case(g, "large_gaussian", "gaussian", 3, 1, 2, 24, 8, 40, 41, 37, True, sigma=1.3)]


def _samples():
    g = torch.Generator().manual_seed(0)

    def case(*args, **kwargs):
        return _case(g, *args, **kwargs)
    return [
        case("charbonnier_batch2_prime", "charbonnier", 3, 1, 2, 3, 3, 5, 5, 7, True),
        case("gaussian_cg_ne_cin_dilated", "gaussian", 3, 2, 2, 4, 6, 3, 6, 5, False),
        case("none_k5", "none", 5, 1, 1, 3, 3, 4, 7, 6, True),
        case("small_charbonnier", "charbonnier", 3, 1, 2, 2, 2, 3, 4, 5, True, gradcheck=True),
        case("small_gaussian_dilated", "gaussian", 3, 2, 2, 2, 3, 3, 4, 5, True, gradcheck=True),
        case("small_none_k1", "none", 1, 1, 2, 2, 2, 3, 4, 5, True, gradcheck=True),
        case("charbonnier_k1", "charbonnier", 1, 1, 1, 3, 3, 2, 4, 5, False),
        case("gaussian_k5_taps_leave_image", "gaussian", 5, 2, 1, 2, 3, 3, 7, 9, True),
        case("charbonnier_full_tile", "charbonnier", 3, 2, 1, 16, 16, 17, 9, 9, True),
        case("gaussian_one_row", "gaussian", 3, 1, 1, 3, 2, 4, 1, 6, False),
        case("charbonnier_one_column", "charbonnier", 3, 1, 1, 3, 3, 4, 6, 1, True),
        case("gaussian_one_pixel", "gaussian", 3, 1, 1, 2, 2, 3, 1, 1, True),
        case("empty_batch", "charbonnier", 3, 1, 0, 3, 3, 4, 5, 6, True),
        case("empty_map", "gaussian", 3, 1, 2, 3, 2, 4, 0, 6, True),
        case("no_input_channels", "charbonnier", 3, 1, 2, 0, 0, 4, 4, 5, True),
    ]


def _error_samples():
    # Valid call: input/guidance (2, 3, 5, 7), weight (5, 3, 3, 3), bias (5,), charbonnier.
    return [
        ErrorSample("input_rank", dict(input=torch.randn(2, 3, 5)), "`input` must be 4-D"),
        ErrorSample("guidance_map", dict(guidance=torch.randn(2, 3, 5, 6)), "`guidance` must have"),
        ErrorSample("guidance_batch", dict(guidance=torch.randn(1, 3, 5, 7)), "`guidance` must have"),
        ErrorSample("weight_channels", dict(weight=torch.randn(5, 4, 3, 3)),
                    "`weight` must have in channels"),
        ErrorSample("weight_even", dict(weight=torch.randn(5, 3, 2, 2)), "k odd"),
        ErrorSample("weight_not_square", dict(weight=torch.randn(5, 3, 3, 1)), "k odd"),
        ErrorSample("bias_size", dict(bias=torch.randn(3)), "`bias` must have"),
        ErrorSample("charbonnier_channels", dict(guidance=torch.randn(2, 2, 5, 7)), "Cg == Cin"),
        ErrorSample("mixed_dtype", dict(guidance=torch.randn(2, 3, 5, 7, dtype=torch.float64)), "dtype"),
        ErrorSample("integer", dict(input=torch.ones(2, 3, 5, 7, dtype=torch.int64)), "floating"),
        ErrorSample("similarity", dict(similarity="cosine"), "`similarity` must be one of"),
        ErrorSample("dilation", dict(dilation=0), "`dilation`"),
        ErrorSample("sigma", dict(sigma=0.0), "`sigma`"),
    ]


SPEC = _spec.define(OpSpec(
    name=OP, public=1,
    inputs=("input", "guidance", "weight", "bias?"),
    params=(("dilation", int), ("similarity", str), ("sigma", float)),
    results=("out",), saves=("input", "guidance", "weight"),
    differentiable=("input", "guidance", "weight", "bias"), fake=_fake,
    grad_fake={"bias": lambda saved, params: saved["weight"].new_empty((saved["weight"].shape[0],))},
    make=_case, samples=_samples, error_samples=_error_samples, large_samples=_large_samples,
    reference=_reference))


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
    V.check_finite_number(OP, "sigma", sigma, positive=True)


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
    name = SPEC.select(backend, input)
    if name == "reference":
        return _reference(input, guidance, weight, bias, dilation=dilation,
                          similarity=similarity, sigma=sigma)
    return SPEC.fused(name, input, guidance, weight, bias, dilation, similarity, sigma)


SPEC.function = semantic_difference_conv2d
