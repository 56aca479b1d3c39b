"""Swin Transformer backbone (Liu et al., ICCV 2021) as mmseg's `SwinTransformer`.

State-dict keys as mmseg: `patch_embed.{projection,norm}`, `stages.<i>.blocks.<j>.{norm1,
attn.w_msa.{relative_position_bias_table, relative_position_index, qkv, proj}, norm2, ffn.layers}`,
`stages.<i>.downsample.{norm,reduction}` (PatchMerging via nn.Unfold channel order, as mmseg —
official Swin checkpoints need mmseg's swin2mmseg conversion) and the output norms `norm<i>`.
Window attention (shifted windows with the -100 mask, as the reference) runs on the segops
backend the call resolves to (`segops.use_backend`, or `build(..., backend=)`): on a fused one
it is `segops.interlaced_sparse_attention` in "short" mode over the padded, rolled map, the
heads folded into the batch, block = the window, bias = the relative position bias and mask =
the shift mask; on `reference` (and with attention dropout while training) it is mmseg's plain
PyTorch per-window attention.

Variants (mmseg upernet_swin configs): t: 96 dims, depths 2/2/6/2, heads 3/6/12/24, window 7;
s: depths 2/2/18/2; b: 128 dims, heads 4/8/16/32, window 12; l: 192 dims, heads 6/12/24/48,
window 12 (b and l depths 2/2/18/2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.backbones._transformer import FFN, DropPath, PatchEmbed, drop_path_rates
from segops.ops.interlaced_sparse_attention import SPEC as WINDOW_ATTENTION
from segops.ops.interlaced_sparse_attention import interlaced_sparse_attention

SWIN_VARIANTS = {
    "t": dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "s": dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "b": dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "l": dict(embed_dims=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(B, H, W, C), H and W multiples of the window -> (B * windows, window_size**2, C), windows in
    row-major order per image."""
    b, h, w, c = x.shape
    ws = window_size
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: Tensor, window_size: int, h: int, w: int) -> Tensor:
    """Inverse of window_partition: (B * windows, window_size**2, C) -> (B, H, W, C)."""
    ws, c = window_size, windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(query_window: int, key_window: int) -> Tensor:
    """(q*q, k*k) indices into a ((q + k - 1)**2)-entry bias table for a q x q query window
    against a k x k key window: index[(y1,x1),(y2,x2)] = (y1 - y2 + k - 1) * (q + k - 1) +
    (x1 - x2 + k - 1)."""
    def coords(n: int) -> Tensor:
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        return torch.stack([ys.flatten(), xs.flatten()])
    rel = coords(query_window)[:, :, None] - coords(key_window)[:, None, :] + (key_window - 1)
    return rel[0] * (query_window + key_window - 1) + rel[1]


def shifted_window_mask(hp: int, wp: int, window_size: int, shift_size: int, device=None) -> Tensor:
    """(windows, L, L) additive mask of the windows of an (hp, wp) map rolled by -shift_size:
    -100 between tokens that came from different regions of the unrolled map, else 0."""
    ws, s = window_size, shift_size
    img = torch.zeros(1, hp, wp, 1, device=device)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
        for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = window_partition(img, ws).squeeze(-1)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowMSA(nn.Module):
    """Multi-head self-attention inside one window, with a learned relative position bias."""

    def __init__(self, embed_dims: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (embed_dims // num_heads) ** -0.5
        w = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(w, w))
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self) -> Tensor:
        """(heads, L, L) with L = window_size**2 members of a window."""
        members = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(members, members, -1).permute(2, 0, 1)

    def fused_backend(self, like: Tensor):
        """The fused backend the window attention runs on, or None for the plain PyTorch path
        (the reference backend, or attention dropout, which the fused kernels do not have)."""
        if self.training and self.attn_drop.p > 0:
            return None
        name = WINDOW_ATTENTION.select("auto", like)
        return None if name == "reference" else name

    def forward_map(self, x: Tensor, mask, backend: str) -> Tensor:
        """The attention of every window of x (B, Hp, Wp, C) at once on a fused backend, the
        heads folded into the batch (sample b * heads + h); mask: (windows, L, L) or None."""
        b, hp, wp, c = x.shape
        heads, ws = self.num_heads, self.window_size
        qkv = self.qkv(x).view(b, hp, wp, 3, heads, c // heads).permute(3, 0, 4, 5, 1, 2)
        q, k, v = qkv.reshape(3, b * heads, c // heads, hp, wp)
        out = interlaced_sparse_attention(q, k, v, (ws, ws), "short", scale=self.scale,
                                          bias=self.relative_position_bias(), mask=mask,
                                          backend=backend)
        out = out.view(b, heads, c // heads, hp, wp).permute(0, 3, 4, 1, 2).reshape(b, hp, wp, c)
        return self.proj_drop(self.proj(out))

    def forward(self, x: Tensor, mask=None) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        attn = attn + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(b, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class ShiftWindowMSA(nn.Module):
    def __init__(self, embed_dims: int, num_heads: int, window_size: int, shift_size: int = 0,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, {window_size}), got {shift_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.w_msa = WindowMSA(embed_dims, num_heads, window_size, qkv_bias, attn_drop, proj_drop)
        self.drop = DropPath(drop_path)

    def forward(self, x: Tensor, hw) -> Tensor:
        b, length, c = x.shape
        h, w = hw
        ws = self.window_size
        x = x.view(b, h, w, c)
        pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = x.shape[1], x.shape[2]
        mask = None
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
            mask = shifted_window_mask(hp, wp, ws, self.shift_size, x.device).to(x.dtype)
        backend = self.w_msa.fused_backend(x)
        if backend is None:
            out = window_reverse(self.w_msa(window_partition(x, ws), mask=mask), ws, hp, wp)
        else:
            out = self.w_msa.forward_map(x, mask, backend)
        if self.shift_size > 0:
            out = torch.roll(out, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        out = out[:, :h, :w, :].reshape(b, h * w, c)
        return self.drop(out)


class SwinBlock(nn.Module):
    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int,
                 window_size: int = 7, shift: bool = False, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dims)
        self.attn = ShiftWindowMSA(embed_dims, num_heads, window_size,
                                   window_size // 2 if shift else 0, qkv_bias, attn_drop_rate,
                                   drop_rate, drop_path_rate)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, feedforward_channels, drop_rate, drop_path_rate)

    def forward(self, x: Tensor, hw) -> Tensor:
        x = x + self.attn(self.norm1(x), hw)
        return self.ffn(self.norm2(x), identity=x)


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> LayerNorm(4C) -> Linear(4C, 2C), channels in nn.Unfold order
    (channel-major, then the 2x2 offset), odd sizes padded bottom/right."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.stride = stride
        self.out_channels = out_channels
        self.sampler = nn.Unfold(kernel_size=stride, stride=stride)
        self.norm = nn.LayerNorm(stride * stride * in_channels)
        self.reduction = nn.Linear(stride * stride * in_channels, out_channels, bias=False)

    def forward(self, x: Tensor, hw):
        b, length, c = x.shape
        h, w = hw
        x = x.view(b, h, w, c).permute(0, 3, 1, 2)
        s = self.stride
        pad_h, pad_w = (s - h % s) % s, (s - w % s) % s
        if pad_h or pad_w:
            x = F.pad(x, [0, pad_w, 0, pad_h])
        x = self.sampler(x).transpose(1, 2)
        out_hw = (math.ceil(h / s), math.ceil(w / s))
        return self.reduction(self.norm(x)), out_hw


class SwinBlockSequence(nn.Module):
    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int, depth: int,
                 window_size: int, qkv_bias: bool, drop_rate: float, attn_drop_rate: float,
                 drop_path_rates: list, downsample) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(embed_dims, num_heads, feedforward_channels, window_size, i % 2 == 1,
                      qkv_bias, drop_rate, attn_drop_rate, drop_path_rates[i])
            for i in range(depth)])
        self.downsample = downsample

    def forward(self, x: Tensor, hw):
        """-> (input of the next stage, its token grid, this stage's output, its token grid)."""
        for block in self.blocks:
            x = block(x, hw)
        return self._with_downsampled(x, hw)

    def _with_downsampled(self, x: Tensor, hw):
        if self.downsample is not None:
            down, down_hw = self.downsample(x, hw)
            return down, down_hw, x, hw
        return x, hw, x, hw


class SwinTransformer(nn.Module):
    def __init__(self, in_channels: int = 3, embed_dims: int = 96, patch_size: int = 4,
                 window_size: int = 7, mlp_ratio: int = 4, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), strides=(4, 2, 2, 2), out_indices=(0, 1, 2, 3),
                 qkv_bias: bool = True, patch_norm: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 stage_cls=SwinBlockSequence) -> None:
        super().__init__()
        if strides[0] != patch_size:
            raise ValueError(f"strides[0] ({strides[0]}) must equal patch_size ({patch_size})")
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size, strides[0], "corner",
                                      norm=patch_norm)
        self.drop_after_pos = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        c = embed_dims
        self.num_features = []
        for i, depth in enumerate(depths):
            down = PatchMerging(c, 2 * c, strides[i + 1]) if i < len(depths) - 1 else None
            self.stages.append(stage_cls(c, num_heads[i], mlp_ratio * c, depth, window_size,
                                         qkv_bias, drop_rate, attn_drop_rate, dpr[:depth], down))
            dpr = dpr[depth:]
            self.num_features.append(c)
            if down is not None:
                c = down.out_channels
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

    def forward(self, img: Tensor) -> list:
        x, hw = self.patch_embed(img)
        x = self.drop_after_pos(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x, hw, out, out_hw = stage(x, hw)
            if i in self.out_indices:
                outs.append(self._output_map(i, out, out_hw))
        return outs

    def _output_map(self, index: int, out: Tensor, hw) -> Tensor:
        """Stage `index`'s tokens through its output norm, as an (N, C, H, W) map."""
        out = getattr(self, f"norm{index}")(out)
        return out.view(-1, hw[0], hw[1], self.num_features[index]).permute(0, 3, 1, 2).contiguous()


def swin(variant: str, **kwargs) -> SwinTransformer:
    if variant not in SWIN_VARIANTS:
        raise ValueError(f"unknown Swin variant {variant!r} (expected one of {sorted(SWIN_VARIANTS)})")
    cfg = dict(SWIN_VARIANTS[variant], drop_path_rate=0.3)
    cfg.update(kwargs)
    return SwinTransformer(**cfg)
