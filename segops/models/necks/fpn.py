"""Feature Pyramid Network neck as mmseg's `FPN` (`mmseg/models/necks/fpn.py`), the Semantic FPN
configuration: 1x1 `lateral_convs`, nearest-neighbour top-down addition, 3x3 `fpn_convs`, no
norm/activation (convs with bias), `num_outs == len(in_channels)` unless extra max-pool levels
are asked for. Keys `lateral_convs.<i>.conv`, `fpn_convs.<i>.conv` as mmseg."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from segops.nn import ConvModule

class FPN(nn.Module):
    def __init__(self, in_channels, out_channels: int, num_outs: int, norm=None, act=None) -> None:
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"FPN: num_outs ({num_outs}) must be >= len(in_channels) "
                             f"({len(in_channels)})")
        self.in_channels = list(in_channels)
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(
            [ConvModule(c, out_channels, 1, norm=norm, act=act) for c in in_channels])
        self.fpn_convs = nn.ModuleList(
            [ConvModule(out_channels, out_channels, 3, padding=1, norm=norm, act=act)
             for _ in in_channels])

    def forward(self, inputs):
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"FPN expects {len(self.in_channels)} inputs, got {len(inputs)}")
        lat = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:],
                                                    mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat)]
        while len(outs) < self.num_outs:  # mmseg's add_extra_convs=False: stride-2 max pooling
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)
