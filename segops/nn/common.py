"""Small building blocks shared by the layers and the models: `Scale`, norm/activation
factories and the one conv -> norm -> activation module, `ConvModule`."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

# A norm is named by this package's short name or by an mmcv `norm_cfg` dict.
Norm = Union[None, str, dict]

_NORMS = {"bn": "BN", "syncbn": "SyncBN", "gn": "GN"}


class Scale(nn.Module):
    """A learnable scalar multiplier (mmcv's `Scale`: parameter `scale`, a 0-d tensor)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def norm_name(norm: Norm) -> str:
    """The submodule name mmcv gives the norm layer: `gn` for group norm, else `bn`."""
    kind = norm.get("type") if isinstance(norm, dict) else _NORMS.get(norm)
    return "gn" if kind == "GN" else "bn"


def make_norm(norm: Norm, channels: int, dim: int = 2) -> Optional[nn.Module]:
    """None, "bn", "syncbn" (a single-process BN with the same state_dict), "gn" (32 groups), or
    an mmcv norm_cfg dict (type BN/BN1d/BN2d/SyncBN/GN, with eps, momentum, num_groups)."""
    if norm is None:
        return None
    if isinstance(norm, str):
        if norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r} (expected 'bn', 'syncbn', 'gn' or None)")
        cfg = {"type": _NORMS[norm], "num_groups": 32}
    else:
        cfg = norm
    kind = cfg.get("type")
    if kind in ("BN", "BN1d", "BN2d", "SyncBN"):
        bn = nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d
        return bn(channels, eps=cfg.get("eps", 1e-5), momentum=cfg.get("momentum", 0.1))
    if kind == "GN":
        return nn.GroupNorm(cfg["num_groups"], channels, eps=cfg.get("eps", 1e-5))
    raise ValueError(f"norm_cfg type must be 'BN', 'SyncBN' or 'GN', got {norm!r}")


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

    As in mmcv, the conv has a bias only when there is no norm layer (bias="auto"). `dim=1`
    builds Conv1d/BatchNorm1d (STLNet's 1-D ConvBNReLU).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias="auto",
                 norm: Norm = "bn", act: Optional[str] = "relu", dim: int = 2) -> None:
        super().__init__()
        if dim not in (1, 2):
            raise ValueError(f"ConvModule: dim must be 1 or 2, got {dim!r}")
        if bias == "auto":
            bias = norm is None
        conv = nn.Conv1d if dim == 1 else nn.Conv2d
        self.conv = conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias=bias)
        self.norm_name = None
        norm_layer = make_norm(norm, out_channels, dim)
        if norm_layer is not None:
            self.norm_name = norm_name(norm)
            self.add_module(self.norm_name, norm_layer)
        self.activate = make_act(act)

    @property
    def norm_layer(self) -> Optional[nn.Module]:
        return getattr(self, self.norm_name) if self.norm_name is not None else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        if self.activate is not None:
            x = self.activate(x)
        return x
