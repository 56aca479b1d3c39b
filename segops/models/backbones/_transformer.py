"""Transformer building blocks with mmcv/mmseg submodule names (shared by ViT, Swin, MiT and the
Segmenter head), so mmseg checkpoints load: `PatchEmbed.projection/norm`, mmcv `FFN.layers`,
mmcv `MultiheadAttention.attn` (a torch nn.MultiheadAttention: in_proj_weight, out_proj)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or at rate 0)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def nlc_to_nchw(x: Tensor, hw) -> Tensor:
    n, length, c = x.shape
    h, w = hw
    if length != h * w:
        raise ValueError(f"nlc_to_nchw: {length} tokens cannot form a {h}x{w} map")
    return x.transpose(1, 2).reshape(n, c, h, w).contiguous()


def nchw_to_nlc(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2).contiguous()


class PatchEmbed(nn.Module):
    """mmseg `PatchEmbed`: conv `projection` (+ optional LayerNorm `norm`), output (N, L, C) and
    the (H, W) token grid. padding="corner" pads bottom/right so every pixel is covered (mmseg's
    AdaptivePadding); an int padding is passed to the conv."""

    def __init__(self, in_channels: int, embed_dims: int, kernel_size: int, stride: int,
                 padding="corner", norm: bool = False, norm_eps: float = 1e-5,
                 bias: bool = True) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.adaptive = padding == "corner"
        if isinstance(padding, str) and not self.adaptive:
            raise ValueError(f"PatchEmbed padding must be an int or 'corner', got {padding!r}")
        self.projection = nn.Conv2d(in_channels, embed_dims, kernel_size, stride,
                                    0 if self.adaptive else padding, bias=bias)
        self.norm = nn.LayerNorm(embed_dims, eps=norm_eps) if norm else None

    def forward(self, x: Tensor):
        if self.adaptive:
            h, w = x.shape[-2:]
            k, s = self.kernel_size, self.stride
            pad_h = max((math.ceil(h / s) - 1) * s + k - h, 0)
            pad_w = max((math.ceil(w / s) - 1) * s + k - w, 0)
            if pad_h or pad_w:
                x = F.pad(x, [0, pad_w, 0, pad_h])
        x = self.projection(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x, hw


class FFN(nn.Module):
    """mmcv `FFN` with num_fcs=2: layers.0 = (Linear, act, Dropout), layers.1 = Linear,
    layers.2 = Dropout; `identity + drop_path(out)`."""

    def __init__(self, embed_dims: int, feedforward_channels: int, ffn_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.GELU(),
                          nn.Dropout(ffn_drop)),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(ffn_drop))
        self.dropout_layer = DropPath(drop_path)

    def forward(self, x: Tensor, identity: Optional[Tensor] = None) -> Tensor:
        return (x if identity is None else identity) + self.dropout_layer(self.layers(x))


class MultiheadAttention(nn.Module):
    """mmcv `MultiheadAttention` (batch_first): `attn` is torch's nn.MultiheadAttention;
    returns `identity + drop_path(proj_drop(attn(q, k, v)))`."""

    def __init__(self, embed_dims: int, num_heads: int, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, drop_path: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=attn_drop, bias=bias,
                                          batch_first=True)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dropout_layer = DropPath(drop_path)

    def forward(self, query: Tensor, key: Optional[Tensor] = None,
                identity: Optional[Tensor] = None) -> Tensor:
        key = query if key is None else key
        out = self.attn(query, key, key, need_weights=False)[0]
        return (query if identity is None else identity) + self.dropout_layer(self.proj_drop(out))


class ViTEncoderLayer(nn.Module):
    """mmseg ViT `TransformerEncoderLayer`: ln1 -> attn (+x) -> ln2 -> ffn (+x)."""

    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 qkv_bias: bool = True, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.attn = MultiheadAttention(embed_dims, num_heads, attn_drop_rate, drop_rate,
                                       drop_path_rate, bias=qkv_bias)
        self.ln2 = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.ffn = FFN(embed_dims, feedforward_channels, drop_rate, drop_path_rate)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.ln1(x), identity=x)
        return self.ffn(self.ln2(x), identity=x)


def drop_path_rates(rate: float, n: int) -> list:
    """Linearly increasing stochastic-depth rates 0..rate (torch.linspace's values, in Python so
    models can be built on the meta device)."""
    if n <= 1:
        return [0.0] * n
    return [rate * i / (n - 1) for i in range(n)]
