"""OCNet heads: Base-OC, Pyramid-OC and ASP-OC (Yuan et al., "OCNet: Object Context Network for Scene Parsing", 2018),
following openseg.pytorch `lib/models/nets/ocnet.py` (`BaseOCNet`) and
`lib/models/modules/base_oc_block.py` (`BaseOC_Module`, `SelfAttentionBlock2D`).

3x3 conv (with bias, as openseg) + BN + ReLU to 512, then the Base-OC block: object context
`softmax_j(<q_i, k_j> / sqrt(256)) v_j` (query/key: two 1x1 conv(bias)+BN+ReLU to 256, value 1x1
conv to 256, output 1x1 conv `W` to 512, zero-initialised), concatenated with its input and
fused by a 1x1 conv(bias)+BN+ReLU, dropout 0.05, classifier. The attention is
`segops.nn.SelfAttentionBlock` under openseg's names. Submodule names are openseg's where they map
(`oc_module_pre`, `oc_module.stages.<i>.{f_key,f_query,f_value,W}`), but the conv-BN pairs are
mmcv-style ConvModules, so openseg checkpoints need a key rename to load.

Pyramid-OC (OCNet.pytorch `ResNet101PyramidOC` / openseg `pyramid_oc_block.py`) restricts the
object context to the cells of 1x1, 2x2, 3x3 and 6x6 partitions of the map: the interlaced
attention operator's short-range mode, one call per equally tiled rectangle
(`pyramid_region_attention`). ASP-OC (openseg `asp_oc_block.py`) puts the object context (on the
2x max-pooled map, `segops.nn.SelfAttentionBlock`) in place of ASPP's image-pooling branch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.common import BaseDecodeHead
from segops.nn import ConvModule, SelfAttentionBlock
from segops.nn.common import make_norm
from segops.nn.interlaced_sparse_attention import pyramid_region_attention


class ObjectContextAttention(SelfAttentionBlock):
    """openseg's SelfAttentionBlock2D: query/key two 1x1 conv(bias)+BN+ReLU to `key_channels`,
    value 1x1 conv to `value_channels`, `W` 1x1 conv to `out_channels` (zero-initialised).
    `scale > 1` max-pools the input first and upsamples the context back (align_corners=True,
    as openseg)."""

    names = {"key": "f_key", "query": "f_query", "value": "f_value", "out": "W"}

    def __init__(self, in_channels: int, key_channels: int, value_channels: int,
                 out_channels: int | None = None, scale: int = 1, norm="bn") -> None:
        out_channels = in_channels if out_channels is None else out_channels
        super().__init__(in_channels, in_channels, key_channels, out_channels,
                         key_query_num_convs=2, value_channels=value_channels, conv_bias=True,
                         norm=norm)
        self.scale = scale
        self.pool = nn.MaxPool2d(scale) if scale > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[2:]
        if self.pool is not None:
            x = self.pool(x)
        context = super().forward(x, x)
        if self.pool is not None:
            context = F.interpolate(context, size=(h, w), mode="bilinear", align_corners=True)
        return context


class _ObjectContextStages(nn.Module):
    """`stages`: one ObjectContextAttention per pooling size, their outputs summed."""

    def __init__(self, in_channels: int, stage_channels: int, key_channels: int,
                 value_channels: int, sizes, norm) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            ObjectContextAttention(in_channels, key_channels, value_channels, stage_channels, s,
                                   norm) for s in sizes)

    def context(self, feats: Tensor) -> Tensor:
        return sum(stage(feats) for stage in self.stages)


class BaseOCModule(_ObjectContextStages):
    """Sum of the object-context stages, concatenated with the input, 1x1 conv(bias)+BN+ReLU.
    (openseg's trailing Dropout2d is the decode head's dropout here.)"""

    def __init__(self, in_channels: int, out_channels: int, key_channels: int,
                 value_channels: int, sizes=(1,), norm="bn") -> None:
        super().__init__(in_channels, in_channels, key_channels, value_channels, sizes, norm)
        self.conv_bn = ConvModule(2 * in_channels, out_channels, 1, bias=True, norm=norm)

    def forward(self, feats: Tensor) -> Tensor:
        return self.conv_bn(torch.cat([self.context(feats), feats], dim=1))


class PyramidObjectContextAttention(ObjectContextAttention):
    """openseg's PyramidSelfAttentionBlock2D: the object-context attention restricted to the
    cells of a `scale` x `scale` partition of the map (no pooling). The restricted attention is
    `segops.nn.interlaced_sparse_attention.pyramid_region_attention`, i.e. the interlaced
    attention operator's short-range mode with the cell as its block."""

    def __init__(self, in_channels: int, key_channels: int, value_channels: int,
                 out_channels: int | None = None, scale: int = 1, norm="bn") -> None:
        super().__init__(in_channels, key_channels, value_channels, out_channels, 1, norm)
        self.scale = scale

    def attend(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        return pyramid_region_attention(query, key, value, self.scale,
                                        scale=self.channels ** -0.5, backend=self.backend)


class PyramidOCModule(nn.Module):
    """openseg's (OCNet.pytorch's) Pyramid_OC_Module: one region-attention stage per pyramid
    size, concatenated with `up_dr(x)` (1x1 conv(bias)+BN+ReLU to len(sizes) x C) and fused by
    `conv_bn` (1x1 conv(bias)+BN+ReLU); the trailing dropout is the decode head's."""

    def __init__(self, in_channels: int, out_channels: int, sizes=(1, 2, 3, 6),
                 norm="bn") -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            PyramidObjectContextAttention(in_channels, in_channels // 2, in_channels,
                                          out_channels, s, norm) for s in sizes)
        group = len(sizes)
        self.up_dr = ConvModule(in_channels, in_channels * group, 1, bias=True, norm=norm)
        self.conv_bn = ConvModule(2 * in_channels * group, out_channels, 1, bias=True, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_bn(torch.cat([self.up_dr(x)] + [stage(x) for stage in self.stages], 1))


class ObjectContextOnly(_ObjectContextStages):
    """openseg's BaseOC_Context_Module: the sum of the object-context stages, BN, ReLU (no
    concatenation with the input)."""

    def __init__(self, in_channels: int, out_channels: int, key_channels: int,
                 value_channels: int, sizes=(2,), norm="bn") -> None:
        super().__init__(in_channels, out_channels, key_channels, value_channels, sizes, norm)
        self.bn = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.context(x)))


class ASPOCModule(nn.Module):
    """openseg's ASP_OC_Module: an ASPP whose image-level branch is replaced by object context
    (`context`: 3x3 conv(bias)+BN+ReLU, then object context on the 2x max-pooled map), beside a
    1x1 branch and three dilated 3x3 branches (12, 24, 36); `conv_bn_dropout` fuses the five
    (1x1, no bias, BN, ReLU; its dropout is the decode head's)."""

    def __init__(self, in_channels: int, channels: int = 256, dilations=(12, 24, 36),
                 norm="bn") -> None:
        super().__init__()
        self.context = nn.Sequential(
            ConvModule(in_channels, channels, 3, padding=1, bias=True, norm=norm),
            ObjectContextOnly(channels, channels, channels // 2, channels // 2, (2,), norm))
        self.conv2 = ConvModule(in_channels, channels, 1, norm=norm)
        self.dilated = nn.ModuleList(
            ConvModule(in_channels, channels, 3, padding=d, dilation=d, norm=norm)
            for d in dilations)
        self.conv_bn_dropout = ConvModule((2 + len(dilations)) * channels, 2 * channels, 1,
                                          norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.context(x), self.conv2(x)] + [conv(x) for conv in self.dilated]
        return self.conv_bn_dropout(torch.cat(branches, dim=1))


class _OCHead(BaseDecodeHead):
    """3x3 conv(bias)+BN+ReLU to `channels` (`oc_module_pre`), the subclass's `oc_module`,
    classifier."""

    def __init__(self, in_channels, channels: int, num_classes: int, **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.oc_module_pre = ConvModule(self.in_channels, channels, 3, padding=1, bias=True,
                                        norm=self.norm, act=self.act)

    def forward(self, inputs):
        x = self._transform_inputs(inputs)
        return self.cls_seg(self.oc_module(self.oc_module_pre(x)))


class BaseOCHead(_OCHead):
    """Base-OC (openseg `BaseOCNet`)."""

    def __init__(self, in_channels, channels: int, num_classes: int, *, key_channels: int = 256,
                 value_channels: int = 256, sizes=(1,), **kwargs) -> None:
        kwargs.setdefault("dropout_ratio", 0.05)
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.oc_module = BaseOCModule(channels, channels, key_channels, value_channels, sizes,
                                      self.norm)


class PyramidOCHead(_OCHead):
    """OCNet Pyramid-OC (OCNet.pytorch `ResNet101PyramidOC`: 3x3 conv to 512, Pyramid-OC with
    sizes 1, 2, 3, 6, dropout 0.05, classifier)."""

    def __init__(self, in_channels, channels: int, num_classes: int, *, sizes=(1, 2, 3, 6),
                 **kwargs) -> None:
        kwargs.setdefault("dropout_ratio", 0.05)
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.oc_module = PyramidOCModule(channels, channels, sizes, self.norm)


class ASPOCHead(_OCHead):
    """OCNet ASP-OC (openseg `AspOCNet`: 3x3 conv to 512, ASP-OC with 256-channel branches and
    dilations 12, 24, 36, dropout 0.1, classifier on its 512 channels)."""

    def __init__(self, in_channels, channels: int, num_classes: int, *,
                 dilations=(12, 24, 36), **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.oc_module = ASPOCModule(channels, channels // 2, dilations, self.norm)
