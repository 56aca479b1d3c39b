"""`PAFEM`: the pyramid attention fusion enhancement module of DANet for RGB-D saliency (Zhao et
al., "A Single Stream Network for Robust and Real-time RGB-D Salient Object Detection", ECCV
2020; `multi_scale_module.py` of Xiaoqi-Zhao-DLUT/GateNet-RGB-Saliency, DANet-RGBD-Saliency).

An ASPP (1x1 branch, dilated 3x3 branches 2, 4, 6, image pooling) whose dilated branches each
add position attention on their own output: `y + gamma * sum_j softmax_j(<q_i, k_j>) v_j`
(query/key 1x1 convs to C/8, value 1x1 conv, no logit scaling, gamma 0 at init), i.e. the
non-local operator (`segops.disentangled_non_local`, no whitening, scale 1) through
`segops.nn.SelfAttentionBlock`, so the fused backends serve it. Convs keep their bias and
activations are PReLU, as in the reference. The reference names the attention convs
`query_conv2` ... `gamma4` on the module itself; here they are `attentions.<i>.query_conv`,
..., `attentions.<i>.gamma` (a key rename loads its checkpoints).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.nn.common import Scale
from segops.nn.self_attention_block import SelfAttentionBlock


def conv_bn_prelu(in_channels: int, out_channels: int, kernel_size: int = 1,
                  dilation: int = 1) -> nn.Sequential:
    """The saliency codebases' conv(bias) -> BN -> PReLU (`0`, `1`, `2`)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size,
                                   padding=dilation * (kernel_size // 2), dilation=dilation),
                         nn.BatchNorm2d(out_channels), nn.PReLU())


class PositionAttention(SelfAttentionBlock):
    """DANet's position attention with the reference's names: `x + gamma * attention(x)`."""

    names = {"key": "key_conv", "query": "query_conv", "value": "value_conv", "out": "out_conv"}

    def __init__(self, channels: int, *, backend: str = "auto") -> None:
        super().__init__(channels, channels, channels // 8, channels, key_query_norm=False,
                         matmul_norm=False, with_out=False, backend=backend)
        self.gamma = Scale(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma(super().forward(x, x)) + x


class PAFEM(nn.Module):
    """`PAFEM(in_channels, channels)`: 3x3 `down_conv` to `channels`, branches of `channels // 2`
    (`conv1` 1x1; `conv2..4` dilated, each followed by its position attention; `conv5` on the
    global average, upsampled), `fuse` 1x1 to `channels`. `backend` (keyword-only) selects the
    segops backend of the attentions."""

    def __init__(self, in_channels: int, channels: int, dilations=(2, 4, 6), *,
                 backend: str = "auto") -> None:
        super().__init__()
        branch = channels // 2
        self.down_conv = conv_bn_prelu(in_channels, channels, 3)
        self.conv1 = conv_bn_prelu(channels, branch)
        self.dilated = nn.ModuleList(conv_bn_prelu(channels, branch, 3, d) for d in dilations)
        self.attentions = nn.ModuleList(PositionAttention(branch, backend=backend)
                                        for _ in dilations)
        self.conv5 = conv_bn_prelu(channels, branch)
        self.fuse = conv_bn_prelu((len(dilations) + 2) * branch, channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.down_conv(x)
        pooled = F.interpolate(self.conv5(F.adaptive_avg_pool2d(x, 1)), size=x.shape[2:],
                               mode="bilinear", align_corners=False)
        branches = [self.conv1(x)]
        branches += [attend(conv(x)) for conv, attend in zip(self.dilated, self.attentions)]
        return self.fuse(torch.cat(branches + [pooled], dim=1))
