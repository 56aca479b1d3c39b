"""ICNet's cascade feature fusion neck as mmseg's `ICNeck` (`mmseg/models/necks/ic_neck.py`)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.common import resize
from segops.nn import ConvModule


class CascadeFeatureFusion(nn.Module):
    """The low-resolution input upsampled to the high one's size, dilated 3x3 ConvModule
    (`conv_low`), plus a 1x1 ConvModule of the high-resolution input (`conv_high`), ReLU.
    Returns (fused, conv_low output); the latter feeds an auxiliary head (mmseg's choice: the
    paper classifies the upsampled low input instead)."""

    def __init__(self, low_channels: int, high_channels: int, out_channels: int, norm="bn",
                 align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.conv_low = ConvModule(low_channels, out_channels, 3, padding=2, dilation=2, norm=norm)
        self.conv_high = ConvModule(high_channels, out_channels, 1, norm=norm)

    def forward(self, x_low: Tensor, x_high: Tensor):
        x_low = self.conv_low(resize(x_low, x_high.shape[2:], self.align_corners))
        return F.relu(x_low + self.conv_high(x_high)), x_low


class ICNeck(nn.Module):
    """Fuses the 1/32 branch into the 1/16 one (`cff_24`), the result into the 1/8 one
    (`cff_12`). Returns (1/16 aux feature, 1/8 aux feature, fused 1/8 feature)."""

    def __init__(self, in_channels=(64, 256, 256), out_channels: int = 128, norm="bn",
                 align_corners: bool = False) -> None:
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"ICNeck needs 3 input widths, got {tuple(in_channels)}")
        self.cff_24 = CascadeFeatureFusion(in_channels[2], in_channels[1], out_channels, norm,
                                           align_corners)
        self.cff_12 = CascadeFeatureFusion(out_channels, in_channels[0], out_channels, norm,
                                           align_corners)

    def forward(self, inputs):
        sub1, sub2, sub4 = inputs
        fused24, aux24 = self.cff_24(sub4, sub2)
        fused12, aux12 = self.cff_12(fused24, sub1)
        return aux24, aux12, fused12
