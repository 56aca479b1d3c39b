"""OCRNet (CascadeEncoderDecoder: FCN soft regions -> OCR head) and its FCN first stage alone,
Cityscapes defaults (19 classes, SyncBN stood in by BN, align_corners=False):

* `fcn_hr{18s,18,48}` and `ocrnet_hr{18s,18,48}` (configs/_base_/models/{fcn,ocrnet}_hr18.py and
  the hr18s/hr48 overrides): HRNetV2 with every branch resized and concatenated.
* `ocrnet_r101-d8` (configs/ocrnet/ocrnet_r101-d8_*_cityscapes, from _base_ ocrnet_r50-d8.py):
  ResNet-V1c-101 D8, FCNHead on stage 3 (256 channels, 1 conv, loss 0.4) -> OCRHead on stage 4
  (512 channels, 256 OCR channels, dropout 0.1).
"""
from __future__ import annotations

from segops.models.backbones.hrnet import hrnet
from segops.models.backbones.resnet import resnet_v1c_d8
from segops.models.heads.fcn_head import FCNHead
from segops.models.heads.ocr_head import OCRHead
from segops.models.registry import register_model
from segops.models.segmentors.encoder_decoder import CascadeEncoderDecoder, EncoderDecoder

# variant -> (HRNet arch, base width)
HRNET_VARIANTS = {"hr18s": ("w18_small", 18), "hr18": ("w18", 18), "hr48": ("w48", 48)}


def _widths(w: int) -> list:
    return [w, 2 * w, 4 * w, 8 * w]


def _fcn_stage(widths, num_classes: int, norm: str) -> FCNHead:
    return FCNHead(in_channels=widths, channels=sum(widths), num_classes=num_classes,
                   in_index=(0, 1, 2, 3), input_transform="resize_concat", kernel_size=1,
                   num_convs=1, concat_input=False, dropout_ratio=-1, norm=norm,
                   align_corners=False)


def fcn_hr(variant: str, num_classes: int = 19, norm: str = "bn") -> EncoderDecoder:
    """mmseg fcn_hr*: HRNetV2 + FCNHead (resize_concat)."""
    arch, w = HRNET_VARIANTS[variant]
    return EncoderDecoder(hrnet(arch, norm=norm), _fcn_stage(_widths(w), num_classes, norm))


def ocrnet_hr(variant: str, num_classes: int = 19, norm: str = "bn", channels: int = 512,
              ocr_channels: int = 256) -> CascadeEncoderDecoder:
    """mmseg ocrnet_hr*: HRNetV2, FCN stage (aux loss 0.4) then OCRHead (512 channels, 256 OCR
    channels)."""
    arch, w = HRNET_VARIANTS[variant]
    widths = _widths(w)
    ocr = OCRHead(ocr_channels=ocr_channels, in_channels=widths, channels=channels,
                  num_classes=num_classes, in_index=(0, 1, 2, 3), input_transform="resize_concat",
                  dropout_ratio=-1, norm=norm, align_corners=False)
    return CascadeEncoderDecoder(hrnet(arch, norm=norm),
                                 [_fcn_stage(widths, num_classes, norm), ocr])


def ocrnet_r101_d8(num_classes: int = 19, norm: str = "bn") -> CascadeEncoderDecoder:
    """mmseg ocrnet_r101-d8 (Cityscapes)."""
    fcn = FCNHead(in_channels=1024, in_index=2, channels=256, num_convs=1, concat_input=False,
                  dropout_ratio=0.1, num_classes=num_classes, norm=norm, align_corners=False)
    ocr = OCRHead(ocr_channels=256, in_channels=2048, in_index=3, channels=512,
                  dropout_ratio=0.1, num_classes=num_classes, norm=norm, align_corners=False)
    return CascadeEncoderDecoder(resnet_v1c_d8(101, norm=norm), [fcn, ocr])


for _v in HRNET_VARIANTS:
    register_model(f"fcn_{_v}", fcn_hr, variant=_v)
    register_model(f"ocrnet_{_v}", ocrnet_hr, variant=_v)
register_model("ocrnet_r101-d8", ocrnet_r101_d8)
