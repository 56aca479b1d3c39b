"""Deformable sampling layers in plain PyTorch (bilinear `grid_sample`, zeros outside the map),
for the Mask2Former pixel decoder:

* `MSDeformAttn`: multi-scale deformable attention (Deformable DETR; the module of
  Mask2Former's `pixel_decoder/ops/modules/ms_deform_attn.py`, sampled as its
  `ms_deform_attn_core_pytorch` reference);
* `ModulatedDeformConv2d`: deformable convolution v2 with the layout of DCNv2's `DCN`
  (`dcn_v2.py`, used by FaPN): offsets (N, 2*groups*k*k, H, W) as (dy, dx) pairs per group and
  kernel position, modulation (N, groups*k*k, H, W) after a sigmoid. torchvision's
  `deform_conv2d` has the same contract, but its PyPI wheels for torch 2.13 are CUDA builds
  that do not load with the CPU torch the project pins.
* `position_embedding_sine`: DETR's normalised sine position encoding (no parameters).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def position_embedding_sine(x: Tensor, num_pos_feats: int, temperature: float = 10000.0) -> Tensor:
    """(N, num_pos_feats * 2, H, W): sin/cos of the normalised (y, x) cumulative position."""
    n, _, h, w = x.shape
    eps, scale = 1e-6, 2 * math.pi
    y_embed = torch.arange(1, h + 1, dtype=torch.float32, device=x.device)[:, None].expand(h, w)
    x_embed = torch.arange(1, w + 1, dtype=torch.float32, device=x.device)[None, :].expand(h, w)
    y_embed = y_embed / (h + eps) * scale
    x_embed = x_embed / (w + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)

    def encode(e: Tensor) -> Tensor:
        p = e[:, :, None] / dim_t
        return torch.stack((p[:, :, 0::2].sin(), p[:, :, 1::2].cos()), dim=3).flatten(2)
    pos = torch.cat((encode(y_embed), encode(x_embed)), dim=2).permute(2, 0, 1)
    return pos[None].expand(n, -1, -1, -1).to(x.dtype)


def ms_deform_attn(value: Tensor, spatial_shapes, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """value (N, S, heads, d) over levels of `spatial_shapes` [(H, W), ...] flattened in order;
    sampling_locations (N, Lq, heads, levels, points, 2) as (x, y) in [0, 1]; attention_weights
    (N, Lq, heads, levels, points). Returns (N, Lq, heads * d)."""
    n, _, heads, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(n * heads, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*heads, Lq, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, lq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(n, heads * d, lq).transpose(1, 2)


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4) -> None:
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        nn.init.zeros_(self.sampling_offsets.weight)
        # Initial offsets: point i of head h at distance i + 1 in the head's own direction.
        thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(n_heads, 1, 1, 2).repeat(1, n_levels, n_points, 1)
        grid = grid * torch.arange(1, n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value_in: Tensor,
                spatial_shapes) -> Tensor:
        """query (N, Lq, C), reference_points (N, Lq, levels, 2) as (x, y) in [0, 1], value_in
        (N, S, C) over the levels of `spatial_shapes`."""
        n, lq, c = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_in).view(n, value_in.shape[1], heads, c // heads)
        offsets = self.sampling_offsets(query).view(n, lq, heads, levels, points, 2)
        weights = self.attention_weights(query).view(n, lq, heads, levels * points)
        weights = weights.softmax(-1).view(n, lq, heads, levels, points)
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype,
                                  device=query.device)
        locations = (reference_points[:, :, None, :, None, :]
                     + offsets / normalizer[None, None, None, :, None, :])
        return self.output_proj(ms_deform_attn(value, spatial_shapes, locations, weights))


def modulated_deform_conv2d(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                            bias: Tensor, padding: int, groups: int) -> Tensor:
    """Stride-1 deformable convolution v2 (DCNv2 layout, see the module docstring)."""
    n, c, h, w = x.shape
    cout, _, kh, kw = weight.shape
    k = kh * kw
    ho, wo = offset.shape[-2:]
    base_y = (torch.arange(ho, device=x.device, dtype=x.dtype) - padding)[:, None]
    base_x = (torch.arange(wo, device=x.device, dtype=x.dtype) - padding)[None, :]
    ky, kx = torch.meshgrid(torch.arange(kh, device=x.device, dtype=x.dtype),
                            torch.arange(kw, device=x.device, dtype=x.dtype), indexing="ij")
    offset = offset.view(n, groups, k, 2, ho, wo)
    py = base_y + ky.flatten()[:, None, None] + offset[:, :, :, 0]  # (n, groups, k, ho, wo)
    px = base_x + kx.flatten()[:, None, None] + offset[:, :, :, 1]
    grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), dim=-1)
    sampled = F.grid_sample(x.reshape(n * groups, c // groups, h, w),
                            grid.reshape(n * groups, k * ho, wo, 2), mode="bilinear",
                            padding_mode="zeros", align_corners=False)
    sampled = sampled.view(n, groups, c // groups, k, ho, wo)
    sampled = sampled * mask.view(n, groups, 1, k, ho, wo)
    cols = sampled.reshape(n, c * k, ho * wo)
    out = weight.reshape(cout, c * k) @ cols + bias.view(1, cout, 1)
    return out.view(n, cout, ho, wo)


class ModulatedDeformConv2d(nn.Module):
    """DCNv2's `DCN` with extra_offset_mask: `forward(x, offset_feature)` predicts the offsets
    and modulation from `offset_feature` with `conv_offset_mask` (zero-initialised) and convolves
    `x`. Keys as DCNv2: weight, bias, conv_offset_mask.{weight,bias}."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 padding: int = 1, deformable_groups: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        stdv = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        nn.init.uniform_(self.weight, -stdv, stdv)
        self.conv_offset_mask = nn.Conv2d(in_channels, deformable_groups * 3 * kernel_size ** 2,
                                          kernel_size, padding=padding)
        nn.init.zeros_(self.conv_offset_mask.weight)
        nn.init.zeros_(self.conv_offset_mask.bias)

    def forward(self, x: Tensor, offset_feature: Tensor) -> Tensor:
        o1, o2, mask = self.conv_offset_mask(offset_feature).chunk(3, dim=1)
        return modulated_deform_conv2d(x, torch.cat((o1, o2), dim=1), mask.sigmoid(), self.weight,
                                       self.bias, self.padding, self.deformable_groups)
