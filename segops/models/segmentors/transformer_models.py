"""Transformer segmentors with ADE20K defaults (150 classes), as mmseg's configs:
`segformer_mit-b{0..5}` (MiT + SegformerHead, 256 channels, SyncBN->BN, dropout 0.1;
configs/segformer/segformer_mit-b*_8xb2-160k_ade20k-512x512.py) and `segmenter_vit-{t,s,b,l}_mask`
(ViT/16 + mask transformer head, 2 layers; configs/segmenter/segmenter_vit-*_mask_8xb1-160k_
ade20k-512x512.py, vit-l at 640x640) and `upernet_swin-{t,s,b,l}` (Swin + UPerHead, 512 channels,
+ FCN auxiliary head on stage 3 with loss weight 0.4; configs/swin/swin-*_upernet_8xb2-160k_
ade20k-512x512.py, b and l with window 12 as their ImageNet-22k/384 pretraining).

`sdn-segmenter_vit-s_mask`: segmenter_vit-s_mask with the single-scale SDN neck
(`segops.models.necks.sdn`, as sdn-fcn_r50-d8: stride-2 conv guidance of 384 // 4 channels) on the
ViT-S map; no reference config exists (SDN has no public code)."""
from __future__ import annotations

from segops.models.backbones.mit import MIT_VARIANTS, mit
from segops.models.backbones.swin import SWIN_VARIANTS, swin
from segops.models.backbones.vit import VIT_VARIANTS, vit
from segops.models.heads.fcn_head import FCNHead
from segops.models.heads.uper_head import UPerHead
from segops.models.heads.segformer_head import SegformerHead
from segops.models.heads.segmenter_head import SegmenterMaskTransformerHead
from segops.models.necks.sdn import SDNNeck
from segops.models.registry import register_model
from segops.models.segmentors.encoder_decoder import EncoderDecoder


def segformer(variant: str, num_classes: int = 150, norm: str = "bn",
              channels: int = 256) -> EncoderDecoder:
    """mmseg segformer_mit-* (ADE20K, 150 classes)."""
    backbone = mit(variant)
    head = SegformerHead(in_channels=backbone.out_channels, in_index=[0, 1, 2, 3],
                         channels=channels, dropout_ratio=0.1, num_classes=num_classes, norm=norm,
                         align_corners=False)
    return EncoderDecoder(backbone, head)


def segmenter(variant: str, num_classes: int = 150, sdn: bool = False,
              patch_bias: bool = False) -> EncoderDecoder:
    """mmseg segmenter_vit-*_mask (ADE20K, 150 classes); with `sdn`, the single-scale SDN neck
    on the ViT map. The patch embedding has no bias, as mmseg's ViT; `patch_bias=True` gives it
    the bias of the official Segmenter (timm's ViT), for checkpoints converted from there."""
    d = VIT_VARIANTS[variant]
    head = SegmenterMaskTransformerHead(in_channels=d["embed_dims"], channels=d["embed_dims"],
                                        num_classes=num_classes, num_layers=2,
                                        num_heads=d["num_heads"], embed_dims=d["embed_dims"],
                                        dropout_ratio=0.0)
    neck = SDNNeck(d["embed_dims"]) if sdn else None
    return EncoderDecoder(vit(variant, patch_bias=patch_bias), head, neck=neck)


def upernet_swin(variant: str, num_classes: int = 150, norm: str = "bn") -> EncoderDecoder:
    """mmseg UPerNet with Swin (ADE20K, 150 classes)."""
    return upernet(swin(variant), num_classes, norm)


def upernet(backbone, num_classes: int = 150, norm: str = "bn") -> EncoderDecoder:
    """mmseg's UPerNet configs for 4-stage transformer backbones (`num_features` widths): UPerHead
    (512 channels, pool scales 1, 2, 3, 6) + FCN auxiliary head on stage 3 (256 channels)."""
    widths = backbone.num_features
    head = UPerHead(in_channels=widths, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                    channels=512, dropout_ratio=0.1, num_classes=num_classes, norm=norm,
                    align_corners=False)
    aux = FCNHead(in_channels=widths[2], in_index=2, channels=256, num_convs=1,
                  concat_input=False, dropout_ratio=0.1, num_classes=num_classes, norm=norm,
                  align_corners=False)
    return EncoderDecoder(backbone, head, auxiliary_head=aux)


for _v in MIT_VARIANTS:
    register_model(f"segformer_mit-{_v}", segformer, variant=_v)
for _v in VIT_VARIANTS:
    register_model(f"segmenter_vit-{_v}_mask", segmenter, variant=_v)
for _v in SWIN_VARIANTS:
    register_model(f"upernet_swin-{_v}", upernet_swin, variant=_v)
register_model("sdn-segmenter_vit-s_mask", segmenter, variant="s", sdn=True)
