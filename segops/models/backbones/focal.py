"""Focal Transformer backbone (Yang et al., NeurIPS 2021), the two-level focal self-attention of
microsoft/Focal-Transformer `classification/focal_transformer.py` with its ImageNet configs
(`configs/focal_{tiny,small,base}_patch4_window7_224.yaml`: window 7, focal levels 2, focal windows
7/5/3/1, expand size 3, "fc" window pooling, no shift, non-overlapping patch embeddings).

Each 7x7 query window attends to
  1. its own tokens (relative position bias, as Swin),
  2. the tokens of a 3-token ring around it ("expand"), gathered by rolling the key/value map by
     +-3 in both directions (cyclically, as the reference: border windows see the opposite
     border), with a learned bias per (query, ring token),
  3. pooled windows: every window is pooled to one token by a learned Linear over its 49
     positions (`pool_layers`), and the query window attends to the focal_window x focal_window
     pooled windows around its own (zero padding outside the map masked with -100), with a
     relative bias table.
The fine level (1) is Swin's window attention, but (2) and (3) attend to tokens outside the
window, so the whole focal attention is not a grouped attention over a partition: one softmax
covers keys that no group of `segops.interlaced_sparse_attention` holds (a window's ring and
pooled neighbours belong to other windows), so it stays plain PyTorch, unlike Swin's and LG's
window attention, which run on that op on the fused backends.

The official segmentation code is not released (its README lists UperNet-Focal-T/S/B at 62M /
85M / 126M). The reference class fixes its input resolution when it is built and drops the ring
for stages no larger than a window; this backbone is built as the reference would be for the
512x512 ADE20K crops (every stage larger than a window, so every block has the ring) and pads
any input size to whole windows (bottom/right, as Swin's segmentation backbones; an odd stage
size is padded before each stride-2 patch embedding), with a LayerNorm per output stage
(`norm<i>`, as Swin's segmentation backbone). Module names are the reference's (`patch_embed.
{proj,norm}`, `layers.<i>.blocks.<j>.{pool_layers, norm1, attn.*, norm2, mlp.{fc1,fc2}}`,
`layers.<i>.downsample.{proj,norm}`); only focal levels 1 and 2 (the released configs) are built.

`pos_embed_img_size` adds the reference's absolute position embedding (`ape=True`:
`absolute_pos_embed`, one learned vector per patch of an image of that size, added after the
patch embedding). The UperNet models use it at 512 (a 128x128 table): that is the one option of
the reference class whose size closes the gap to the README for all three variants (1,572,864 /
1,572,864 / 2,097,152 parameters: 62.42M / 84.68M / 125.84M against 62M / 85M / 126M, where
no other option does: e.g. `use_conv_embed` adds 1.94M / 1.94M / 3.45M). The ImageNet configs
have no such table (nor do the detection counts of the README need one), so it is trained from
ADE20K alone. An input whose patch grid differs from the table's is given the table resized
bicubically, as Swin-Transformer-Semantic-Segmentation (the pipeline the README names) does
with its `ape`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.backbones._transformer import (DropPath, drop_path_rates, nchw_to_nlc,
                                                   nlc_to_nchw)
from segops.models.backbones.swin import relative_position_index, window_partition, window_reverse

FOCAL_VARIANTS = {
    "t": dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "s": dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "b": dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
}


class FocalPatchEmbed(nn.Module):
    """Non-overlapping patch embedding (`proj` conv, `norm`), input padded bottom/right to whole
    patches. Takes and returns (N, L, C) tokens with their (H, W) grid, or an image."""

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dims, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: Tensor, hw=None):
        if hw is not None:
            x = nlc_to_nchw(x, hw)
        p = self.patch_size
        h, w = x.shape[-2:]
        x = F.pad(x, [0, (p - w % p) % p, 0, (p - h % p) % p])
        x = self.proj(x)
        out_hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), out_hw


class Mlp(nn.Module):
    def __init__(self, dims: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dims)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _ring_indices(window: int, expand: int) -> Tensor:
    """Positions, in the (top-left, top-right, bottom-left, bottom-right)-rolled windows
    concatenated, that lie outside the query window: the ring of `expand` tokens around it."""
    inner = window - expand
    # Rows/columns of the rolled copy that come from the query window itself.
    own = [(range(inner), range(inner)), (range(inner), range(expand, window)),
           (range(expand, window), range(inner)), (range(expand, window), range(expand, window))]
    index = [(corner * window + y) * window + x
             for corner, (ys, xs) in enumerate(own)
             for y in range(window) for x in range(window) if not (y in ys and x in xs)]
    return torch.tensor(index, dtype=torch.long)


class FocalWindowAttention(nn.Module):
    def __init__(self, dims: int, num_heads: int, window_size: int, expand_size: int,
                 focal_window: int, focal_level: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = ws = window_size
        self.expand_size = expand_size
        self.focal_window = focal_window
        self.focal_level = focal_level
        self.scale = (dims // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(ws, ws))
        if expand_size > 0:
            ring = _ring_indices(ws, expand_size)
            self.relative_position_bias_table_to_neighbors = nn.Parameter(
                torch.zeros(1, num_heads, ws * ws, ring.numel()))
            nn.init.trunc_normal_(self.relative_position_bias_table_to_neighbors, std=0.02)
            self.register_buffer("valid_ind_rolled", ring)
        if focal_level > 1:
            table = nn.Parameter(torch.zeros(num_heads, (ws + focal_window - 1) ** 2))
            nn.init.trunc_normal_(table, std=0.02)
            self.relative_position_bias_table_to_windows = nn.ParameterList([table])
            self.register_buffer("relative_position_index_0",
                                 relative_position_index(ws, focal_window))
        self.qkv = nn.Linear(dims, dims * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dims, dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, windows: Tensor) -> Tensor:
        """(B*, n, C) -> (B*, heads, n, C // heads)."""
        b, n, c = windows.shape
        return windows.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def _ring(self, t: Tensor) -> Tensor:
        e, ws = self.expand_size, self.window_size
        rolled = [window_partition(torch.roll(t, shifts=s, dims=(1, 2)), ws)
                  for s in ((-e, -e), (-e, e), (e, -e), (e, e))]
        return self._heads(torch.cat(rolled, dim=1))[:, :, self.valid_ind_rolled]

    def _pooled_neighbourhoods(self, t: Tensor) -> Tensor:
        """(B, nWh, nWw, C) pooled windows -> (B * nWh * nWw, heads, fw*fw, C // heads): the
        focal_window x focal_window pooled windows around each window."""
        b, nwh, nww, c = t.shape
        fw = self.focal_window
        cols = F.unfold(t.permute(0, 3, 1, 2), fw, padding=fw // 2)
        cols = cols.view(b, c, fw * fw, nwh * nww).permute(0, 3, 2, 1).reshape(-1, fw * fw, c)
        return self._heads(cols)

    def forward(self, x: Tensor, pooled=None) -> Tensor:
        """x (B, Hp, Wp, C), Hp and Wp whole windows; pooled (B, Hp/ws, Wp/ws, C) one token per
        window (focal level 2). Returns (B * windows, ws*ws, C)."""
        b, hp, wp, c = x.shape
        ws, heads = self.window_size, self.num_heads
        q, k, v = self.qkv(x).view(b, hp, wp, 3, c).unbind(3)
        q = self._heads(window_partition(q, ws)) * self.scale
        keys = [self._heads(window_partition(k, ws))]
        values = [self._heads(window_partition(v, ws))]
        n = ws * ws
        bias = [self.relative_position_bias_table[self.relative_position_index.view(-1)]
                .view(n, n, heads).permute(2, 0, 1)]
        if self.expand_size > 0:
            keys.append(self._ring(k))
            values.append(self._ring(v))
            bias.append(self.relative_position_bias_table_to_neighbors[0])
        mask = None
        if self.focal_level > 1:
            pk, pv = self.qkv(pooled).view(*pooled.shape[:3], 3, c).unbind(3)[1:]
            keys.append(self._pooled_neighbourhoods(pk))
            values.append(self._pooled_neighbourhoods(pv))
            fw2 = self.focal_window ** 2
            table = self.relative_position_bias_table_to_windows[0]
            bias.append(table[:, self.relative_position_index_0.view(-1)].view(heads, n, fw2))
            inside = F.unfold(pooled.new_ones(1, 1, *pooled.shape[1:3]), self.focal_window,
                              padding=self.focal_window // 2)[0].t()  # (windows, fw*fw)
            outside = (inside == 0).to(x.dtype) * -100.0
            mask = F.pad(outside, (sum(t.shape[2] for t in keys[:-1]), 0))
        attn = q @ torch.cat(keys, dim=2).transpose(-2, -1) + torch.cat(bias, dim=-1)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(-1, nw, heads, n, attn.shape[-1]) + mask[None, :, None, None])
            attn = attn.view(-1, heads, n, attn.shape[-1])
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ torch.cat(values, dim=2)).transpose(1, 2).reshape(-1, n, c)
        return self.proj_drop(self.proj(out))


class FocalTransformerBlock(nn.Module):
    def __init__(self, dims: int, num_heads: int, window_size: int = 7, expand_size: int = 3,
                 focal_window: int = 7, focal_level: int = 2, mlp_ratio: int = 4,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        if focal_level not in (1, 2):
            raise ValueError(f"focal_level must be 1 or 2, got {focal_level}")
        self.window_size = window_size
        # One pooling per coarser level: a learned average over the window's positions.
        self.pool_layers = nn.ModuleList()
        if focal_level > 1:
            pool = nn.Linear(window_size * window_size, 1)
            nn.init.constant_(pool.weight, 1.0 / (window_size * window_size))
            nn.init.zeros_(pool.bias)
            self.pool_layers.append(pool)
        self.norm1 = nn.LayerNorm(dims)
        self.attn = FocalWindowAttention(dims, num_heads, window_size, expand_size, focal_window,
                                         focal_level, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dims)
        self.mlp = Mlp(dims, mlp_ratio * dims, drop)

    def forward(self, x: Tensor, hw) -> Tensor:
        b, length, c = x.shape
        h, w = hw
        ws = self.window_size
        y = F.pad(self.norm1(x).view(b, h, w, c),
                  (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        hp, wp = y.shape[1], y.shape[2]
        pooled = None
        if len(self.pool_layers):
            windows = y.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 5, 2, 4)
            pooled = self.pool_layers[0](windows.reshape(b, hp // ws, wp // ws, c, ws * ws))[..., 0]
        y = window_reverse(self.attn(y, pooled), ws, hp, wp)[:, :h, :w].reshape(b, h * w, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class FocalStage(nn.Module):
    def __init__(self, dims: int, depth: int, downsample, drop_path: list, **block_kwargs) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([FocalTransformerBlock(dims, drop_path=drop_path[i],
                                                           **block_kwargs) for i in range(depth)])
        self.downsample = downsample


class FocalTransformer(nn.Module):
    def __init__(self, in_channels: int = 3, embed_dims: int = 96, patch_size: int = 4,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size: int = 7,
                 focal_levels=(2, 2, 2, 2), focal_windows=(7, 5, 3, 1), expand_sizes=(3, 3, 3, 3),
                 mlp_ratio: int = 4, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2,
                 out_indices=(0, 1, 2, 3), pos_embed_img_size=None) -> None:
        super().__init__()
        self.out_indices = tuple(out_indices)
        self.patch_embed = FocalPatchEmbed(in_channels, embed_dims, patch_size)
        self.pos_embed_grid = None
        if pos_embed_img_size is not None:
            self.pos_embed_grid = (pos_embed_img_size // patch_size,) * 2
            self.absolute_pos_embed = nn.Parameter(
                torch.zeros(1, self.pos_embed_grid[0] * self.pos_embed_grid[1], embed_dims))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        self.num_features = [embed_dims * 2 ** i for i in range(len(depths))]
        self.layers = nn.ModuleList()
        for i, (depth, dims) in enumerate(zip(depths, self.num_features)):
            down = FocalPatchEmbed(dims, 2 * dims, 2) if i < len(depths) - 1 else None
            self.layers.append(FocalStage(
                dims, depth, down, dpr[:depth], num_heads=num_heads[i], window_size=window_size,
                expand_size=expand_sizes[i], focal_window=focal_windows[i],
                focal_level=focal_levels[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                drop=drop_rate, attn_drop=attn_drop_rate))
            dpr = dpr[depth:]
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

    def _stage_outputs(self, x: Tensor, hw):
        """Yields each stage's tokens (before its downsampling) and their grid."""
        for stage in self.layers:
            for block in stage.blocks:
                x = block(x, hw)
            yield x, hw
            if stage.downsample is not None:
                x, hw = stage.downsample(x, hw)

    def _position_embedding(self, hw) -> Tensor:
        if tuple(hw) == self.pos_embed_grid:
            return self.absolute_pos_embed
        table = nlc_to_nchw(self.absolute_pos_embed, self.pos_embed_grid)
        return nchw_to_nlc(F.interpolate(table, size=tuple(hw), mode="bicubic",
                                         align_corners=False))

    def forward(self, img: Tensor) -> list:
        x, hw = self.patch_embed(img)
        if self.pos_embed_grid is not None:
            x = x + self._position_embedding(hw)
        stages = enumerate(self._stage_outputs(self.pos_drop(x), hw))
        return [nlc_to_nchw(getattr(self, f"norm{i}")(out), out_hw)
                for i, (out, out_hw) in stages if i in self.out_indices]


def focal(variant: str, **kwargs) -> FocalTransformer:
    if variant not in FOCAL_VARIANTS:
        raise ValueError(f"unknown Focal variant {variant!r} (expected one of {sorted(FOCAL_VARIANTS)})")
    return FocalTransformer(**{**FOCAL_VARIANTS[variant], **kwargs})
