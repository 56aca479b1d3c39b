"""Xception39, the BiSeNet authors' light backbone, as in their TorchSeg repository
(yu-changqian/TorchSeg `furnace/base_model/xception.py`, `xception39`), with its module names.

Stem: 3x3/2 conv-BN-ReLU to 8 channels and a 3x3/2 max-pool; three stages of (4, 8, 4)
residual blocks with middle widths (16, 32, 64) and expansion 4 (outputs 64, 128, 256 channels
at 1/8, 1/16, 1/32). A block is three separable convolutions (depthwise 3x3 without norm, then
pointwise conv-BN, ReLU except after the last); a stage's first block is strided and has a
separable projection shortcut. Returns the three stage outputs.
"""
from __future__ import annotations

from torch import Tensor, nn

from segops.nn import ConvModule


class SeparableConvBnRelu(nn.Module):
    """Depthwise k x k conv (`conv1`, no bias, no norm) -> pointwise ConvModule
    (`point_wise_cbr`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, relu: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding, dilation,
                               groups=in_channels, bias=False)
        self.point_wise_cbr = ConvModule(in_channels, out_channels, 1,
                                         act="relu" if relu else None)

    def forward(self, x: Tensor) -> Tensor:
        return self.point_wise_cbr(self.conv1(x))


class XceptionBlock(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, mid_channels: int, stride: int = 1) -> None:
        super().__init__()
        out = mid_channels * self.expansion
        self.has_proj = stride > 1
        if self.has_proj:
            self.proj = SeparableConvBnRelu(in_channels, out, 3, stride, 1, relu=False)
        self.residual_branch = nn.Sequential(
            SeparableConvBnRelu(in_channels, mid_channels, 3, stride),
            SeparableConvBnRelu(mid_channels, mid_channels),
            SeparableConvBnRelu(mid_channels, out, relu=False))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.proj(x) if self.has_proj else x
        return self.relu(shortcut + self.residual_branch(x))


class Xception39(nn.Module):
    def __init__(self, layers=(4, 8, 4), channels=(16, 32, 64), stem_channels: int = 8) -> None:
        super().__init__()
        self.conv1 = ConvModule(3, stem_channels, 3, 2, 1)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = stem_channels
        for i, (n, mid) in enumerate(zip(layers, channels), 1):
            blocks = [XceptionBlock(cin if j == 0 else mid * 4, mid, 2 if j == 0 else 1)
                      for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = mid * XceptionBlock.expansion
        self.out_channels = tuple(c * XceptionBlock.expansion for c in channels)

    def forward(self, x: Tensor):
        x = self.maxpool(self.conv1(x))
        outs = []
        for i in range(1, 4):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return tuple(outs)
