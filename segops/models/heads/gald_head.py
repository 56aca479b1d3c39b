"""GALD and DGCNet heads (Li et al., "Global Aggregation then Local Distribution in Fully
Convolutional Networks", BMVC 2019; Zhang et al., "Dual Graph Convolutional Network for Semantic
Segmentation", BMVC 2019), following lxtGH/GALD-DGCNet `libs/models/GALDNet.py` and
`libs/models/DualGCNNet.py`.

Both heads are `conva` (3x3 2048 -> 512), a context block, `convb` (3x3), `bottleneck` (3x3 over
[input; convb output]) and the classifier (`conv_seg`, no dropout: the official heads have none).
GALD's block: a stride-2 depthwise `down`, the grouped CGNL dot-product block (`long_relation`:
per channel group one scalar <phi, g> over all positions times theta, no softmax), upsampling,
and the local distribution (`local_attention`: three stride-2 depthwise convs, a sigmoid mask).
DGCNet's block: a coordinate-space GCN on a 1/8-size copy (`gcn_local_attention`, whose softmax
runs over C x C channel affinities and is summed along the other axis) and a feature-space GCN
(projection to 128 nodes). Neither is a softmax attention over positions, so no segops
operator applies: they are plain PyTorch. Names are the official ones; the official code's
conv-BN-ReLU Sequentials are ConvModules here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.common import BaseDecodeHead
from segops.nn import ConvModule


def _upsample(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _depthwise_down(channels: int, norm, act, padding: int = 0, bias: bool = True):
    return ConvModule(channels, channels, 3, stride=2, padding=padding, groups=channels,
                      bias=bias, norm=norm, act=act)


class SpatialCGNL(nn.Module):
    """Compact generalised non-local with the dot-product kernel, `groups` channel groups:
    `x + GN(z(att_g * t))`, att_g = <p_g, g_g> over channels and positions of group g."""

    def __init__(self, in_channels: int, channels: int, groups: int = 8) -> None:
        super().__init__()
        self.groups = groups
        self.t = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.p = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.g = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.z = nn.Conv2d(channels, in_channels, 1, groups=groups, bias=False)
        self.gn = nn.GroupNorm(groups, in_channels)

    def forward(self, x: Tensor) -> Tensor:
        t, p, g = self.t(x), self.p(x), self.g(x)
        n, c, h, w = t.shape
        grouped = (n, self.groups, (c // self.groups) * h * w)
        att = (p.reshape(grouped) * g.reshape(grouped)).sum(-1, keepdim=True)
        y = (att * t.reshape(grouped)).reshape(n, c, h, w)
        return self.gn(self.z(y)) + x


class LocalAttenModule(nn.Module):
    """`x + x * sigmoid(up(dconv3(dconv2(dconv1(x)))))`, stride-2 unpadded depthwise convs."""

    def __init__(self, channels: int, norm="bn") -> None:
        super().__init__()
        self.dconv1 = _depthwise_down(channels, norm, "relu")
        self.dconv2 = _depthwise_down(channels, norm, "relu")
        self.dconv3 = _depthwise_down(channels, norm, "relu")

    def forward(self, x: Tensor) -> Tensor:
        mask = torch.sigmoid(_upsample(self.dconv3(self.dconv2(self.dconv1(x))), x.shape[2:]))
        return x + x * mask


class GALDBlock(nn.Module):
    def __init__(self, channels: int, inter_channels: int, norm="bn") -> None:
        super().__init__()
        self.down = _depthwise_down(channels, norm, "relu")
        self.long_relation = SpatialCGNL(channels, inter_channels)
        self.local_attention = LocalAttenModule(channels, norm)

    def forward(self, x: Tensor) -> Tensor:
        x = _upsample(self.long_relation(self.down(x)), x.shape[2:])
        return self.local_attention(x) + x


class SpatialGCN(nn.Module):
    """DGCNet's coordinate-space GCN (on the downsampled map)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inter = channels // 2
        self.node_k = nn.Conv2d(channels, inter, 1)
        self.node_v = nn.Conv2d(channels, inter, 1)
        self.node_q = nn.Conv2d(channels, inter, 1)
        self.conv_wg = nn.Conv1d(inter, inter, 1, bias=False)
        self.bn_wg = nn.BatchNorm1d(inter)
        self.out = nn.Sequential(nn.Conv2d(inter, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        k, v, q = self.node_k(x), self.node_v(x), self.node_q(x)
        n, c, h, w = k.shape
        k, v, q = k.reshape(n, c, -1), v.reshape(n, c, -1), q.reshape(n, c, -1)
        affinity = torch.softmax(torch.bmm(q, v.transpose(1, 2)), dim=2)  # (N, C, C)
        av = torch.bmm(affinity.transpose(1, 2), k)  # (N, C, L): the official k^T A, transposed
        avw = self.bn_wg(self.conv_wg(av)).reshape(n, c, h, w)
        return F.relu(self.out(avw) + x)


class DualGCN(nn.Module):
    """DGCNet's dual GCN: coordinate-space (local) and feature-space (global) reasoning."""

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        nodes, states = channels // ratio, channels // ratio * 2
        self.phi = nn.Conv2d(channels, states, 1, bias=False)
        self.bn_phi = nn.BatchNorm2d(states)
        self.theta = nn.Conv2d(channels, nodes, 1, bias=False)
        self.bn_theta = nn.BatchNorm2d(nodes)
        self.conv_adj = nn.Conv1d(nodes, nodes, 1, bias=False)
        self.bn_adj = nn.BatchNorm1d(nodes)
        self.conv_wg = nn.Conv1d(states, states, 1, bias=False)
        self.bn_wg = nn.BatchNorm1d(states)
        self.conv3 = nn.Conv2d(states, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.local = nn.Sequential(*[m for _ in range(3) for m in (
            nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
            nn.BatchNorm2d(channels))])
        self.gcn_local_attention = SpatialGCN(channels)
        self.final = nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False),
                                   nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        local = _upsample(self.gcn_local_attention(self.local(x)), (h, w))
        spatial_local = x * local + x
        states = self.bn_phi(self.phi(x)).reshape(n, -1, h * w)
        proj = self.bn_theta(self.theta(x)).reshape(n, -1, h * w)
        z_idt = torch.bmm(states, proj.transpose(1, 2))  # (N, states, nodes)
        z = self.bn_adj(self.conv_adj(z_idt.transpose(1, 2))).transpose(1, 2) + z_idt
        z = self.bn_wg(self.conv_wg(z))
        y = self.bn3(self.conv3(torch.bmm(z, proj).reshape(n, -1, h, w)))
        return self.final(torch.cat([spatial_local, F.relu(x + y)], dim=1))


class _ContextBlockHead(BaseDecodeHead):
    """conva -> `block` -> convb -> bottleneck([x; .]) -> conv_seg; `block_name` names the
    block's attribute."""

    block_name = ""

    def __init__(self, in_channels, channels: int, num_classes: int, block: nn.Module,
                 **kwargs) -> None:
        kwargs.setdefault("dropout_ratio", 0.0)
        super().__init__(in_channels, channels, num_classes, **kwargs)
        conv = dict(kernel_size=3, padding=1, norm=self.norm, act=self.act)
        self.conva = ConvModule(self.in_channels, channels, **conv)
        setattr(self, self.block_name, block)
        self.convb = ConvModule(channels, channels, **conv)
        self.bottleneck = ConvModule(self.in_channels + channels, channels, **conv)

    def forward(self, inputs):
        x = self._transform_inputs(inputs)
        out = self.convb(getattr(self, self.block_name)(self.conva(x)))
        return self.cls_seg(self.bottleneck(torch.cat([x, out], dim=1)))


class GALDHead(_ContextBlockHead):
    block_name = "a2block"

    def __init__(self, in_channels, channels: int, num_classes: int, **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes,
                         GALDBlock(channels, channels // 2, kwargs.get("norm", "bn")), **kwargs)


class DualGCNHead(_ContextBlockHead):
    block_name = "dualgcn"

    def __init__(self, in_channels, channels: int, num_classes: int, **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, DualGCN(channels), **kwargs)
