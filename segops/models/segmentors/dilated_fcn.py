"""Dilated-FCN segmentors on ResNet-V1c "D8" backbones (Cityscapes defaults: 19 classes).

Config names follow mmsegmentation (`configs/<method>/<method>_r{18,50,101}-d8_*cityscapes*`):
backbone ResNetV1c with strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contract_dilation; decode
head on stage 4 (2048 channels, head width 512; R18: 512 and 128); auxiliary FCNHead on stage 3
(1024 -> 256, one conv, no concat; R18: 256 -> 64), dropout 0.1, align_corners=False. Each
factory's docstring names the reference it follows. A factory takes `depth`, `num_classes`,
`norm` ("bn"; "syncbn" is the same single-process module) and `align_corners`.
"""
from __future__ import annotations

import functools
from typing import Callable

from torch import nn

from segops.models.backbones.resnet import ResNetV1c, resnet_v1c_d8
from segops.models.common import resize
from segops.models.heads.ann_head import ANNHead
from segops.models.heads.aspp_head import ASPPHead, DepthwiseSeparableASPPHead
from segops.models.heads.cc_head import CCHead
from segops.models.heads.da_head import DAHead
from segops.models.heads.fcn_head import FCNHead
from segops.models.heads.isa_head import ISAHead
from segops.models.heads.nl_head import DNLHead, NLHead
from segops.models.heads.ocnet_head import BaseOCHead
from segops.models.heads.psp_head import PSPHead
from segops.models.heads.stl_head import STLHead
from segops.models.loss_terms import main_and_aux_terms
from segops.models.necks.sdn import SDNNeck
from segops.models.registry import register_model
from segops.models.segmentors.encoder_decoder import EncoderDecoder

# (decode head in_channels, decode channels, aux in_channels, aux channels) per depth (mmseg).
WIDTHS = {18: (512, 128, 256, 64), 50: (2048, 512, 1024, 256), 101: (2048, 512, 1024, 256)}


class MultiOutputEncoderDecoder(EncoderDecoder):
    """EncoderDecoder for decode heads that return several logits in training mode (DANet: the
    PAM+CAM, PAM-only and CAM-only predictions, each supervised). In training mode the first is
    "out" and the others come first in "aux", before the auxiliary heads' outputs; eval mode is
    unchanged (the head returns one tensor). `head_aux_weights`: the loss weight of each extra
    head output (`loss_terms`); the auxiliary heads keep `aux_weights`."""

    def __init__(self, *args, head_aux_weights=(0.4,), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head_aux_weights = tuple(head_aux_weights)

    @property
    def num_aux_outputs(self) -> int:
        return len(self.head_aux_weights) + len(self._aux_heads())

    @property
    def loss_terms(self):
        aux = self.aux_weights
        aux = [aux] * len(self._aux_heads()) if isinstance(aux, (int, float)) else list(aux)
        return main_and_aux_terms(self.num_aux_outputs, list(self.head_aux_weights) + aux)

    def forward(self, img):
        if not self.training:
            return super().forward(img)
        size = img.shape[2:]
        x = self.extract_feat(img)
        outs = self._decode(x)
        outs = [outs] if not isinstance(outs, (tuple, list)) else list(outs)
        outs = [resize(o, size, self.align_corners) for o in outs]
        aux = outs[1:] + [resize(h(x), size, self.align_corners) for h in self._aux_heads()]
        return {"out": outs[0], "aux": aux}


def aux_fcn_head(depth: int, num_classes: int, norm: str = "bn",
                 align_corners: bool = False) -> FCNHead:
    """mmseg's auxiliary head of the D8 configs: FCNHead on stage 3, one 3x3 conv, no concat."""
    _, _, aux_in, aux_ch = WIDTHS[depth]
    return FCNHead(aux_in, aux_ch, num_classes, num_convs=1, concat_input=False, in_index=2,
                   dropout_ratio=0.1, norm=norm, align_corners=align_corners)


def d8_segmentor(depth: int, head_fn: Callable, *, num_classes: int = 19, norm: str = "bn",
                 align_corners: bool = False, aux: bool = True,
                 segmentor=EncoderDecoder, backbone=None, neck=None, **head_kw) -> EncoderDecoder:
    """ResNetV1c-D8 backbone + `head_fn(in_channels, channels, num_classes, **common)` + aux FCN."""
    if depth not in WIDTHS:
        raise ValueError(f"depth must be one of {sorted(WIDTHS)}, got {depth}")
    in_ch, ch, _, _ = WIDTHS[depth]
    common = dict(in_index=3, dropout_ratio=0.1, norm=norm, align_corners=align_corners)
    common.update(head_kw)
    head = head_fn(in_ch, ch, num_classes, **common)
    auxiliary = aux_fcn_head(depth, num_classes, norm, align_corners) if aux else None
    backbone = resnet_v1c_d8(depth, norm=norm) if backbone is None else backbone
    return segmentor(backbone, head, neck=neck, auxiliary_head=auxiliary,
                     align_corners=align_corners)


def fcn(depth: int, **kw):
    """FCN: mmseg `configs/_base_/models/fcn_r50-d8.py` (FCNHead: 2 convs, concat_input)."""
    return d8_segmentor(depth, FCNHead, num_convs=2, concat_input=True, **kw)


def pspnet(depth: int, **kw):
    """PSPNet: mmseg `configs/_base_/models/pspnet_r50-d8.py` (PSPHead, pool scales 1, 2, 3, 6)."""
    return d8_segmentor(depth, PSPHead, pool_scales=(1, 2, 3, 6), **kw)


def deeplabv3(depth: int, **kw):
    """DeepLabV3: mmseg `configs/_base_/models/deeplabv3_r50-d8.py` (ASPPHead, dilations 1, 12, 24, 36)."""
    return d8_segmentor(depth, ASPPHead, dilations=(1, 12, 24, 36), **kw)


def deeplabv3plus(depth: int, **kw):
    """DeepLabV3+: mmseg `configs/_base_/models/deeplabv3plus_r50-d8.py` (DepthwiseSeparableASPPHead,
    c1 branch on stage 1: 256 -> 48 channels; R18 config: 64 -> 12)."""
    c1 = (64, 12) if depth == 18 else (256, 48)
    return d8_segmentor(depth, DepthwiseSeparableASPPHead, dilations=(1, 12, 24, 36),
                        c1_in_channels=c1[0], c1_channels=c1[1], **kw)


def ccnet(depth: int, **kw):
    """CCNet: mmseg `configs/_base_/models/ccnet_r50-d8.py` (CCHead, recurrence 2); the criss-cross
    attention runs through `segops.nn.CrissCrossAttention`."""
    return d8_segmentor(depth, CCHead, recurrence=2, **kw)


def nonlocal_net(depth: int, **kw):
    """NonLocal: mmseg `configs/_base_/models/nonlocal_r50-d8.py` (NLHead: embedded Gaussian,
    reduction 2, use_scale); the block is `segops.nn.NonLocal2d`."""
    return d8_segmentor(depth, NLHead, reduction=2, use_scale=True, mode="embedded_gaussian", **kw)


def dnl(depth: int, **kw):
    """DNLNet: mmseg `configs/_base_/models/dnl_r50-d8.py` (DNLHead: reduction 2, use_scale,
    temperature 0.05); the block is `segops.nn.DisentangledNonLocal2d`."""
    return d8_segmentor(depth, DNLHead, reduction=2, use_scale=True, mode="embedded_gaussian",
                        temperature=0.05, **kw)


def isanet(depth: int, **kw):
    """ISANet: mmseg `configs/_base_/models/isanet_r50-d8.py` (ISAHead: isa_channels 256, groups
    8 x 8); the attention is `segops.nn.InterlacedSparseAttention`."""
    return d8_segmentor(depth, ISAHead, isa_channels=256, down_factor=(8, 8), **kw)


def danet(depth: int, **kw):
    """DANet: mmseg `configs/_base_/models/danet_r50-d8.py` (DAHead: pam_channels 64); PAM is
    `segops.nn.SelfAttentionBlock` without scaling."""
    # mmseg's DAHead supervises its PAM-only and CAM-only predictions like the main one (weight 1)
    segmentor = functools.partial(MultiOutputEncoderDecoder, head_aux_weights=(1.0, 1.0))
    return d8_segmentor(depth, DAHead, pam_channels=64, segmentor=segmentor, **kw)


def ann(depth: int, **kw):
    """ANN: mmseg `configs/_base_/models/ann_r50-d8.py` (ANNHead on stages 3 and 4: project
    channels 256, query scales (1,), key pool scales 1, 3, 6, 8); pooled-key attention through
    `segops.nn.SelfAttentionBlock`."""
    kw.setdefault("in_index", (2, 3))
    return d8_segmentor(depth, lambda i, c, n, **k: ANNHead((1024, 2048) if depth != 18 else
                                                            (256, 512), c, n, **k),
                        project_channels=256, query_scales=(1,), key_pool_scales=(1, 3, 6, 8),
                        **kw)


def openseg_segmentor(depth: int, head_fn: Callable, *, num_classes: int = 19,
                      norm: str = "bn", align_corners: bool = True, aux: bool = True,
                      dropout_ratio: float = 0.05, **head_kw) -> EncoderDecoder:
    """openseg.pytorch's dilated nets: its `deepbase_resnet101_dilated8` backbone, i.e.
    ResNetV1c-D8 with a 128-channel deep stem (64, 64, 128); `head_fn(2048, 512, num_classes,
    ...)` on stage 4; auxiliary "dsn" head on stage 3: 3x3 conv (bias) 1024 -> 512 + BN + ReLU,
    classifier, no dropout. Outputs are upsampled with align_corners=True, and the stem's
    max-pool rounds up (ceil_mode), as openseg does."""
    backbone = ResNetV1c(depth, stem_channels=128, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                         contract_dilation=True, norm=norm, stem_pool_ceil_mode=True)
    in_ch, ch, aux_in, _ = WIDTHS[depth]
    head = head_fn(in_ch, ch, num_classes, in_index=3, dropout_ratio=dropout_ratio, norm=norm,
                   align_corners=align_corners, **head_kw)
    auxiliary = (FCNHead(aux_in, 512, num_classes, num_convs=1, concat_input=False, in_index=2,
                         dropout_ratio=0.0, conv_bias=True, norm=norm,
                         align_corners=align_corners) if aux else None)
    return EncoderDecoder(backbone, head, auxiliary_head=auxiliary, align_corners=align_corners)


def ocnet(depth: int = 101, **kw):
    """OCNet (Base-OC): openseg.pytorch `lib/models/nets/ocnet.py` `BaseOCNet` on
    `openseg_segmentor`; head: 3x3 conv to 512, Base-OC block (key/value 256, dropout 0.05),
    classifier."""
    return openseg_segmentor(depth, BaseOCHead, key_channels=256, value_channels=256,
                             sizes=(1,), **kw)


def stlnet(depth: int = 101, **kw):
    """STLNet: ResNet-D8 + ASPP context + STL texture block on stages 1-2 (see
    `segops.models.heads.stl_head` for which parts follow the official code and which only the
    paper); mmseg-style auxiliary FCN head on stage 3 (our choice: the paper does not say)."""
    low = (64, 128) if depth == 18 else (256, 512)
    return d8_segmentor(depth, STLHead, low_in_channels=low, dilations=(1, 12, 24, 36), **kw)


def sdn_fcn(depth: int = 50, **kw):
    """SDN on FCN: mmseg's fcn_r50-d8 with the single-scale SDN neck (paper description only, no
    official code; see `segops.models.necks.sdn`) on the stage-4 feature."""
    neck = SDNNeck(WIDTHS[depth][0], in_index=3)
    return d8_segmentor(depth, FCNHead, num_convs=2, concat_input=True, neck=neck, **kw)


for _method, _factory, _depths in (
        ("fcn", fcn, (18, 50, 101)), ("pspnet", pspnet, (18, 50, 101)),
        ("deeplabv3", deeplabv3, (18, 50, 101)), ("deeplabv3plus", deeplabv3plus, (18, 50, 101)),
        ("ccnet", ccnet, (50, 101)), ("nonlocal", nonlocal_net, (50, 101)),
        ("dnl", dnl, (50, 101)), ("isanet", isanet, (50, 101)), ("danet", danet, (50, 101)),
        ("ann", ann, (50, 101)), ("ocnet", ocnet, (101,)), ("stlnet", stlnet, (101,)),
        ("sdn-fcn", sdn_fcn, (50,))):
    for _depth in _depths:
        register_model(f"{_method}_r{_depth}-d8", _factory, depth=_depth)
