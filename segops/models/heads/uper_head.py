"""UPerNet head (Xiao et al., ECCV 2018) as mmseg's `UPerHead` (`mmseg/models/decode_heads/
uper_head.py`): PPM on the coarsest input (`psp_modules`, `bottleneck`), 1x1 `lateral_convs` on
the others, bilinear top-down addition, 3x3 `fpn_convs`, all levels resized to the finest and
concatenated, 3x3 `fpn_bottleneck`, classifier. Keys as mmseg."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segops.models.common import BaseDecodeHead, resize
from segops.models.heads.psp_head import PPM
from segops.nn import ConvModule


class UPerHead(BaseDecodeHead):
    def __init__(self, pool_scales=(1, 2, 3, 6), **kwargs) -> None:
        kwargs["input_transform"] = "multiple_select"
        super().__init__(**kwargs)
        c, cin = self.channels, self.in_channels
        conv = dict(norm=self.norm, act=self.act)
        self.psp_modules = PPM(pool_scales, cin[-1], c, self.norm, self.act, self.align_corners)
        self.bottleneck = ConvModule(cin[-1] + len(pool_scales) * c, c, 3, padding=1, **conv)
        self.lateral_convs = nn.ModuleList([ConvModule(ci, c, 1, **conv) for ci in cin[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModule(c, c, 3, padding=1, **conv) for _ in cin[:-1]])
        self.fpn_bottleneck = ConvModule(len(cin) * c, c, 3, padding=1, **conv)

    def forward(self, inputs) -> Tensor:
        x = self._transform_inputs(inputs)
        lat = [conv(xi) for conv, xi in zip(self.lateral_convs, x)]
        lat.append(self.bottleneck(torch.cat([x[-1], *self.psp_modules(x[-1])], dim=1)))
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + resize(lat[i], lat[i - 1].shape[2:], self.align_corners)
        outs = [conv(lat[i]) for i, conv in enumerate(self.fpn_convs)] + [lat[-1]]
        size = outs[0].shape[2:]
        outs = [resize(o, size, self.align_corners) for o in outs]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))
