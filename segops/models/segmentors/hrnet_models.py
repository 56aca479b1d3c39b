"""HRNet segmentors: mmseg `fcn_hr{18s,18,48}` (EncoderDecoder) and `ocrnet_hr{18s,18,48}`
(CascadeEncoderDecoder: FCN soft regions -> OCR head), Cityscapes defaults (19 classes, SyncBN
stood in by BN, align_corners=False), as configs/_base_/models/{fcn,ocrnet}_hr18.py and the
hr18s/hr48 overrides."""
from __future__ import annotations

from segops.models.backbones.hrnet import hrnet
from segops.models.heads.fcn_head import FCNHead
from segops.models.heads.ocr_head import OCRHead
from segops.models.registry import register_model
from segops.models.segmentors.encoder_decoder import CascadeEncoderDecoder, EncoderDecoder

_VARIANTS = {"hr18s": ("w18_small", 18), "hr18": ("w18", 18), "hr48": ("w48", 48)}


def _widths(w: int) -> list:
    return [w, 2 * w, 4 * w, 8 * w]


def _fcn_stage(widths, num_classes: int, norm: str, backend: str) -> FCNHead:
    return FCNHead(in_channels=widths, channels=sum(widths), num_classes=num_classes,
                   in_index=(0, 1, 2, 3), input_transform="resize_concat", kernel_size=1,
                   num_convs=1, concat_input=False, dropout_ratio=-1, norm=norm,
                   align_corners=False, backend=backend)


def _fcn_hr(variant: str):
    def build(num_classes: int = 19, backend: str = "auto", norm: str = "bn") -> EncoderDecoder:
        arch, w = _VARIANTS[variant]
        return EncoderDecoder(hrnet(arch, norm=norm),
                              _fcn_stage(_widths(w), num_classes, norm, backend))
    build.__doc__ = f"mmseg fcn_{variant}: HRNetV2-{arch_name(variant)} + FCNHead (resize_concat)."
    return build


def _ocr_hr(variant: str):
    def build(num_classes: int = 19, backend: str = "auto", norm: str = "bn",
              channels: int = 512, ocr_channels: int = 256) -> CascadeEncoderDecoder:
        arch, w = _VARIANTS[variant]
        widths = _widths(w)
        ocr = OCRHead(ocr_channels=ocr_channels, in_channels=widths, channels=channels,
                      num_classes=num_classes, in_index=(0, 1, 2, 3),
                      input_transform="resize_concat", dropout_ratio=-1, norm=norm,
                      align_corners=False, backend=backend)
        return CascadeEncoderDecoder(hrnet(arch, norm=norm),
                                     [_fcn_stage(widths, num_classes, norm, backend), ocr])
    build.__doc__ = (f"mmseg ocrnet_{variant}: HRNetV2-{arch_name(variant)}, FCN stage (aux "
                     f"loss 0.4) then OCRHead (512 channels, 256 OCR channels).")
    return build


def arch_name(variant: str) -> str:
    return {"hr18s": "W18-Small", "hr18": "W18", "hr48": "W48"}[variant]


for _v in _VARIANTS:
    register_model(f"fcn_{_v}")(_fcn_hr(_v))
    register_model(f"ocrnet_{_v}")(_ocr_hr(_v))
