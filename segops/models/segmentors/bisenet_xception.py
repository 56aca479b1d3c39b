"""`bisenetv1_xception39`: BiSeNet V1 on Xception39 as the first author's TorchSeg repository
builds it (yu-changqian/TorchSeg `model/bisenet/cityscapes.bisenet.X39/network.py` and
`furnace/seg_opr/seg_oprs.py`), with its module names. Cityscapes, 19 classes.

Differences from mmseg's BiSeNetV1 (`bisenetv1_r18-d32`): the context path on Xception39's
1/16 and 1/32 features (128 and 256 channels), bilinear (align_corners=True) instead of nearest
upsampling, the fused feature at 256 channels, and TorchSeg's heads (3x3 conv-BN-ReLU to 64,
or 128 for the two auxiliary heads, then a 1x1 classifier with bias, no dropout). Training
supervises the fused head and both auxiliary heads with OHEM cross-entropy (threshold 0.7,
min_kept = 4 images x 1024 x 1024 / 16, the per-GPU batch of the config), weight 1 each.
TorchSeg returns log-softmax in eval mode; this model returns the logits (same argmax).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segops.models.backbones.bisenetv1 import channel_gate
from segops.models.backbones.xception39 import Xception39
from segops.models.common import resize
from segops.models.loss_terms import LossTerm
from segops.models.registry import register_model
from segops.nn import ConvModule


class SpatialPath(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 128, inner: int = 64) -> None:
        super().__init__()
        self.conv_7x7 = ConvModule(in_channels, inner, 7, 2, 3)
        self.conv_3x3_1 = ConvModule(inner, inner, 3, 2, 1)
        self.conv_3x3_2 = ConvModule(inner, inner, 3, 2, 1)
        self.conv_1x1 = ConvModule(inner, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_1x1(self.conv_3x3_2(self.conv_3x3_1(self.conv_7x7(x))))


class AttentionRefinement(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_3x3 = ConvModule(in_channels, out_channels, 3, padding=1)
        self.channel_attention = channel_gate(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_3x3(x)
        return x * self.channel_attention(x)


class FeatureFusion(nn.Module):
    """1x1 conv-BN-ReLU over [spatial; context], plus itself reweighted by a squeeze-excite gate
    without norms (reduction 1)."""

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 1) -> None:
        super().__init__()
        mid = out_channels // reduction
        self.conv_1x1 = ConvModule(in_channels, out_channels, 1)
        self.channel_attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), ConvModule(out_channels, mid, 1, bias=False, norm=None),
            ConvModule(mid, out_channels, 1, bias=False, norm=None, act=None), nn.Sigmoid())

    def forward(self, x_spatial: Tensor, x_context: Tensor) -> Tensor:
        x = self.conv_1x1(torch.cat([x_spatial, x_context], dim=1))
        return x + x * self.channel_attention(x)


class BiSeNetHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, channels: int) -> None:
        super().__init__()
        self.conv_3x3 = ConvModule(in_channels, channels, 3, padding=1)
        self.conv_1x1 = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_1x1(self.conv_3x3(x))


class BiSeNetX39(nn.Module):
    """Keys: `context_path.*` (Xception39), `spatial_path.*`, `global_context.1.*`, `arms.{0,1}`,
    `refines.{0,1}`, `heads.{0,1,2}` (aux on 1/16, aux on 1/8, main), `ffm.*`."""

    def __init__(self, num_classes: int = 19, conv_channels: int = 128) -> None:
        super().__init__()
        c = conv_channels
        self.context_path = Xception39()
        c8, c16, c32 = self.context_path.out_channels
        self.spatial_path = SpatialPath(3, c)
        self.global_context = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(c32, c, 1))
        self.arms = nn.ModuleList([AttentionRefinement(c32, c), AttentionRefinement(c16, c)])
        self.refines = nn.ModuleList([ConvModule(c, c, 3, padding=1) for _ in range(2)])
        self.heads = nn.ModuleList([BiSeNetHead(c, num_classes, 128),
                                    BiSeNetHead(c, num_classes, 128),
                                    BiSeNetHead(2 * c, num_classes, 64)])
        self.ffm = FeatureFusion(2 * c, 2 * c, 1)

    loss_terms = [LossTerm(o, "ohem_cross_entropy", 1.0, dict(thresh=0.7, min_kept=262_144))
                  for o in ("out", "aux.0", "aux.1")]

    def forward(self, img: Tensor):
        size = img.shape[2:]
        x8, x16, x32 = self.context_path(img)
        deeper = resize(self.global_context(x32), x32.shape[2:], align_corners=True)
        context = []
        for feat, target, arm, refine in zip((x32, x16), (x16, x8), self.arms, self.refines):
            deeper = refine(resize(arm(feat) + deeper, target.shape[2:], align_corners=True))
            context.append(deeper)
        fused = self.ffm(self.spatial_path(img), context[-1])
        out = resize(self.heads[2](fused), size, align_corners=True)
        if not self.training:
            return out
        aux = [resize(head(x), size, align_corners=True) for head, x in zip(self.heads, context)]
        return {"out": out, "aux": aux}


register_model("bisenetv1_xception39", BiSeNetX39)
