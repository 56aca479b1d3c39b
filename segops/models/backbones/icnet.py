"""ICNet's three-branch backbone (Zhao et al., ECCV 2018) with mmseg's structure and keys.

Follows mmseg `mmseg/models/backbones/icnet.py`: `conv_sub1`, three stride-2 3x3 ConvModules
on the full-resolution image (1/8); the half-resolution image through a ResNetV1c-D8's stem and
stages 1-2 (`conv_sub2` 1x1 on it: 1/16 of the input); that feature halved again through stages
3-4, a pyramid pooling module and a 3x3 bottleneck (`conv_sub4` 1x1: 1/32). The ResNet's
max-pool uses ceil_mode=True, as mmseg sets it. Returns the three branch features.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segops.models.backbones.resnet import resnet_v1c_d8
from segops.models.heads.psp_head import PPM
from segops.nn import ConvModule


class ICNet(nn.Module):
    """Keys: `backbone.*` (ResNetV1c), `psp_modules.*`, `psp_bottleneck`, `conv_sub1.{0,1,2}`,
    `conv_sub2`, `conv_sub4`."""

    def __init__(self, depth: int = 50, in_channels: int = 3, layer_channels=(512, 2048),
                 light_branch_middle_channels: int = 32, psp_out_channels: int = 512,
                 out_channels=(64, 256, 256), pool_scales=(1, 2, 3, 6), norm="bn",
                 align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.backbone = resnet_v1c_d8(depth, norm=norm, stem_pool_ceil_mode=True)
        self.psp_modules = PPM(pool_scales, layer_channels[1], psp_out_channels, norm,
                               align_corners=align_corners)
        self.psp_bottleneck = ConvModule(layer_channels[1] + len(pool_scales) * psp_out_channels,
                                         psp_out_channels, 3, padding=1, norm=norm)
        mid = light_branch_middle_channels
        self.conv_sub1 = nn.Sequential(*[
            ConvModule(cin, cout, 3, 2, 1, norm=norm)
            for cin, cout in ((in_channels, mid), (mid, mid), (mid, out_channels[0]))])
        self.conv_sub2 = ConvModule(layer_channels[0], out_channels[1], 1, norm=norm)
        self.conv_sub4 = ConvModule(psp_out_channels, out_channels[2], 1, norm=norm)

    def _half(self, x: Tensor) -> Tensor:
        return nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear",
                                         align_corners=self.align_corners)

    def forward(self, x: Tensor):
        r = self.backbone
        sub1 = self.conv_sub1(x)
        x = r.layer2(r.layer1(r.maxpool(r.stem(self._half(x)))))
        sub2 = self.conv_sub2(x)
        x = r.layer4(r.layer3(self._half(x)))
        x = self.psp_bottleneck(torch.cat([*self.psp_modules(x), x], dim=1))
        return [sub1, sub2, self.conv_sub4(x)]
