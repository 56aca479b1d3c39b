"""DFN decoder (Yu et al., "Learning a Discriminative Feature Network for Semantic
Segmentation", CVPR 2018), following TorchSeg by the first author (`model/dfn/*/network.py`,
`furnace/seg_opr/seg_oprs.py`: RefineResidual, ChannelAttention, DFNHead).

Smooth network, top-down over stages 4..1: per stage a refinement residual block
(`smooth_pre_rrbs`: 1x1 to 512, then 3x3 conv-BN-ReLU and a 3x3 conv added back, ReLU), a
channel attention block (`cabs`: an SE gate from [stage; upsampled previous stage] that
reweights the stage before adding the previous one; the global-average context plays the
previous stage for stage 4), a second RRB and a prediction head (`smooth_heads`). Border
network, bottom-up over stages 1..4 at 21 channels, one 1-channel border logit map per stage
(`border_heads`). No attention over positions, so no segops operator applies.

Where TorchSeg upsamples by fixed factors (which assumes sides divisible by 32), this resizes to
the target stage's or the input's size, so any input size works; for sides divisible by 32
both agree.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segops.models.common import resize
from segops.nn import ConvModule


class RefineResidual(nn.Module):
    """`conv_1x1` (no bias) then `x + conv_refine(cbr(x))` (3x3 conv-BN-ReLU, 3x3 conv), ReLU
    when `has_relu`."""

    def __init__(self, in_channels: int, out_channels: int, has_relu: bool = True,
                 norm="bn") -> None:
        super().__init__()
        self.conv_1x1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.cbr = ConvModule(out_channels, out_channels, 3, padding=1, norm=norm)
        self.conv_refine = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU() if has_relu else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_1x1(x)
        out = self.conv_refine(self.cbr(x)) + x
        return self.relu(out) if self.relu is not None else out


class ChannelAttention(nn.Module):
    """TorchSeg's CAB: `low * SE([low; high]) + high` (SE: linear C_in -> C, ReLU, linear, sigmoid)."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_channels, channels), nn.ReLU(inplace=True),
                                nn.Linear(channels, channels), nn.Sigmoid())

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        gate = self.fc(torch.cat([low, high], dim=1).mean(dim=(2, 3)))
        return low * gate[:, :, None, None] + high


class DFNPredictionHead(nn.Module):
    """TorchSeg's DFNHead: RRB (no final ReLU) to 9 x classes, 1x1 conv (bias) to classes."""

    def __init__(self, in_channels: int, num_classes: int, norm="bn") -> None:
        super().__init__()
        self.rrb = RefineResidual(in_channels, 9 * num_classes, has_relu=False, norm=norm)
        self.conv = nn.Conv2d(9 * num_classes, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.rrb(x))


class DFNDecoder(nn.Module):
    """`forward(stages, size)` -> (smooth logits per stage, top-down; border logits per stage,
    bottom-up), all resized to `size` (align_corners=True, as TorchSeg)."""

    def __init__(self, stage_channels=(256, 512, 1024, 2048), num_classes: int = 19,
                 channels: int = 512, border_channels: int = 21, norm="bn") -> None:
        super().__init__()
        self.num_classes = num_classes
        top_down = tuple(reversed(stage_channels))
        self.global_context = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                            ConvModule(top_down[0], channels, 1, norm=norm))
        self.smooth_pre_rrbs = nn.ModuleList(RefineResidual(c, channels, norm=norm)
                                             for c in top_down)
        self.cabs = nn.ModuleList(ChannelAttention(2 * channels, channels) for _ in top_down)
        self.smooth_aft_rrbs = nn.ModuleList(RefineResidual(channels, channels, norm=norm)
                                             for _ in top_down)
        self.smooth_heads = nn.ModuleList(DFNPredictionHead(channels, num_classes, norm)
                                          for _ in top_down)
        self.border_pre_rrbs = nn.ModuleList(RefineResidual(c, border_channels, norm=norm)
                                             for c in stage_channels)
        # the first stage's aft-RRB exists in TorchSeg but is never called (kept for its keys)
        self.border_aft_rrbs = nn.ModuleList(RefineResidual(border_channels, border_channels,
                                                            norm=norm) for _ in stage_channels)
        self.border_heads = nn.ModuleList(DFNPredictionHead(border_channels, 1, norm)
                                          for _ in stage_channels)

    def forward(self, stages, size):
        top_down = list(reversed(stages))
        previous = resize(self.global_context(top_down[0]), top_down[0].shape[2:], True)
        smooth = []
        for i, fm in enumerate(top_down):
            fm = self.smooth_aft_rrbs[i](self.cabs[i](self.smooth_pre_rrbs[i](fm), previous))
            smooth.append(resize(self.smooth_heads[i](fm), size, True))
            if i + 1 < len(top_down):
                previous = resize(fm, top_down[i + 1].shape[2:], True)
        border, fused = [], None
        for i, fm in enumerate(stages):
            fm = self.border_pre_rrbs[i](fm)
            if fused is None:
                fused = fm
            else:
                fused = self.border_aft_rrbs[i](fused + resize(fm, fused.shape[2:], True))
            border.append(resize(self.border_heads[i](fused), size, True))
        return smooth, border
