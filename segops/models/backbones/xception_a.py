"""XceptionA / XceptionB, DFANet's backbones (Li et al., "DFANet: Deep Feature Aggregation for
Real-Time Semantic Segmentation", CVPR 2019, Sec. 3.1 and Table 1). No official code exists;
this follows the paper's table: a 3x3/2 conv to 8 channels, then `enc2`, `enc3`, `enc4` with
(4, 6, 4) blocks, each stage halving the resolution (1/4, 1/8, 1/16), widths (48, 96, 192)
for A and (32, 64, 128) for B, and the "fc attention" module (global pool, the 1000-way fully
connected layer kept from ImageNet pre-training, 1x1 conv-BN-ReLU back to the stage width,
multiplying the feature). The paper gives no block internals; a block here is the
three-separable-convolution residual block of the same authors' Xception39
(`xception39.XceptionBlock`: widths out/4, out/4, out; a separable projection shortcut on the
strided first block of a stage). `in_channels` of the stages can be widened for DFANet's
second and third backbones, which take concatenated inputs.
"""
from __future__ import annotations

from torch import Tensor, nn

from segops.models.backbones.xception39 import XceptionBlock
from segops.nn import ConvModule

XCEPTION_WIDTHS = {"a": (48, 96, 192), "b": (32, 64, 128)}
XCEPTION_REPEATS = (4, 6, 4)


def encoder_stage(in_channels: int, out_channels: int, blocks: int) -> nn.Sequential:
    """`blocks` XceptionBlocks, the first strided (output stride x2)."""
    mid = out_channels // XceptionBlock.expansion
    return nn.Sequential(XceptionBlock(in_channels, mid, 2),
                         *[XceptionBlock(out_channels, mid) for _ in range(blocks - 1)])


class FCAttention(nn.Module):
    def __init__(self, channels: int, fc_channels: int = 1000) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, fc_channels)
        self.conv = ConvModule(fc_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        att = self.fc(self.pool(x).flatten(1))
        return x * self.conv(att[:, :, None, None])


class XceptionA(nn.Module):
    """`conv1`, `enc2`, `enc3`, `enc4`, `fca`. Returns (enc2, enc3, enc4, fca) outputs."""

    def __init__(self, variant: str = "a", in_channels=None, stem: bool = True) -> None:
        super().__init__()
        if variant not in XCEPTION_WIDTHS:
            raise ValueError(f"variant must be one of {sorted(XCEPTION_WIDTHS)}, got {variant!r}")
        widths = XCEPTION_WIDTHS[variant]
        if stem:
            self.conv1 = ConvModule(3, 8, 3, 2, 1)
        in_channels = in_channels or (8,) + widths[:2]
        for i, (cin, cout, n) in enumerate(zip(in_channels, widths, XCEPTION_REPEATS), 2):
            self.add_module(f"enc{i}", encoder_stage(cin, cout, n))
        self.fca = FCAttention(widths[-1])
        self.out_channels = widths

    def forward(self, x: Tensor):
        e2 = self.enc2(self.conv1(x))
        e3 = self.enc3(e2)
        e4 = self.enc4(e3)
        return e2, e3, e4, self.fca(e4)
