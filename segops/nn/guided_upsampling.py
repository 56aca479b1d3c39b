"""Guided Upsampling Module (Mazzini, "Guided Upsampling Network for Real-Time Semantic
Segmentation", BMVC 2018, Sec. 3.1): a low-resolution map is upsampled by sampling it,
bilinearly, at each output pixel's position displaced by a predicted offset (the "guidance
offsets table"), so that boundaries can follow the image instead of the coarse grid. With
zero offsets it is plain bilinear upsampling (align_corners=False)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GuidedUpsampling(nn.Module):
    """`forward(x, offsets)`: x (N, C, h, w), offsets (N, 2, H, W) in output pixels (x then y)
    -> (N, C, H, W). No parameters: the offsets come from the network's guidance branch."""

    def forward(self, x: Tensor, offsets: Tensor) -> Tensor:
        if offsets.dim() != 4 or offsets.shape[1] != 2 or offsets.shape[0] != x.shape[0]:
            raise ValueError(f"offsets must be (N, 2, H, W) with N={x.shape[0]}, got "
                             f"{tuple(offsets.shape)}")
        n, _, h, w = offsets.shape
        # output pixel centres in grid_sample's normalised coordinates (align_corners=False)
        ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) * (2.0 / h) - 1.0
        xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) * (2.0 / w) - 1.0
        base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2)
        scale = torch.tensor([2.0 / w, 2.0 / h], device=x.device, dtype=x.dtype)
        grid = base + offsets.permute(0, 2, 3, 1).to(x.dtype) * scale
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
