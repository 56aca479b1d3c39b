"""Small building blocks shared by the layers."""
from __future__ import annotations

import torch
from torch import nn


class Scale(nn.Module):
    """A learnable scalar multiplier (mmcv's `Scale`: parameter `scale`, a 0-d tensor)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale
