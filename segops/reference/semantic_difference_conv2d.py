"""Semantic difference convolution (SDN, Tan et al. NeurIPS 2022) — reference semantics, docs/operators.md §2.4.

    Y[o,p] = b[o] + sum_{c,t} w[o,c,t] * S(c,p,t) * (U[c,p+d_t] - U[c,p])

with U and V zero outside the image (stride 1, "same" zero padding dilation*(k-1)/2) and

    charbonnier: S(c,p,t) = (1 + (V[c,p+d_t] - V[c,p])^2 / sigma^2)^(-1/2)   (per channel, Cg == Cin)
    gaussian:    S(p,t)   = exp(-sum_c (V[c,p+d_t] - V[c,p])^2 / (2 sigma^2 Cg)) (one scalar, any Cg)
    none:        S = 1  (central difference convolution with theta = 1)

No official code of SDN exists; the per-channel Charbonnier form follows the only public
re-implementation, and parity with the authors' implementation is unverified.

Computed the way such re-implementations do: `F.unfold` of U and V (k^2 times the input), the
neighbour differences, the similarity, then one matmul with the (Cout, Cin*k^2) weight. This is
also the benchmark baseline, so it keeps that memory profile on purpose.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

SIMILARITIES = ("charbonnier", "gaussian", "none")


def _neighbour_difference(x: Tensor, k: int, dilation: int) -> Tensor:
    """(N, C, k*k, H, W): x[c, p + d_t] - x[c, p], x zero outside the image."""
    n, c, h, w = x.shape
    if c * h * w == 0:  # F.unfold rejects empty maps; every difference of nothing is nothing
        return (x.unsqueeze(2) - x.unsqueeze(2)).expand(n, c, k * k, h, w)
    pad = dilation * (k - 1) // 2
    cols = F.unfold(x, k, dilation=dilation, padding=pad).view(n, c, k * k, h, w)
    return cols - x.unsqueeze(2)


def semantic_difference_conv2d(input: Tensor, guidance: Tensor, weight: Tensor,
                               bias: Optional[Tensor] = None, *, dilation: int = 1,
                               similarity: str = "charbonnier", sigma: float = 1.0) -> Tensor:
    n, cin, h, w = input.shape
    cout, _, k, _ = weight.shape
    diff = _neighbour_difference(input, k, dilation)
    if similarity == "charbonnier":
        g = _neighbour_difference(guidance, k, dilation)
        diff = diff * torch.rsqrt(1.0 + g * g / (sigma * sigma))
    elif similarity == "gaussian":
        cg = guidance.shape[1]
        g = _neighbour_difference(guidance, k, dilation)
        s = torch.exp(-(g * g).sum(1, keepdim=True) / (2.0 * sigma * sigma * cg))
        diff = diff * s
    elif similarity != "none":
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    out = torch.matmul(weight.reshape(cout, cin * k * k), diff.reshape(n, cin * k * k, h * w))
    out = out.view(n, cout, h, w)
    if bias is not None:
        out = out + bias.view(1, cout, 1, 1)
    return out
