"""ANN head (Zhu et al., ICCV 2019) as mmseg's `ANNHead` (`mmseg/models/decode_heads/ann_head.py`).

AFNB fuses stage 3 (keys/values) into stage 4 (queries); APNB is the self-attention on the fused
feature; in both, keys and values are pyramid-pooled (scales 1, 3, 6, 8 -> 110 positions) and the
attention `softmax_j(<q_i, k_j> / sqrt(C)) v_j` over those pooled keys runs through
`segops.nn.SelfAttentionBlock` (a 1-D key set against a 2-D query grid).
Submodule names follow mmseg (`fusion.stages.0.key_project.conv`, ..., `context.bottleneck`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segops.models.common import BaseDecodeHead
from segops.nn import ConvModule, SelfAttentionBlock


class PPMConcat(nn.ModuleList):
    """Adaptive average pools at `pool_scales`, flattened and concatenated: (N, C, sum s^2)."""

    def __init__(self, pool_scales=(1, 3, 6, 8)) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(s) for s in pool_scales)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([pool(x).flatten(2) for pool in self], dim=2)


class ANNAttention(SelfAttentionBlock):
    """mmseg ann_head's SelfAttentionBlock: query/key = 1x1 ConvModule (norm, act), value = 1x1
    conv to `channels`, out = 1x1 conv to `out_channels` (zero-initialised); keys and values
    pooled by PPMConcat; optional max-pool of the query by `query_scale`."""

    def __init__(self, low_in_channels: int, high_in_channels: int, channels: int,
                 out_channels: int, share_key_query: bool, query_scale: int, key_pool_scales,
                 norm="bn", act="relu") -> None:
        super().__init__(low_in_channels, high_in_channels, channels, out_channels,
                         share_key_query=share_key_query,
                         query_downsample=nn.MaxPool2d(query_scale) if query_scale > 1 else None,
                         key_downsample=PPMConcat(key_pool_scales), norm=norm, act=act)


class AFNB(nn.Module):
    """Asymmetric fusion non-local block: sum of per-query-scale attentions, then a 1x1
    ConvModule (no activation) over [context; high]."""

    def __init__(self, low_in_channels: int, high_in_channels: int, channels: int,
                 out_channels: int, query_scales, key_pool_scales, norm="bn",
                 act="relu") -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            ANNAttention(low_in_channels, high_in_channels, channels, out_channels, False, s,
                         key_pool_scales, norm, act) for s in query_scales)
        self.bottleneck = ConvModule(out_channels + high_in_channels, out_channels, 1, norm=norm,
                                     act=None)

    def forward(self, low_feats: Tensor, high_feats: Tensor) -> Tensor:
        context = sum(stage(high_feats, low_feats) for stage in self.stages)
        return self.bottleneck(torch.cat([context, high_feats], dim=1))


class APNB(nn.Module):
    """Asymmetric pyramid non-local block: shared key/query projection, 1x1 ConvModule over
    [context; feats]."""

    def __init__(self, in_channels: int, channels: int, out_channels: int, query_scales,
                 key_pool_scales, norm="bn", act="relu") -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            ANNAttention(in_channels, in_channels, channels, out_channels, True, s,
                         key_pool_scales, norm, act) for s in query_scales)
        self.bottleneck = ConvModule(2 * in_channels, out_channels, 1, norm=norm, act=act)

    def forward(self, feats: Tensor) -> Tensor:
        context = sum(stage(feats, feats) for stage in self.stages)
        return self.bottleneck(torch.cat([context, feats], dim=1))


class ANNHead(BaseDecodeHead):
    """in_channels = (low, high), in_index = (2, 3): AFNB -> dropout -> 3x3 bottleneck -> APNB ->
    `conv_seg`."""

    def __init__(self, in_channels, channels: int, num_classes: int, *, project_channels: int = 256,
                 query_scales=(1,), key_pool_scales=(1, 3, 6, 8), **kwargs) -> None:
        kwargs["input_transform"] = "multiple_select"
        super().__init__(in_channels, channels, num_classes, **kwargs)
        if len(self.in_channels) != 2:
            raise ValueError(f"ANNHead needs two inputs (low, high), got in_channels={in_channels}")
        low, high = self.in_channels
        self.project_channels = project_channels
        self.fusion = AFNB(low, high, project_channels, high, query_scales, key_pool_scales,
                           self.norm, self.act)
        self.bottleneck = ConvModule(high, channels, 3, padding=1, norm=self.norm, act=self.act)
        self.context = APNB(channels, project_channels, channels, query_scales, key_pool_scales,
                            self.norm, self.act)

    def forward(self, inputs):
        low, high = self._transform_inputs(inputs)
        out = self.fusion(low, high)
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.context(self.bottleneck(out))
        return self.cls_seg(out)
