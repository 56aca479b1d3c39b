"""PSPNet head (Zhao et al., CVPR 2017) as mmseg's `PSPHead` (`mmseg/models/decode_heads/psp_head.py`)."""
from __future__ import annotations

import torch
from torch import nn

from segops.models.common import BaseDecodeHead, resize
from segops.nn import ConvModule

class PPM(nn.ModuleList):
    """Pyramid pooling module: per scale, adaptive average pool -> 1x1 ConvModule, upsampled back
    (`<i>.0` pool, `<i>.1` ConvModule, as mmseg)."""

    def __init__(self, pool_scales, in_channels: int, channels: int, norm="bn", act="relu",
                 align_corners: bool = False) -> None:
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(s),
                                       ConvModule(in_channels, channels, 1, norm=norm, act=act))
                         for s in pool_scales)
        self.align_corners = align_corners

    def forward(self, x):
        return [resize(stage(x), x.shape[2:], self.align_corners) for stage in self]


class PSPHead(BaseDecodeHead):
    """[x; PPM(x)] -> 3x3 `bottleneck` -> `conv_seg`. Keys: `psp_modules.*`, `bottleneck.*`."""

    def __init__(self, in_channels, channels: int, num_classes: int, *,
                 pool_scales=(1, 2, 3, 6), **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.pool_scales = tuple(pool_scales)
        self.psp_modules = PPM(pool_scales, self.in_channels, channels, self.norm, self.act,
                               self.align_corners)
        self.bottleneck = ConvModule(self.in_channels + len(pool_scales) * channels, channels, 3,
                                     padding=1, norm=self.norm, act=self.act)

    def forward(self, inputs):
        x = self._transform_inputs(inputs)
        out = self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))
        return self.cls_seg(out)
