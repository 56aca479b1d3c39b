"""Semantic FPN and its SDN variant (Cityscapes, 19 classes).

* `fpn_r50` (mmseg configs/_base_/models/fpn_r50.py): ResNet-V1c-50 (no dilation) ->
  FPN(256, 4 outs) -> FPNHead(128 channels, strides 4..32, dropout 0.1).
* `sdn-fpn_r50`: fpn_r50 with an SDN pyramid neck after the FPN (levels guided by the next
  coarser one). No reference config exists (SDN has no public code).
"""
from __future__ import annotations

from torch import nn

from segops.models.backbones.resnet import ResNetV1c
from segops.models.heads.fpn_head import FPNHead
from segops.models.necks.fpn import FPN
from segops.models.necks.sdn import SDNPyramidNeck
from segops.models.registry import register_model
from segops.models.segmentors.encoder_decoder import EncoderDecoder


def _fpn_head(num_classes: int, norm: str) -> FPNHead:
    return FPNHead(in_channels=[256] * 4, in_index=[0, 1, 2, 3], feature_strides=[4, 8, 16, 32],
                   channels=128, dropout_ratio=0.1, num_classes=num_classes, norm=norm,
                   align_corners=False)


def fpn_r50(num_classes: int = 19, norm: str = "bn", sdn: bool = False) -> EncoderDecoder:
    """mmseg fpn_r50 (Semantic FPN, Cityscapes). With `sdn`, the necks form mmseg's
    list-of-necks Sequential (`neck.0` = FPN with fpn_r50's keys, `neck.1` = SDN pyramid)."""
    neck = FPN([256, 512, 1024, 2048], 256, num_outs=4)
    if sdn:
        neck = nn.Sequential(neck, SDNPyramidNeck(256, 4))
    return EncoderDecoder(ResNetV1c(50, norm=norm), _fpn_head(num_classes, norm), neck=neck)


register_model("fpn_r50", fpn_r50)
register_model("sdn-fpn_r50", fpn_r50, sdn=True)
