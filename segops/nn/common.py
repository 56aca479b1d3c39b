"""Small building blocks shared by the layers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class Scale(nn.Module):
    """A learnable scalar multiplier (mmcv's `Scale`: parameter `scale`, a 0-d tensor)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def make_norm(norm: Optional[str], channels: int) -> Optional[nn.Module]:
    if norm is None:
        return None
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "syncbn":  # single-process stand-in with the same state_dict
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"unknown norm {norm!r} (expected 'bn', 'syncbn', 'gn' or None)")


def make_act(act: Optional[str]) -> Optional[nn.Module]:
    if act is None:
        return None
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {act!r} (expected 'relu', 'gelu' or None)")


class ConvModule(nn.Module):
    """conv -> norm -> activation, with mmcv's submodule names (`conv`, `bn`/`gn`, `activate`).

    As in mmcv, the conv has a bias only when there is no norm layer (bias="auto").
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias="auto",
                 norm: Optional[str] = "bn", act: Optional[str] = "relu") -> None:
        super().__init__()
        if bias == "auto":
            bias = norm is None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              groups, bias=bias)
        self.norm_name = None
        norm_layer = make_norm(norm, out_channels)
        if norm_layer is not None:
            self.norm_name = "gn" if norm == "gn" else "bn"
            self.add_module(self.norm_name, norm_layer)
        self.activate = make_act(act)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        if self.activate is not None:
            x = self.activate(x)
        return x
