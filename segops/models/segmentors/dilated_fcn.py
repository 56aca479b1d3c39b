"""Dilated-FCN segmentors on ResNet-V1c "D8" backbones (Cityscapes defaults: 19 classes).

Config names follow mmsegmentation (`configs/<method>/<method>_r{18,50,101}-d8_*cityscapes*`):
backbone ResNetV1c with strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contract_dilation; decode
head on stage 4 (2048 channels, head width 512; R18: 512 and 128); auxiliary FCNHead on stage 3
(1024 -> 256, one conv, no concat; R18: 256 -> 64), dropout 0.1, align_corners=False. Each
factory's docstring names the reference it follows. A factory takes `num_classes`, `backend`
(passed to every segops layer), `norm` ("bn"; "syncbn" is the same single-process module) and
`align_corners`.
"""
from __future__ import annotations

from typing import Callable

from segops.models.backbones.resnet import resnet_v1c_d8
from segops.models.heads.aspp_head import ASPPHead, DepthwiseSeparableASPPHead
from segops.models.heads.cc_head import CCHead
from segops.models.heads.fcn_head import FCNHead
from segops.models.heads.psp_head import PSPHead
from segops.models.registry import register_model
from segops.models.segmentors.encoder_decoder import EncoderDecoder

# (decode head in_channels, decode channels, aux in_channels, aux channels) per depth (mmseg).
WIDTHS = {18: (512, 128, 256, 64), 50: (2048, 512, 1024, 256), 101: (2048, 512, 1024, 256)}


def aux_fcn_head(depth: int, num_classes: int, norm: str = "bn", backend: str = "auto",
                 align_corners: bool = False) -> FCNHead:
    """mmseg's auxiliary head of the D8 configs: FCNHead on stage 3, one 3x3 conv, no concat."""
    _, _, aux_in, aux_ch = WIDTHS[depth]
    return FCNHead(aux_in, aux_ch, num_classes, num_convs=1, concat_input=False, in_index=2,
                   dropout_ratio=0.1, norm=norm, align_corners=align_corners, backend=backend)


def d8_segmentor(depth: int, head_fn: Callable, *, num_classes: int = 19, backend: str = "auto",
                 norm: str = "bn", align_corners: bool = False, aux: bool = True,
                 segmentor=EncoderDecoder, **head_kw) -> EncoderDecoder:
    """ResNetV1c-D8 backbone + `head_fn(in_channels, channels, num_classes, **common)` + aux FCN."""
    if depth not in WIDTHS:
        raise ValueError(f"depth must be one of {sorted(WIDTHS)}, got {depth}")
    in_ch, ch, _, _ = WIDTHS[depth]
    common = dict(in_index=3, dropout_ratio=0.1, norm=norm, align_corners=align_corners,
                  backend=backend)
    common.update(head_kw)
    head = head_fn(in_ch, ch, num_classes, **common)
    auxiliary = aux_fcn_head(depth, num_classes, norm, backend, align_corners) if aux else None
    return segmentor(resnet_v1c_d8(depth, norm=norm), head, auxiliary_head=auxiliary,
                     align_corners=align_corners)


def _register(method: str, depths, factory: Callable) -> None:
    for depth in depths:
        def fn(depth=depth, **kw):
            return factory(depth, **kw)
        fn.__name__ = f"{method}_r{depth}_d8"
        fn.__doc__ = factory.__doc__
        register_model(f"{method}_r{depth}-d8")(fn)


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


_register("fcn", (18, 50, 101), fcn)
_register("pspnet", (18, 50, 101), pspnet)
_register("deeplabv3", (18, 50, 101), deeplabv3)
_register("deeplabv3plus", (18, 50, 101), deeplabv3plus)
_register("ccnet", (50, 101), ccnet)
