"""DANet head (Fu et al., CVPR 2019) as mmseg's `DAHead` (`mmseg/models/decode_heads/da_head.py`).

The position attention module (PAM) is `segops.nn.SelfAttentionBlock` without scaling, norms
or output projection (as mmseg's PAM is its `_SelfAttentionBlock`), so the fused kernels carry it; the channel attention module (CAM) is a C x C attention in plain PyTorch.
Submodule names follow mmseg (`pam.query_project`, `pam.key_project`, `pam.value_project`,
`pam.gamma.scale`, `cam.gamma.scale`, `pam_in_conv`, ... `cam_conv_seg`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segops.models.common import BaseDecodeHead
from segops.nn import ConvModule, Scale, SelfAttentionBlock


class PAM(SelfAttentionBlock):
    """Position attention: 1x1 query/key convs to `channels`, 1x1 value conv (all with bias),
    `x + gamma * softmax_j(<q_i, k_j>) v_j`, gamma initialised to 0."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__(in_channels, in_channels, channels, in_channels, key_query_norm=False,
                         matmul_norm=False, with_out=False)
        self.gamma = Scale(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma(super().forward(x, x)) + x


class CAM(nn.Module):
    """Channel attention: `x + gamma * softmax(max(E) - E) x` with E = X X^T over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = Scale(0.0)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        flat = x.reshape(n, c, h * w)
        energy = torch.bmm(flat, flat.transpose(1, 2))
        energy = energy.amax(dim=-1, keepdim=True) - energy
        out = torch.bmm(energy.softmax(dim=-1), flat).view(n, c, h, w)
        return self.gamma(out) + x


class DAHead(BaseDecodeHead):
    """PAM and CAM branches (3x3 ConvModule in, attention, 3x3 ConvModule out) summed for the
    main prediction. In training mode `forward` returns (pam_cam, pam, cam) logits, as mmseg's
    forward does (each is supervised); in eval mode only pam_cam."""

    def __init__(self, in_channels, channels: int, num_classes: int, *, pam_channels: int = 64,
                 **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        conv = dict(kernel_size=3, padding=1, norm=self.norm, act=self.act)
        self.pam_channels = pam_channels
        self.pam_in_conv = ConvModule(self.in_channels, channels, **conv)
        self.pam = PAM(channels, pam_channels)
        self.pam_out_conv = ConvModule(channels, channels, **conv)
        self.pam_conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.cam_in_conv = ConvModule(self.in_channels, channels, **conv)
        self.cam = CAM()
        self.cam_out_conv = ConvModule(channels, channels, **conv)
        self.cam_conv_seg = nn.Conv2d(channels, num_classes, 1)

    def _seg(self, conv: nn.Module, feat: Tensor) -> Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return conv(feat)

    def forward(self, inputs):
        x = self._transform_inputs(inputs)
        pam_feat = self.pam_out_conv(self.pam(self.pam_in_conv(x)))
        cam_feat = self.cam_out_conv(self.cam(self.cam_in_conv(x)))
        out = self.cls_seg(pam_feat + cam_feat)
        if not self.training:
            return out
        return out, self._seg(self.pam_conv_seg, pam_feat), self._seg(self.cam_conv_seg, cam_feat)
