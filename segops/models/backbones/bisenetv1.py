"""BiSeNet V1 (Yu et al., ECCV 2018) with mmseg's structure and state_dict keys.

Follows mmseg `mmseg/models/backbones/bisenetv1.py`: a spatial path (7x7/2, 3x3/2, 3x3/2, 1x1:
output stride 8), a context path on a classification backbone (attention refinement modules on
its 1/16 and 1/32 features plus a global-average branch, nearest upsampling), and the feature
fusion module. Returns (fused 1/8 feature, context 1/8, context 1/16) for the decode head and
the two auxiliary heads. The module classes are reused by STDC (`stdc.py`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segops.models.common import resize
from segops.nn import ConvModule


class SpatialPath(nn.Module):
    """`layer1`..`layer4`: 7x7 stride 2, two 3x3 stride 2, then 1x1 (ConvModules)."""

    def __init__(self, in_channels: int = 3, num_channels=(64, 64, 64, 128), norm="bn") -> None:
        super().__init__()
        if len(num_channels) != 4:
            raise ValueError(f"SpatialPath needs 4 channel widths, got {tuple(num_channels)}")
        shapes = [(7, 2, 3), (3, 2, 1), (3, 2, 1), (1, 1, 0)]  # (kernel, stride, padding)
        cin = in_channels
        for i, ((k, s, p), cout) in enumerate(zip(shapes, num_channels), 1):
            self.add_module(f"layer{i}", ConvModule(cin, cout, k, s, p, norm=norm))
            cin = cout

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x


def channel_gate(channels: int, norm="bn", act=None) -> nn.Sequential:
    """Global average pool -> 1x1 ConvModule (no bias) -> sigmoid: a per-channel weight."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1),
                         ConvModule(channels, channels, 1, bias=False, norm=norm, act=act),
                         nn.Sigmoid())


class AttentionRefinementModule(nn.Module):
    """3x3 ConvModule, then the feature reweighted by its own channel gate."""

    def __init__(self, in_channels: int, out_channels: int, norm="bn") -> None:
        super().__init__()
        self.conv_layer = ConvModule(in_channels, out_channels, 3, padding=1, norm=norm)
        self.atten_conv_layer = channel_gate(out_channels, norm)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_layer(x)
        return x * self.atten_conv_layer(x)


class ContextPath(nn.Module):
    """The backbone's 1/16 and 1/32 features refined (ARM), the 1/32 one plus its global
    average, each upsampled (nearest) one level and smoothed by a 3x3 ConvModule."""

    def __init__(self, backbone: nn.Module, context_channels=(128, 256, 512),
                 norm="bn") -> None:
        super().__init__()
        c_out, c16, c32 = context_channels
        self.backbone = backbone
        self.arm16 = AttentionRefinementModule(c16, c_out, norm)
        self.arm32 = AttentionRefinementModule(c32, c_out, norm)
        self.conv_head32 = ConvModule(c_out, c_out, 3, padding=1, norm=norm)
        self.conv_head16 = ConvModule(c_out, c_out, 3, padding=1, norm=norm)
        self.gap_conv = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(c32, c_out, 1, norm=norm))

    def forward(self, x: Tensor):
        _, x8, x16, x32 = self.backbone(x)
        up32 = resize(self.arm32(x32) + self.gap_conv(x32), x16.shape[2:], mode="nearest")
        up32 = self.conv_head32(up32)
        up16 = resize(self.arm16(x16) + up32, x8.shape[2:], mode="nearest")
        return self.conv_head16(up16), up32


class FeatureFusionModule(nn.Module):
    """[spatial; context] -> 1x1 ConvModule; the result plus itself reweighted by a channel gate
    (with ReLU inside the gate, as mmseg)."""

    def __init__(self, in_channels: int, out_channels: int, norm="bn") -> None:
        super().__init__()
        self.conv1 = ConvModule(in_channels, out_channels, 1, norm=norm)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.conv_atten = nn.Sequential(
            ConvModule(out_channels, out_channels, 1, bias=False, norm=norm), nn.Sigmoid())

    def forward(self, x_spatial: Tensor, x_context: Tensor) -> Tensor:
        fused = self.conv1(torch.cat([x_spatial, x_context], dim=1))
        return fused * self.conv_atten(self.gap(fused)) + fused


class BiSeNetV1(nn.Module):
    """Spatial path + context path (on `backbone`, which returns its four stage outputs) + FFM.
    Keys: `context_path.*` (its backbone under `context_path.backbone.*`), `spatial_path.*`,
    `ffm.*`."""

    def __init__(self, backbone: nn.Module, in_channels: int = 3,
                 spatial_channels=(64, 64, 64, 128), context_channels=(128, 256, 512),
                 out_channels: int = 256, out_indices=(0, 1, 2), norm="bn") -> None:
        super().__init__()
        if len(context_channels) != 3:
            raise ValueError(f"context_channels needs 3 widths, got {tuple(context_channels)}")
        self.out_indices = tuple(out_indices)
        self.context_path = ContextPath(backbone, context_channels, norm)
        self.spatial_path = SpatialPath(in_channels, spatial_channels, norm)
        # mmseg sizes the FFM input as context_channels[1]: spatial 128 + context 128 = 256.
        self.ffm = FeatureFusionModule(context_channels[1], out_channels, norm)

    def forward(self, x: Tensor):
        context8, context16 = self.context_path(x)
        outs = (self.ffm(self.spatial_path(x), context8), context8, context16)
        return tuple(outs[i] for i in self.out_indices)
