"""Smoothed dilated convolutions (Wang & Ji, "Smoothed Dilated Convolutions for Improved Dense
Prediction", KDD 2018), the "separable and shared" variant: before a convolution of dilation
r, every channel is filtered by one (2r-1) x (2r-1) kernel shared by all channels, which mixes
the r x r positions a dilated kernel interleaves and so removes its gridding artifacts. It adds
(2r-1)^2 parameters per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SmoothedDilatedConv2d(nn.Conv2d):
    """`nn.Conv2d` preceded by the shared smoothing filter `smooth` ((2r-1) x (2r-1), r the
    dilation, padded to keep the size). A subclass, so the conv's `weight`/`bias` keys stay
    where a plain dilated conv has them; `smooth` is initialised to the identity (a centred
    delta), so a converted pretrained network starts out computing what it did."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        r = self.dilation[0]
        if self.dilation[0] != self.dilation[1]:
            raise ValueError(f"SmoothedDilatedConv2d needs equal dilations, got {self.dilation}")
        self.smooth = nn.Parameter(self.weight.new_zeros(2 * r - 1, 2 * r - 1))
        with torch.no_grad():
            self.smooth[r - 1, r - 1] = 1.0

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        r = self.dilation[0]
        smoothed = F.conv2d(x.reshape(n * c, 1, h, w), self.smooth[None, None], padding=r - 1)
        return super().forward(smoothed.reshape(n, c, h, w))


def smooth_dilated_convs(module: nn.Module) -> nn.Module:
    """Replace, in place, every `nn.Conv2d` of `module` with a dilation > 1 by a
    SmoothedDilatedConv2d holding the same weights. Returns `module`."""
    for name, child in module.named_children():
        if type(child) is nn.Conv2d and child.dilation[0] > 1:
            smoothed = SmoothedDilatedConv2d(
                child.in_channels, child.out_channels, child.kernel_size, child.stride,
                child.padding, child.dilation, child.groups, child.bias is not None,
                child.padding_mode, device=child.weight.device, dtype=child.weight.dtype)
            with torch.no_grad():
                smoothed.weight.copy_(child.weight)
                if child.bias is not None:
                    smoothed.bias.copy_(child.bias)
            setattr(module, name, smoothed)
        else:
            smooth_dilated_convs(child)
    return module
