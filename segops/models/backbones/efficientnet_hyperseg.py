"""EfficientNet-B1 / B3 as HyperSeg builds them (YuvalNirkin/hyperseg
`hyperseg/models/backbones/efficientnet.py`, itself lukemelas/EfficientNet-PyTorch with
feature outputs), with its module names.

MBConv blocks (expansion, depthwise k x k, squeeze-excite 0.25, projection; swish; drop-connect
in training) in the seven EfficientNet stages, widths and repeats scaled by the variant's
width/depth coefficients (B1: 1.0 / 1.1, B3: 1.2 / 1.4), BN momentum 0.01 and eps 1e-3, and
TensorFlow "same" padding fixed for the variant's nominal image size (240 / 300), as the
reference's static-padding convolutions do. Returns the last feature of each resolution
(1/2 .. 1/32), each but those with scale 1 narrowed by a 1x1 conv-BN (`_feat_fc_<i>`) to
`out_feat_scale` of its width, then the 1x1 head conv-BN-swish output (1280 / 1536 channels,
dropout in training), which HyperSeg's weight mapper reads.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (repeats, kernel, stride, expand ratio, in, out) of EfficientNet-B0; SE ratio 0.25 everywhere
B0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
             (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
             (1, 3, 1, 6, 192, 320))
# variant -> (width, depth, nominal image size, dropout)
EFFICIENTNET = {"b1": (1.0, 1.1, 240, 0.2), "b3": (1.2, 1.4, 300, 0.3)}
BN = dict(momentum=0.01, eps=1e-3)


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding computed once for `image_size` (kept for every
    input size, as the reference's Conv2dStaticSamePadding)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = False, image_size: int = 1) -> None:
        super().__init__(cin, cout, kernel_size, stride, groups=groups, bias=bias)
        total = max((math.ceil(image_size / stride) - 1) * stride + kernel_size - image_size, 0)
        self.pad = (total // 2, total - total // 2) * 2

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.pad) if any(self.pad) else x)


class MBConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int,
                 image_size: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, image_size=image_size)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid,
                                          image_size=image_size)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        squeezed = max(1, int(cin * 0.25))
        self._se_reduce = nn.Conv2d(mid, squeezed, 1)
        self._se_expand = nn.Conv2d(squeezed, mid, 1)
        self._project_conv = SameConv2d(mid, cout, 1, image_size=math.ceil(image_size / stride))
        self._bn2 = nn.BatchNorm2d(cout, **BN)
        self.skip = stride == 1 and cin == cout
        self.drop_rate = 0.0

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.silu(self._bn0(self._expand_conv(y)))
        y = F.silu(self._bn1(self._depthwise_conv(y)))
        gate = self._se_expand(F.silu(self._se_reduce(F.adaptive_avg_pool2d(y, 1))))
        y = self._bn2(self._project_conv(torch.sigmoid(gate) * y))
        if not self.skip:
            return y
        if self.training and self.drop_rate > 0:  # drop-connect: drop the branch per sample
            keep = 1.0 - self.drop_rate
            mask = torch.rand(y.shape[0], 1, 1, 1, device=y.device, dtype=y.dtype) < keep
            y = y * mask / keep
        return y + x


class EfficientNetHyperSeg(nn.Module):
    def __init__(self, variant: str = "b1", out_feat_scale=0.25,
                 drop_connect_rate: float = 0.2) -> None:
        super().__init__()
        if variant not in EFFICIENTNET:
            raise ValueError(f"variant must be one of {sorted(EFFICIENTNET)}, got {variant!r}")
        width, depth, size, dropout = EFFICIENTNET[variant]
        stem = round_filters(32, width)
        self._conv_stem = SameConv2d(3, stem, 3, 2, image_size=size)
        self._bn0 = nn.BatchNorm2d(stem, **BN)
        size = math.ceil(size / 2)
        blocks, feature_ends, feat_channels = [], [], []
        for repeats, k, s, e, cin, cout in B0_STAGES:
            cin, cout = round_filters(cin, width), round_filters(cout, width)
            if s > 1 and blocks:
                feature_ends.append(len(blocks) - 1)
                feat_channels.append(blocks[-1]._bn2.num_features)
            for j in range(math.ceil(depth * repeats)):
                blocks.append(MBConvBlock(cin if j == 0 else cout, cout, k, s if j == 0 else 1,
                                          e, size))
                size = math.ceil(size / s) if j == 0 else size
        feature_ends.append(len(blocks) - 1)
        feat_channels.append(blocks[-1]._bn2.num_features)
        self._blocks = nn.ModuleList(blocks)
        for i, block in enumerate(blocks):
            block.drop_rate = drop_connect_rate * i / len(blocks)
        self.feature_ends = feature_ends
        scales = (out_feat_scale if isinstance(out_feat_scale, (list, tuple))
                  else [out_feat_scale] * len(feat_channels))
        self.feat_channels = []
        for i, (c, scale) in enumerate(zip(feat_channels, scales)):
            narrowed = int(round(c * scale))
            fc = None
            if scale != 1.0:
                fc = nn.Sequential(SameConv2d(c, narrowed, 1), nn.BatchNorm2d(narrowed, **BN))
            setattr(self, f"_feat_fc_{i}", fc)
            self.feat_channels.append(narrowed)
        head = round_filters(1280, width)
        self._conv_head = SameConv2d(feat_channels[-1], head, 1)
        self._bn1 = nn.BatchNorm2d(head, **BN)
        self._dropout = nn.Dropout(dropout)
        self.feat_channels.append(head)

    def forward(self, x: Tensor):
        x = F.silu(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.feature_ends:
                fc = getattr(self, f"_feat_fc_{len(feats)}")
                feats.append(x if fc is None else fc(x))
        feats.append(self._dropout(F.silu(self._bn1(self._conv_head(x)))))
        return feats
