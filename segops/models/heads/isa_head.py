"""ISANet head (Huang et al., 2019) as mmseg's `ISAHead` (`mmseg/models/decode_heads/isa_head.py`):
3x3 `in_conv`, interlaced sparse self-attention (long-range then short-range groups, through
`segops.nn.InterlacedSparseAttention`), `out_conv` over [attention output; in_conv output],
classifier.

State-dict keys are mmseg's (`global_relation.*`, `local_relation.*` directly under the head):
like mmseg, the head holds the two relation blocks itself (those of
`segops.nn.InterlacedSparseAttention`) and runs them with the layer's padding and cropping.
"""
from __future__ import annotations

import torch

from segops.models.common import BaseDecodeHead
from segops.nn import ConvModule
from segops.nn.interlaced_sparse_attention import ISASelfAttentionBlock, interlaced_relations


class ISAHead(BaseDecodeHead):
    def __init__(self, in_channels, channels: int, num_classes: int, *, isa_channels: int = 256,
                 down_factor=(8, 8), **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.down_factor = tuple(down_factor)
        self.in_conv = ConvModule(self.in_channels, channels, 3, padding=1, norm=self.norm,
                                  act=self.act)
        relation = dict(norm=self.norm, act=self.act)
        self.global_relation = ISASelfAttentionBlock(channels, isa_channels, self.down_factor,
                                                     "long", **relation)
        self.local_relation = ISASelfAttentionBlock(channels, isa_channels, self.down_factor,
                                                    "short", **relation)
        self.out_conv = ConvModule(2 * channels, channels, 1, norm=self.norm, act=self.act)

    def forward(self, inputs):
        x = self.in_conv(self._transform_inputs(inputs))
        context = interlaced_relations(x, self.global_relation, self.local_relation)
        return self.cls_seg(self.out_conv(torch.cat([context, x], dim=1)))
