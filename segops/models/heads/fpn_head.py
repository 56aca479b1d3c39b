"""Semantic FPN head (Kirillov et al., CVPR 2019) as mmseg's `FPNHead`: per level, a stack of
3x3 ConvModules each followed by a 2x bilinear upsample until stride feature_strides[0]; the
levels are summed. Keys `scale_heads.<level>.<k>.{conv,bn}` as mmseg (the upsamples have no
parameters)."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.common import BaseDecodeHead
from segops.nn import ConvModule

class _Up2(nn.Module):
    def __init__(self, align_corners: bool) -> None:
        super().__init__()
        self.align_corners = align_corners

    def forward(self, x: Tensor) -> Tensor:
        size = [2 * t for t in x.shape[-2:]]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)


class FPNHead(BaseDecodeHead):
    def __init__(self, feature_strides, **kwargs) -> None:
        kwargs.setdefault("input_transform", "multiple_select")
        super().__init__(**kwargs)
        if len(feature_strides) != len(self.in_channels) or \
                min(feature_strides) != feature_strides[0]:
            raise ValueError(f"FPNHead: feature_strides {feature_strides} must have one entry per "
                             f"input and start with the smallest")
        self.feature_strides = list(feature_strides)
        self.scale_heads = nn.ModuleList()
        for i, stride in enumerate(feature_strides):
            n = max(1, int(math.log2(stride) - math.log2(feature_strides[0])))
            layers = []
            for k in range(n):
                layers.append(ConvModule(self.in_channels[i] if k == 0 else self.channels,
                                         self.channels, 3, padding=1, norm=self.norm,
                                         act=self.act))
                if stride != feature_strides[0]:
                    layers.append(_Up2(self.align_corners))
            self.scale_heads.append(nn.Sequential(*layers))

    def forward(self, inputs) -> Tensor:
        x = self._transform_inputs(inputs)
        out = self.scale_heads[0](x[0])
        for i in range(1, len(self.feature_strides)):
            y = self.scale_heads[i](x[i])
            if y.shape[2:] != out.shape[2:]:
                y = F.interpolate(y, size=out.shape[2:], mode="bilinear",
                                  align_corners=self.align_corners)
            out = out + y
        return self.cls_seg(out)
