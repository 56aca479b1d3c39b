"""Minimal mmseg `FCNHead` for the HRNet models (fcn_hr*, the FCN stage of ocrnet_hr*).

NOTE: a full FCNHead (dilation, the other config options) belongs to the dilated-FCN heads work;
this local copy covers what HRNet configs use and has mmseg's state_dict keys (`convs.<i>.conv`,
`convs.<i>.bn`, `conv_cat`, `conv_seg`). The lead may replace it with the shared one on merge.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segops.models.common import BaseDecodeHead, ConvModule


class FCNHead(BaseDecodeHead):
    def __init__(self, num_convs: int = 2, kernel_size: int = 3, concat_input: bool = True,
                 dilation: int = 1, **kwargs) -> None:
        if num_convs < 0 or dilation <= 0:
            raise ValueError(f"FCNHead: num_convs >= 0 and dilation > 0 required, got "
                             f"num_convs={num_convs}, dilation={dilation}")
        super().__init__(**kwargs)
        self.num_convs = num_convs
        self.concat_input = concat_input
        pad = (kernel_size // 2) * dilation
        convs = [ConvModule(self.in_channels if i == 0 else self.channels, self.channels,
                            kernel_size, padding=pad, dilation=dilation, norm=self.norm,
                            act=self.act) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        if concat_input:
            self.conv_cat = ConvModule(self.in_channels + self.channels, self.channels,
                                       kernel_size, padding=kernel_size // 2, norm=self.norm,
                                       act=self.act)

    def forward(self, inputs) -> Tensor:
        x = self._transform_inputs(inputs)
        feats = self.convs(x)
        if self.concat_input:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return self.cls_seg(feats)
