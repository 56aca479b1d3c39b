"""FCN head (Long et al., CVPR 2015) as mmseg's `FCNHead` (`mmseg/models/decode_heads/fcn_head.py`)."""
from __future__ import annotations

import torch
from torch import nn

from segops.models.common import BaseDecodeHead
from segops.nn import ConvModule

class FCNHead(BaseDecodeHead):
    """`num_convs` k x k ConvModules (`convs.<i>`), optionally `conv_cat` over [input; convs
    output] (`concat_input`), then dropout + `conv_seg`. State-dict keys as mmseg's.

    `conv_bias` is passed to every ConvModule ("auto": bias only without norm, as mmcv); the
    OCNet auxiliary head uses True to follow openseg.pytorch's convs, which keep their bias.
    """

    def __init__(self, in_channels, channels: int, num_classes: int, *, num_convs: int = 2,
                 kernel_size: int = 3, concat_input: bool = True, dilation: int = 1,
                 conv_bias="auto", **kwargs) -> None:
        if num_convs < 0 or dilation < 1:
            raise ValueError(f"FCNHead needs num_convs >= 0 and dilation >= 1, got "
                             f"num_convs={num_convs}, dilation={dilation}")
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.num_convs = num_convs
        self.concat_input = concat_input
        self.kernel_size = kernel_size
        if num_convs == 0 and self.in_channels != channels:
            raise ValueError(f"FCNHead with num_convs=0 needs in_channels == channels, got "
                             f"{self.in_channels} and {channels}")
        pad = (kernel_size // 2) * dilation
        conv = dict(kernel_size=kernel_size, padding=pad, dilation=dilation, bias=conv_bias,
                    norm=self.norm, act=self.act)
        convs = [ConvModule(self.in_channels if i == 0 else channels, channels, **conv)
                 for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        if concat_input:
            self.conv_cat = ConvModule(self.in_channels + channels, channels, **conv)

    def _forward_feature(self, inputs):
        x = self._transform_inputs(inputs)
        out = self.convs(x)
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return out

    def forward(self, inputs):
        return self.cls_seg(self._forward_feature(inputs))
