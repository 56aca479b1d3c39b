"""OCRNet head (Yuan et al., ECCV 2020) as mmseg's `OCRHead` (`mmseg/models/decode_heads/
ocr_head.py`), a cascade stage fed the previous stage's logits.

Object regions: `SpatialGatherModule` softmaxes the coarse logits over positions and pools one
feature vector per class (the K region representations). Pixel-region relation: the
`ObjectAttentionBlock` (`segops.nn.SelfAttentionBlock` with 2-conv key/query projections,
BN+ReLU everywhere, scaled by ocr_channels**-0.5, out projection, then a 1x1 `bottleneck` over
[context; feats]), with the K regions as a (K, 1) key grid, so a fused backend carries the
attention. State-dict keys as mmseg.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.common import BaseDecodeHead
from segops.nn import ConvModule, SelfAttentionBlock


class SpatialGatherModule(nn.Module):
    """Class-region representations: (N, C, H, W) feats, (N, K, H, W) logits -> (N, C, K, 1)."""

    def __init__(self, scale: float = 1) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, feats: Tensor, probs: Tensor) -> Tensor:
        n, k = probs.shape[:2]
        probs = F.softmax(self.scale * probs.reshape(n, k, -1), dim=2)
        ctx = probs @ feats.reshape(n, feats.shape[1], -1).transpose(1, 2)  # (N, K, C)
        return ctx.transpose(1, 2).unsqueeze(3).contiguous()


class ObjectAttentionBlock(SelfAttentionBlock):
    def __init__(self, in_channels: int, channels: int, scale: int = 1, norm="bn",
                 act="relu") -> None:
        super().__init__(in_channels, in_channels, channels, in_channels,
                         query_downsample=nn.MaxPool2d(scale) if scale > 1 else None,
                         key_query_num_convs=2, value_out_norm=True, norm=norm, act=act)
        self.bottleneck = ConvModule(in_channels * 2, in_channels, 1, norm=norm, act=act)

    def forward(self, query_feats: Tensor, key_feats: Tensor) -> Tensor:
        context = super().forward(query_feats, key_feats)
        return self.bottleneck(torch.cat([context, query_feats], dim=1))


class OCRHead(BaseDecodeHead):
    """`forward(inputs, prev_output)`: prev_output are the previous stage's logits."""

    def __init__(self, ocr_channels: int, scale: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ocr_channels = ocr_channels
        self.scale = scale
        self.object_context_block = ObjectAttentionBlock(self.channels, ocr_channels, scale,
                                                         self.norm, self.act)
        self.spatial_gather_module = SpatialGatherModule(scale)
        self.bottleneck = ConvModule(self.in_channels, self.channels, 3, padding=1,
                                     norm=self.norm, act=self.act)

    def forward(self, inputs, prev_output: Tensor) -> Tensor:
        x = self._transform_inputs(inputs)
        feats = self.bottleneck(x)
        context = self.spatial_gather_module(feats, prev_output)
        return self.cls_seg(self.object_context_block(feats, context))
