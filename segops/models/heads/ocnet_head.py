"""OCNet Base-OC head (Yuan et al., "OCNet: Object Context Network for Scene Parsing", 2018),
following openseg.pytorch `lib/models/nets/ocnet.py` (`BaseOCNet`) and
`lib/models/modules/base_oc_block.py` (`BaseOC_Module`, `SelfAttentionBlock2D`).

3x3 conv (with bias, as openseg) + BN + ReLU to 512, then the Base-OC block: object context
`softmax_j(<q_i, k_j> / sqrt(256)) v_j` (query/key: two 1x1 conv(bias)+BN+ReLU to 256, value 1x1
conv to 256, output 1x1 conv `W` to 512, zero-initialised), concatenated with its input and
fused by a 1x1 conv(bias)+BN+ReLU, dropout 0.05, classifier. The attention is
`segops.nn.SelfAttentionBlock` under openseg's names. Submodule names are openseg's where they map
(`oc_module_pre`, `oc_module.stages.<i>.{f_key,f_query,f_value,W}`), but the conv-BN pairs are
mmcv-style ConvModules, so openseg checkpoints need a key rename to load.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.common import BaseDecodeHead
from segops.nn import ConvModule, SelfAttentionBlock


class ObjectContextAttention(SelfAttentionBlock):
    """openseg's SelfAttentionBlock2D: query/key two 1x1 conv(bias)+BN+ReLU to `key_channels`,
    value 1x1 conv to `value_channels`, `W` 1x1 conv to `out_channels` (zero-initialised).
    `scale > 1` max-pools the input first and upsamples the context back (align_corners=True,
    as openseg)."""

    names = {"key": "f_key", "query": "f_query", "value": "f_value", "out": "W"}

    def __init__(self, in_channels: int, key_channels: int, value_channels: int,
                 out_channels: int | None = None, scale: int = 1, norm="bn") -> None:
        out_channels = in_channels if out_channels is None else out_channels
        super().__init__(in_channels, in_channels, key_channels, out_channels,
                         key_query_num_convs=2, value_channels=value_channels, conv_bias=True,
                         norm=norm)
        self.scale = scale
        self.pool = nn.MaxPool2d(scale) if scale > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[2:]
        if self.pool is not None:
            x = self.pool(x)
        context = super().forward(x, x)
        if self.pool is not None:
            context = F.interpolate(context, size=(h, w), mode="bilinear", align_corners=True)
        return context


class BaseOCModule(nn.Module):
    """Sum of the object-context stages, concatenated with the input, 1x1 conv(bias)+BN+ReLU.
    (openseg's trailing Dropout2d is the decode head's dropout here.)"""

    def __init__(self, in_channels: int, out_channels: int, key_channels: int,
                 value_channels: int, sizes=(1,), norm="bn") -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            ObjectContextAttention(in_channels, key_channels, value_channels, in_channels, s,
                                   norm) for s in sizes)
        self.conv_bn = ConvModule(2 * in_channels, out_channels, 1, bias=True, norm=norm)

    def forward(self, feats: Tensor) -> Tensor:
        context = sum(stage(feats) for stage in self.stages)
        return self.conv_bn(torch.cat([context, feats], dim=1))


class BaseOCHead(BaseDecodeHead):
    def __init__(self, in_channels, channels: int, num_classes: int, *, key_channels: int = 256,
                 value_channels: int = 256, sizes=(1,), **kwargs) -> None:
        kwargs.setdefault("dropout_ratio", 0.05)
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.oc_module_pre = ConvModule(self.in_channels, channels, 3, padding=1, bias=True,
                                        norm=self.norm, act=self.act)
        self.oc_module = BaseOCModule(channels, channels, key_channels, value_channels, sizes,
                                      self.norm)

    def forward(self, inputs):
        x = self._transform_inputs(inputs)
        return self.cls_seg(self.oc_module(self.oc_module_pre(x)))
