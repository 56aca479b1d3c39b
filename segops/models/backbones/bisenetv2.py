"""BiSeNet V2 (Yu et al., IJCV 2021) with mmseg's structure and state_dict keys.

Follows mmseg `mmseg/models/backbones/bisenetv2.py` (whose inference path agrees with
CoinCheung/BiSeNet `lib/models/bisenetv2.py`): a detail branch (three stages of 3x3 ConvModules,
output stride 8), a semantic branch (stem block, gather-and-expand layers, context embedding
block, output stride 32) and the bilateral guided aggregation layer. Returns (aggregated 1/8
feature, semantic stage 1..4 outputs): the decode head reads the first, the four "booster"
auxiliary heads the others.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segops.models.common import DepthwiseSeparableConvModule, resize
from segops.nn import ConvModule
from segops.nn.common import make_norm


def _conv3x3(cin: int, cout: int, stride: int = 1, **kw) -> ConvModule:
    return ConvModule(cin, cout, 3, stride, 1, **kw)


class DetailBranch(nn.Module):
    """`detail_branch.<stage>.<i>`: per stage a stride-2 3x3 ConvModule and one (first stage)
    or two more 3x3 ConvModules."""

    def __init__(self, detail_channels=(64, 64, 128), in_channels: int = 3) -> None:
        super().__init__()
        stages, cin = [], in_channels
        for i, c in enumerate(detail_channels):
            layers = [_conv3x3(cin, c, 2)] + [_conv3x3(c, c) for _ in range(1 if i == 0 else 2)]
            stages.append(nn.Sequential(*layers))
            cin = c
        self.detail_branch = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.detail_branch:
            x = stage(x)
        return x


class StemBlock(nn.Module):
    """3x3/2 ConvModule, then [1x1 -> 3x3/2 ConvModules ; 3x3/2 max-pool] fused by a 3x3."""

    def __init__(self, in_channels: int = 3, out_channels: int = 16) -> None:
        super().__init__()
        half = out_channels // 2
        self.conv_first = _conv3x3(in_channels, out_channels, 2)
        self.convs = nn.Sequential(ConvModule(out_channels, half, 1),
                                   _conv3x3(half, out_channels, 2))
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.fuse_last = _conv3x3(out_channels * 2, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_first(x)
        return self.fuse_last(torch.cat([self.convs(x), self.pool(x)], dim=1))


class GELayer(nn.Module):
    """Gather-and-expand layer: 3x3 ConvModule, depthwise expansion by `exp_ratio` (with a second
    depthwise 3x3 when strided), 1x1 projection (no activation), residual (a depthwise
    separable projection when strided), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, exp_ratio: int = 6,
                 stride: int = 1) -> None:
        super().__init__()
        mid = in_channels * exp_ratio
        self.conv1 = _conv3x3(in_channels, in_channels)
        if stride == 1:
            self.dwconv = nn.Sequential(_conv3x3(in_channels, mid, groups=in_channels))
            self.shortcut = None
        else:
            self.dwconv = nn.Sequential(
                _conv3x3(in_channels, mid, stride, groups=in_channels, bias=False, act=None),
                _conv3x3(mid, mid, groups=mid))
            self.shortcut = nn.Sequential(DepthwiseSeparableConvModule(
                in_channels, out_channels, 3, stride, 1, act=None))
        self.conv2 = nn.Sequential(ConvModule(mid, out_channels, 1, bias=False, act=None))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.conv2(self.dwconv(self.conv1(x))) + identity)


class CEBlock(nn.Module):
    """Context embedding: global average -> BN -> 1x1 ConvModule, added to the input, 3x3."""

    def __init__(self, in_channels: int = 16, out_channels: int = 16) -> None:
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), make_norm("bn", in_channels))
        self.conv_gap = ConvModule(in_channels, out_channels, 1)
        self.conv_last = _conv3x3(out_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_last(x + self.conv_gap(self.gap(x)))


class SemanticBranch(nn.Module):
    """`stage1` StemBlock, `stage2`..`stage4` GE layers (2, 2, 4; the first strided), then
    `stage4_CEBlock`. Returns every stage's output."""

    def __init__(self, semantic_channels=(16, 32, 64, 128), in_channels: int = 3,
                 exp_ratio: int = 6) -> None:
        super().__init__()
        n = len(semantic_channels)
        self.stage_names = []
        for i, c in enumerate(semantic_channels):
            if i == 0:
                stage = StemBlock(in_channels, c)
            else:
                depth = 4 if i == n - 1 else 2
                stage = nn.Sequential(GELayer(semantic_channels[i - 1], c, exp_ratio, 2),
                                      *[GELayer(c, c, exp_ratio, 1) for _ in range(depth - 1)])
            self.stage_names.append(f"stage{i + 1}")
            self.add_module(self.stage_names[-1], stage)
        self.stage_names.append(f"stage{n}_CEBlock")
        self.add_module(self.stage_names[-1], CEBlock(semantic_channels[-1], semantic_channels[-1]))

    def forward(self, x: Tensor) -> list:
        outs = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outs.append(x)
        return outs


class BGALayer(nn.Module):
    """Bilateral guided aggregation: each branch gated by the sigmoid of the other at its own
    resolution, the low-resolution product upsampled, summed, 3x3 ConvModule."""

    def __init__(self, channels: int = 128, align_corners: bool = False) -> None:
        super().__init__()
        c = channels
        self.align_corners = align_corners
        self.detail_dwconv = nn.Sequential(
            DepthwiseSeparableConvModule(c, c, 3, 1, 1, dw_act=None, pw_norm=None, pw_act=None))
        self.detail_down = nn.Sequential(
            _conv3x3(c, c, 2, bias=False, act=None),
            nn.AvgPool2d(kernel_size=3, stride=2, padding=1))
        self.semantic_conv = nn.Sequential(_conv3x3(c, c, bias=False, act=None))
        self.semantic_dwconv = nn.Sequential(
            DepthwiseSeparableConvModule(c, c, 3, 1, 1, dw_act=None, pw_norm=None, pw_act=None))
        self.conv = _conv3x3(c, c)

    def forward(self, x_detail: Tensor, x_semantic: Tensor) -> Tensor:
        detail = self.detail_dwconv(x_detail)
        semantic_up = resize(self.semantic_conv(x_semantic), detail.shape[2:], self.align_corners)
        low = self.detail_down(x_detail) * torch.sigmoid(self.semantic_dwconv(x_semantic))
        high = detail * torch.sigmoid(semantic_up)
        return self.conv(high + resize(low, high.shape[2:], self.align_corners))


class BiSeNetV2(nn.Module):
    """Keys: `detail.*`, `semantic.*`, `bga.*` (mmseg)."""

    def __init__(self, in_channels: int = 3, detail_channels=(64, 64, 128),
                 semantic_channels=(16, 32, 64, 128), semantic_expansion_ratio: int = 6,
                 bga_channels: int = 128, out_indices=(0, 1, 2, 3, 4),
                 align_corners: bool = False) -> None:
        super().__init__()
        self.out_indices = tuple(out_indices)
        self.detail = DetailBranch(detail_channels, in_channels)
        self.semantic = SemanticBranch(semantic_channels, in_channels, semantic_expansion_ratio)
        self.bga = BGALayer(bga_channels, align_corners)

    def forward(self, x: Tensor):
        semantic = self.semantic(x)
        outs = [self.bga(self.detail(x), semantic[-1])] + semantic[:-1]
        return tuple(outs[i] for i in self.out_indices)
