"""STLNet head (Zhu et al., "Learning Statistical Texture for Semantic Segmentation", CVPR 2021).

What follows the official code (`lanyunzhu99/Learning-Statistical-Texture-for-Semantic-Segmentation`,
`STLNet.py`): the STL block itself (TEM with 128 quantisation levels, PTFEM with 8 levels at
scales 1, 2, 3, 6; 768 output channels), used here as `segops.nn.STL`, whose QCO histograms run
through the segops QCO operators.

What follows only the paper (the official repository has no network or config around the
block): ResNet-101 + ASPP context branch on the last stage (mmseg's ASPPHead layers, dilations
1, 12, 24, 36, 512 channels); the "first two low-level features" (stage 1, 256 ch, and stage 2,
512 ch, resized to stage 1's grid) concatenated (768 ch) into the STL block; the context feature
upsampled to that grid and concatenated with the texture feature, fused by a 3x3 ConvModule to
512 channels (`fuse`, our choice of width), dropout and classifier.
"""
from __future__ import annotations

import torch

from segops.models.common import resize
from segops.models.heads.aspp_head import ASPPHead
from segops.nn import STL, ConvModule


class STLHead(ASPPHead):
    """Inputs: the 4 backbone stages. `low_in_channels` are the channels of stages 1 and 2."""

    def __init__(self, in_channels, channels: int, num_classes: int, *,
                 low_in_channels=(256, 512), dilations=(1, 12, 24, 36), **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, dilations=dilations, **kwargs)
        self.low_in_channels = tuple(low_in_channels)
        self.stl = STL(sum(self.low_in_channels))
        self.fuse = ConvModule(channels + self.stl.out_channels, channels, 3, padding=1,
                               norm=self.norm, act=self.act)

    def forward(self, inputs):
        context = self._aspp(self._transform_inputs(inputs))
        low = inputs[0]
        low = torch.cat([low] + [resize(f, low.shape[2:], self.align_corners)
                                 for f in inputs[1:len(self.low_in_channels)]], dim=1)
        texture = self.stl(low)
        out = torch.cat([resize(context, texture.shape[2:], self.align_corners), texture], dim=1)
        return self.cls_seg(self.fuse(out))
