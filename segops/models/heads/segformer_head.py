"""SegFormer all-MLP head as mmseg's `SegformerHead`: per level a 1x1 ConvModule to `channels`,
bilinear resize to the first level, concat, 1x1 `fusion_conv`, classifier."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.common import BaseDecodeHead
from segops.nn import ConvModule

class SegformerHead(BaseDecodeHead):
    def __init__(self, **kwargs) -> None:
        kwargs["input_transform"] = "multiple_select"
        super().__init__(**kwargs)
        if len(self.in_channels) != len(self.in_index):
            raise ValueError("SegformerHead: in_channels and in_index must have equal length")
        self.convs = nn.ModuleList([ConvModule(c, self.channels, 1, norm=self.norm, act=self.act)
                                    for c in self.in_channels])
        self.fusion_conv = ConvModule(self.channels * len(self.in_channels), self.channels, 1,
                                      norm=self.norm, act=self.act)

    def forward(self, inputs) -> Tensor:
        x = self._transform_inputs(inputs)
        size = x[0].shape[2:]
        outs = [F.interpolate(conv(xi), size=size, mode="bilinear",
                              align_corners=self.align_corners) for conv, xi in zip(self.convs, x)]
        return self.cls_seg(self.fusion_conv(torch.cat(outs, dim=1)))
