"""STDC networks (Fan et al., "Rethinking BiSeNet", CVPR 2021) with mmseg's structure and keys.

Follows mmseg `mmseg/models/backbones/stdc.py` (`STDCNet`, `STDCContextPathNet`; its inference
path agrees with the official MichaelFan01/STDC-Seg `models/model_stages.py`): two stride-2
3x3 ConvModules, then three stages of STDC modules ("cat" fusion, 4 convs each); STDCNet1 has
(2, 2, 2) modules per stage, STDCNet2 (4, 5, 3). The context path puts BiSeNet's attention
refinement modules on the 1/32 and 1/16 features plus a global-average branch, and fuses the
1/8 feature with a feature fusion module. `STDCContextPathNet` returns (stage-3 1/8 feature for
the detail head, context 1/16, context 1/8, fused 1/8).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.backbones.bisenetv1 import AttentionRefinementModule
from segops.models.common import resize
from segops.nn import ConvModule

STDC_STAGES = {"STDCNet1": ((2, 1), (2, 1), (2, 1)),
               "STDCNet2": ((2, 1, 1, 1), (2, 1, 1, 1, 1), (2, 1, 1))}


class STDCModule(nn.Module):
    """Short-term dense concatenation ("cat" fusion): a 1x1 conv to out/2 channels, then
    `num_convs - 1` 3x3 convs halving the width (the last keeping it), every output
    concatenated. Strided: a depthwise 3x3/2 `downsample` after the first conv, whose own
    output enters the concatenation through a 3x3/2 average pool. ("add" fusion, mmseg's other
    option, is not used by any config and not built.)"""

    def __init__(self, in_channels: int, out_channels: int, stride: int, num_convs: int = 4,
                 norm="bn", act="relu") -> None:
        super().__init__()
        if num_convs < 2:
            raise ValueError(f"STDCModule needs num_convs >= 2, got {num_convs}")
        self.with_downsample = stride == 2
        half = out_channels // 2
        self.layers = nn.ModuleList([ConvModule(in_channels, half, 1, norm=norm)])
        if self.with_downsample:
            self.downsample = ConvModule(half, half, 3, 2, 1, groups=half, norm=norm, act=None)
            self.skip = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
        for i in range(1, num_convs):
            cout = out_channels // 2 ** (i + 1 if i != num_convs - 1 else i)
            self.layers.append(ConvModule(out_channels // 2 ** i, cout, 3, padding=1, norm=norm,
                                          act=act))

    def forward(self, x: Tensor) -> Tensor:
        first = self.layers[0](x)
        y = self.downsample(first) if self.with_downsample else first
        outs = [self.skip(first) if self.with_downsample else first]
        for layer in self.layers[1:]:
            y = layer(y)
            outs.append(y)
        return torch.cat(outs, dim=1)


class STDCNet(nn.Module):
    """`stages.0`, `stages.1`: 3x3/2 ConvModules; `stages.2..4`: STDC stages (Sequential of
    STDCModules, the first strided). Returns the outputs of stages 2..4 (1/8, 1/16, 1/32)."""

    def __init__(self, stdc_type: str = "STDCNet1", in_channels: int = 3,
                 channels=(32, 64, 256, 512, 1024), num_convs: int = 4, norm="bn",
                 act="relu") -> None:
        super().__init__()
        if stdc_type not in STDC_STAGES:
            raise ValueError(f"stdc_type must be one of {sorted(STDC_STAGES)}, got {stdc_type!r}")
        if len(channels) != 5:
            raise ValueError(f"STDCNet needs 5 channel widths, got {tuple(channels)}")
        self.out_channels = tuple(channels[2:])
        stages = [ConvModule(in_channels, channels[0], 3, 2, 1, norm=norm, act=act),
                  ConvModule(channels[0], channels[1], 3, 2, 1, norm=norm, act=act)]
        self.num_shallow_features = len(stages)
        for i, strides in enumerate(STDC_STAGES[stdc_type], 1):
            stages.append(nn.Sequential(*[
                STDCModule(channels[i] if j == 0 else channels[i + 1], channels[i + 1], stride,
                           num_convs, norm, act)
                for j, stride in enumerate(strides)]))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor):
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return tuple(outs[self.num_shallow_features:])


class STDCFeatureFusionModule(nn.Module):
    """[spatial; context] -> 1x1 ConvModule `conv0`, plus itself reweighted by a squeeze-excite
    gate (`attention`: pool, 1x1 to out/scale_factor + ReLU, 1x1 back, sigmoid; no norms)."""

    def __init__(self, in_channels: int, out_channels: int, scale_factor: int = 4,
                 norm="bn") -> None:
        super().__init__()
        squeezed = out_channels // scale_factor
        self.conv0 = ConvModule(in_channels, out_channels, 1, norm=norm)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            ConvModule(out_channels, squeezed, 1, bias=False, norm=None),
            ConvModule(squeezed, out_channels, 1, bias=False, norm=None, act=None),
            nn.Sigmoid())

    def forward(self, x_spatial: Tensor, x_context: Tensor) -> Tensor:
        x = self.conv0(torch.cat([x_spatial, x_context], dim=1))
        return x * self.attention(x) + x


class STDCContextPathNet(nn.Module):
    """Keys: `backbone.*`, `arms.{0,1}` (on 1/32, 1/16), `convs.{0,1}`, `conv_avg`, `ffm.*`."""

    def __init__(self, backbone: nn.Module, last_in_channels=(1024, 512), out_channels: int = 128,
                 ffm_in_channels: int = 384, ffm_out_channels: int = 256, ffm_scale_factor: int = 4,
                 norm="bn") -> None:
        super().__init__()
        self.backbone = backbone
        self.arms = nn.ModuleList(AttentionRefinementModule(c, out_channels, norm)
                                  for c in last_in_channels)
        self.convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, padding=1, norm=norm)
                                   for _ in last_in_channels)
        self.conv_avg = ConvModule(last_in_channels[0], out_channels, 1, norm=norm)
        self.ffm = STDCFeatureFusionModule(ffm_in_channels, ffm_out_channels, ffm_scale_factor,
                                           norm)

    def forward(self, x: Tensor):
        feats = list(self.backbone(x))
        up = resize(self.conv_avg(F.adaptive_avg_pool2d(feats[-1], 1)), feats[-1].shape[2:],
                    mode="nearest")
        context = []
        for i, (arm, conv) in enumerate(zip(self.arms, self.convs)):
            deeper, shallower = feats[-1 - i], feats[-2 - i]
            up = conv(resize(arm(deeper) + up, shallower.shape[2:], mode="nearest"))
            context.append(up)
        return (feats[0], *context, self.ffm(feats[0], context[-1]))
