"""CCNet head (Huang et al., ICCV 2019) as mmseg's `CCHead` (`mmseg/models/decode_heads/cc_head.py`):
an FCNHead whose two convs enclose `recurrence` applications of one criss-cross attention
module (RCCA, weights shared across recurrences), run through `segops.nn.CrissCrossAttention`."""
from __future__ import annotations

import torch

from segops.models.heads.fcn_head import FCNHead
from segops.nn import CrissCrossAttention


class CCHead(FCNHead):
    def __init__(self, in_channels, channels: int, num_classes: int, *, recurrence: int = 2,
                 **kwargs) -> None:
        kwargs.pop("num_convs", None)
        super().__init__(in_channels, channels, num_classes, num_convs=2, **kwargs)
        self.recurrence = recurrence
        self.cca = CrissCrossAttention(channels)

    def forward(self, inputs):
        x = self._transform_inputs(inputs)
        out = self.convs[0](x)
        for _ in range(self.recurrence):
            out = self.cca(out)
        out = self.convs[1](out)
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls_seg(out)
