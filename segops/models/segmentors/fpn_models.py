"""Semantic FPN, ResNet-based OCRNet and the SDN variants of Semantic FPN and Segmenter.

* `fpn_r50` (mmseg configs/_base_/models/fpn_r50.py, Cityscapes 19 classes): ResNet-V1c-50
  (no dilation) -> FPN(256, 4 outs) -> FPNHead(128 channels, strides 4..32, dropout 0.1).
* `ocrnet_r101-d8` (configs/ocrnet/ocrnet_r101-d8_*_cityscapes, from _base_ ocrnet_r50-d8.py):
  ResNet-V1c-101 D8, FCNHead on stage 3 (256 channels, 1 conv, loss 0.4) -> OCRHead on stage 4
  (512 channels, 256 OCR channels, dropout 0.1).
* `sdn-fpn_r50`: fpn_r50 with an SDN pyramid neck after the FPN (levels guided by the next
  coarser one). `sdn-segmenter_vit-s_mask`: segmenter_vit-s_mask with the single-scale SDN neck
  on the ViT map. No reference config exists for these two (SDN has no public code).
"""
from __future__ import annotations

from segops.models.backbones.vit import vit
from segops.models.heads.fcn_head import FCNHead
from segops.models.heads.fpn_head import FPNHead
from segops.models.heads.ocr_head import OCRHead
from segops.models.heads.fpn_neck import FPN
from segops.models.heads.sdn_neck import SDNNeck
from segops.models.heads.sdn_pyramid_neck import SDNPyramidNeck
from segops.models.registry import register_model
from segops.models.segmentors.encoder_decoder import CascadeEncoderDecoder, EncoderDecoder
from segops.models.segmentors.transformer_models import segmenter_head

from torch import nn

from segops.models.backbones.resnet import ResNetV1c, resnet_v1c_d8


def _fpn_parts(num_classes: int, norm: str, backend: str):
    neck = FPN([256, 512, 1024, 2048], 256, num_outs=4)
    head = FPNHead(in_channels=[256] * 4, in_index=[0, 1, 2, 3], feature_strides=[4, 8, 16, 32],
                   channels=128, dropout_ratio=0.1, num_classes=num_classes, norm=norm,
                   align_corners=False, backend=backend)
    return neck, head


@register_model("fpn_r50")
def fpn_r50(num_classes: int = 19, backend: str = "auto", norm: str = "bn") -> EncoderDecoder:
    """mmseg fpn_r50 (Semantic FPN, Cityscapes)."""
    neck, head = _fpn_parts(num_classes, norm, backend)
    return EncoderDecoder(ResNetV1c(50, norm=norm), head, neck=neck)


@register_model("sdn-fpn_r50")
def sdn_fpn_r50(num_classes: int = 19, backend: str = "auto", norm: str = "bn") -> EncoderDecoder:
    """fpn_r50 + SDN pyramid neck; the necks form mmseg's list-of-necks Sequential
    (`neck.0` = FPN with fpn_r50's keys, `neck.1` = SDN)."""
    fpn, head = _fpn_parts(num_classes, norm, backend)
    neck = nn.Sequential(fpn, SDNPyramidNeck(256, 4, backend=backend))
    return EncoderDecoder(ResNetV1c(50, norm=norm), head, neck=neck)


@register_model("ocrnet_r101-d8")
def ocrnet_r101_d8(num_classes: int = 19, backend: str = "auto",
                   norm: str = "bn") -> CascadeEncoderDecoder:
    """mmseg ocrnet_r101-d8 (Cityscapes)."""
    fcn = FCNHead(in_channels=1024, in_index=2, channels=256, num_convs=1, concat_input=False,
                  dropout_ratio=0.1, num_classes=num_classes, norm=norm, align_corners=False,
                  backend=backend)
    ocr = OCRHead(ocr_channels=256, in_channels=2048, in_index=3, channels=512,
                  dropout_ratio=0.1, num_classes=num_classes, norm=norm, align_corners=False,
                  backend=backend)
    return CascadeEncoderDecoder(resnet_v1c_d8(101, norm=norm), [fcn, ocr])


@register_model("sdn-segmenter_vit-s_mask")
def sdn_segmenter_vit_s(num_classes: int = 150, backend: str = "auto") -> EncoderDecoder:
    """segmenter_vit-s_mask with the single-scale SDN neck (heads/sdn_neck.py, as sdn-fcn_r50-d8:
    stride-2 conv guidance of 384 // 4 channels) on the ViT-S map (ADE20K)."""
    return EncoderDecoder(vit("s"), segmenter_head("s", num_classes, backend),
                          neck=SDNNeck(384, backend=backend))

