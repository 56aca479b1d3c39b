"""DeepLabV3 / DeepLabV3+ heads as mmseg's `ASPPHead` (`mmseg/models/decode_heads/aspp_head.py`)
and `DepthwiseSeparableASPPHead` (`sep_aspp_head.py`)."""
from __future__ import annotations

import torch
from torch import nn

from segops.models.common import BaseDecodeHead, DepthwiseSeparableConvModule, resize
from segops.nn import ConvModule


class ASPPModule(nn.ModuleList):
    """One branch per dilation: 1x1 ConvModule for dilation 1, else a dilated 3x3 one
    (a depthwise-separable one when `separable`)."""

    def __init__(self, dilations, in_channels: int, channels: int, norm="bn", act="relu",
                 separable: bool = False) -> None:
        branches = []
        for d in dilations:
            if d == 1:
                branches.append(ConvModule(in_channels, channels, 1, norm=norm, act=act))
            elif separable:
                branches.append(DepthwiseSeparableConvModule(in_channels, channels, 3, padding=d,
                                                             dilation=d, norm=norm, act=act))
            else:
                branches.append(ConvModule(in_channels, channels, 3, padding=d, dilation=d,
                                           norm=norm, act=act))
        super().__init__(branches)

    def forward(self, x):
        return [branch(x) for branch in self]


class ASPPHead(BaseDecodeHead):
    """DeepLabV3 (Chen et al., 2017): [image pool; ASPP branches] -> 3x3 `bottleneck` -> `conv_seg`.
    Keys: `image_pool.1.*`, `aspp_modules.<i>.*`, `bottleneck.*`."""

    def __init__(self, in_channels, channels: int, num_classes: int, *,
                 dilations=(1, 12, 24, 36), **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.dilations = tuple(dilations)
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            ConvModule(self.in_channels, channels, 1, norm=self.norm, act=self.act))
        self.aspp_modules = ASPPModule(dilations, self.in_channels, channels, self.norm, self.act)
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3, padding=1,
                                     norm=self.norm, act=self.act)

    def _aspp(self, x):
        pooled = resize(self.image_pool(x), x.shape[2:], self.align_corners)
        return self.bottleneck(torch.cat([pooled, *self.aspp_modules(x)], dim=1))

    def forward(self, inputs):
        return self.cls_seg(self._aspp(self._transform_inputs(inputs)))


class DepthwiseSeparableASPPHead(ASPPHead):
    """DeepLabV3+ (Chen et al., ECCV 2018): ASPP with depthwise-separable dilated branches, then a
    decoder that concatenates the upsampled ASPP output with `c1_bottleneck(inputs[0])` (a 1x1
    ConvModule to `c1_channels`) and applies two depthwise-separable 3x3 convs (`sep_bottleneck`).
    `c1_in_channels=0` disables the low-level branch."""

    def __init__(self, in_channels, channels: int, num_classes: int, *, c1_in_channels: int,
                 c1_channels: int, **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        if c1_in_channels < 0:
            raise ValueError(f"c1_in_channels must be >= 0, got {c1_in_channels}")
        self.aspp_modules = ASPPModule(self.dilations, self.in_channels, channels, self.norm,
                                       self.act, separable=True)
        if c1_in_channels > 0:
            self.c1_bottleneck = ConvModule(c1_in_channels, c1_channels, 1, norm=self.norm,
                                            act=self.act)
        else:
            self.c1_bottleneck = None
            c1_channels = 0
        self.sep_bottleneck = nn.Sequential(
            DepthwiseSeparableConvModule(channels + c1_channels, channels, 3, padding=1,
                                         norm=self.norm, act=self.act),
            DepthwiseSeparableConvModule(channels, channels, 3, padding=1, norm=self.norm,
                                         act=self.act))

    def forward(self, inputs):
        out = self._aspp(self._transform_inputs(inputs))
        if self.c1_bottleneck is not None:
            c1 = self.c1_bottleneck(inputs[0])
            out = torch.cat([resize(out, c1.shape[2:], self.align_corners), c1], dim=1)
        return self.cls_seg(self.sep_bottleneck(out))
