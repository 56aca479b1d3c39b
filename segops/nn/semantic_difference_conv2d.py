"""`SemanticDifferenceConv2d` and the SDN neck `SemanticDiffusion` (docs/operators.md §2.4).

SDN (Tan et al., NeurIPS 2022) has no official code: these modules follow the paper's description
(semantic difference convolution, then BN -> ReLU, then a 1x1 fusion of [U; Y]); parity with the
authors' implementation, and so the state_dict layout of their checkpoints, is unverified.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.ops.semantic_difference_conv2d import semantic_difference_conv2d


class SemanticDifferenceConv2d(nn.Module):
    """k x k convolution of similarity-weighted neighbour differences: `forward(u, v)`.

    Parameters `weight` (Cout, Cin, k, k) and optional `bias` (Cout,), initialised like
    `nn.Conv2d`. `v` is the guidance (Cg == Cin for "charbonnier", any Cg for "gaussian",
    ignored for "none"). `backend` (keyword-only, not part of the state) selects the segops backend.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 dilation: int = 1, bias: bool = False, similarity: str = "charbonnier",
                 sigma: float = 1.0, *, backend: str = "auto") -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"SemanticDifferenceConv2d: kernel_size must be odd, got {kernel_size}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.dilation = kernel_size, dilation
        self.similarity, self.sigma = similarity, sigma
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size ** 2)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        return semantic_difference_conv2d(u, v, self.weight, self.bias, dilation=self.dilation,
                                          similarity=self.similarity, sigma=self.sigma,
                                          backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, bias={self.bias is not None}, "
                f"similarity={self.similarity!r}, sigma={self.sigma}")


class SemanticDiffusion(nn.Module):
    """The SDN neck on one feature level: `forward(u, guidance=None) -> (N, channels, H, W)`.

    guidance -> `guidance_proj` (1x1 conv to `channels`) -> bilinear resize to U's grid = V;
    Y = `sdc`(U, V); Y -> `bn` -> ReLU; out = `fuse`(1x1 conv of [U; Y]) back to `channels`.

    Multi-scale use: the guidance of level i is level i+1 (pass it). Single-scale use
    (`single_scale=True`): the guidance is `downsample`(U), a stride-2 3x3 conv of U to
    `guidance_channels`, used when `forward` gets no guidance.
    """

    def __init__(self, channels: int, guidance_channels: int, kernel_size: int = 3,
                 dilation: int = 1, similarity: str = "charbonnier", sigma: float = 1.0,
                 single_scale: bool = False, *, backend: str = "auto") -> None:
        super().__init__()
        self.channels, self.guidance_channels = channels, guidance_channels
        self.downsample = (nn.Conv2d(channels, guidance_channels, 3, stride=2, padding=1)
                           if single_scale else None)
        self.guidance_proj = nn.Conv2d(guidance_channels, channels, 1)
        self.sdc = SemanticDifferenceConv2d(channels, channels, kernel_size, dilation, bias=False,
                                            similarity=similarity, sigma=sigma, backend=backend)
        self.bn = nn.BatchNorm2d(channels)
        self.fuse = nn.Conv2d(2 * channels, channels, 1)

    @property
    def backend(self) -> str:
        return self.sdc.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.sdc.backend = name

    def forward(self, u: Tensor, guidance: Optional[Tensor] = None) -> Tensor:
        if guidance is None:
            if self.downsample is None:
                raise ValueError("SemanticDiffusion: forward needs `guidance` unless the module "
                                 "was built with single_scale=True")
            guidance = self.downsample(u)
        v = self.guidance_proj(guidance)
        if v.shape[-2:] != u.shape[-2:]:
            v = F.interpolate(v, size=u.shape[-2:], mode="bilinear", align_corners=False)
        y = F.relu(self.bn(self.sdc(u, v)))
        return self.fuse(torch.cat([u, y], dim=1))
