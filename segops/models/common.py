"""Building blocks shared by the heads, named as in mmcv/mmseg so checkpoints load."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.nn import ConvModule


class DepthwiseSeparableConvModule(nn.Module):
    """mmcv's DepthwiseSeparableConvModule: `depthwise_conv` (k x k, groups=in_channels, norm,
    act) then `pointwise_conv` (1x1, norm, act), both ConvModules. `dw_norm`/`dw_act` and
    `pw_norm`/`pw_act` override `norm`/`act` for one of the two (mmcv's dw_/pw_ cfgs)."""

    _SAME = object()

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, dilation: int = 1, norm: Optional[str] = "bn",
                 act: Optional[str] = "relu", dw_norm=_SAME, dw_act=_SAME, pw_norm=_SAME,
                 pw_act=_SAME) -> None:
        super().__init__()
        same = DepthwiseSeparableConvModule._SAME
        self.depthwise_conv = ConvModule(in_channels, in_channels, kernel_size, stride, padding,
                                         dilation, groups=in_channels,
                                         norm=norm if dw_norm is same else dw_norm,
                                         act=act if dw_act is same else dw_act)
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1,
                                         norm=norm if pw_norm is same else pw_norm,
                                         act=act if pw_act is same else pw_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


def resize(x: Tensor, size, align_corners: bool = False, mode: str = "bilinear") -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode=mode)
    return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)


class BaseDecodeHead(nn.Module):
    """mmseg's BaseDecodeHead: input selection, dropout and the 1x1 classifier `conv_seg`.

    input_transform: None (take inputs[in_index]), "resize_concat" (resize every selected input to
    the first one's size and concatenate) or "multiple_select" (a list of the selected inputs).
    """

    def __init__(self, in_channels, channels: int, num_classes: int, *, dropout_ratio: float = 0.1,
                 norm: Optional[str] = "bn", act: Optional[str] = "relu", in_index=-1,
                 input_transform: Optional[str] = None, align_corners: bool = False) -> None:
        super().__init__()
        if input_transform not in (None, "resize_concat", "multiple_select"):
            raise ValueError(f"input_transform must be None, 'resize_concat' or 'multiple_select', "
                             f"got {input_transform!r}")
        if input_transform == "resize_concat":
            self.in_channels = sum(in_channels)
        else:
            self.in_channels = in_channels
        self.channels = channels
        self.num_classes = num_classes
        self.norm = norm
        self.act = act
        self.in_index = in_index
        self.input_transform = input_transform
        self.align_corners = align_corners
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None

    def _transform_inputs(self, inputs):
        if self.input_transform == "resize_concat":
            selected = [inputs[i] for i in self.in_index]
            size = selected[0].shape[2:]
            return torch.cat([resize(x, size, self.align_corners) for x in selected], dim=1)
        if self.input_transform == "multiple_select":
            return [inputs[i] for i in self.in_index]
        return inputs[self.in_index]

    def cls_seg(self, feat: Tensor) -> Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)
