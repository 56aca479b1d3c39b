"""Vision Transformer backbone as mmseg's `VisionTransformer` (the Segmenter configs).

State-dict keys as mmseg: `patch_embed.projection` (no bias, as mmseg's `patch_bias=False`;
`patch_bias=True` adds the bias the official Segmenter / timm ViT has), `cls_token`, `pos_embed`, `layers.<i>.{ln1,
attn.attn.*, ln2, ffn.layers.*}`, and the final norm `ln1` (final_norm=True). The position
embedding is stored for `img_size` and resized bicubically to the token grid of the input, as
mmseg does. Returns a tuple with one (N, C, H/16, W/16) map per `out_indices` entry (the class
token removed).

Variants (patch 16; mmseg segmenter_vit-{t,s,b,l}_mask configs):
  t: 192 dims, 12 layers, 3 heads; s: 384, 12, 6; b: 768, 12, 12; l: 1024, 24, 16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.backbones._transformer import PatchEmbed, ViTEncoderLayer, drop_path_rates

VIT_VARIANTS = {
    "t": dict(embed_dims=192, num_layers=12, num_heads=3),
    "s": dict(embed_dims=384, num_layers=12, num_heads=6),
    "b": dict(embed_dims=768, num_layers=12, num_heads=12),
    "l": dict(embed_dims=1024, num_layers=24, num_heads=16),
}


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size: int = 16, in_channels: int = 3,
                 embed_dims: int = 768, num_layers: int = 12, num_heads: int = 12,
                 mlp_ratio: int = 4, out_indices=-1, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 with_cls_token: bool = True, final_norm: bool = False, norm_eps: float = 1e-5,
                 patch_norm: bool = False, patch_bias: bool = False,
                 interpolate_mode: str = "bicubic") -> None:
        super().__init__()
        if isinstance(img_size, int):
            img_size = (img_size, img_size)
        self.img_size = tuple(img_size)
        self.patch_size = patch_size
        self.interpolate_mode = interpolate_mode
        self.with_cls_token = with_cls_token
        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size, patch_size, "corner",
                                      norm=patch_norm, norm_eps=norm_eps, bias=patch_bias)
        num_patches = (self.img_size[0] // patch_size) * (self.img_size[1] // patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dims))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.drop_after_pos = nn.Dropout(drop_rate)
        if isinstance(out_indices, int):
            out_indices = [num_layers - 1 if out_indices == -1 else out_indices]
        self.out_indices = list(out_indices)
        dpr = drop_path_rates(drop_path_rate, num_layers)
        self.layers = nn.ModuleList([
            ViTEncoderLayer(embed_dims, num_heads, mlp_ratio * embed_dims, drop_rate,
                            attn_drop_rate, dpr[i], qkv_bias, norm_eps)
            for i in range(num_layers)])
        self.final_norm = final_norm
        if final_norm:
            self.ln1 = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.embed_dims = embed_dims

    def _pos_embed(self, x: Tensor, hw) -> Tensor:
        pos = self.pos_embed
        if x.shape[1] != pos.shape[1]:
            ph, pw = self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size
            grid = pos[:, 1:].reshape(1, ph, pw, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=hw, mode=self.interpolate_mode, align_corners=False)
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        return self.drop_after_pos(x + pos)

    def forward(self, img: Tensor):
        x, hw = self.patch_embed(img)
        n = x.shape[0]
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        x = self._pos_embed(x, hw)
        if not self.with_cls_token:
            x = x[:, 1:]
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == len(self.layers) - 1 and self.final_norm:
                x = self.ln1(x)
            if i in self.out_indices:
                out = x[:, 1:] if self.with_cls_token else x
                outs.append(out.transpose(1, 2).reshape(n, -1, hw[0], hw[1]).contiguous())
        return tuple(outs)


def vit(variant: str, **kwargs) -> VisionTransformer:
    """ViT-{t,s,b,l}/16 as configured in mmseg's Segmenter configs (LN eps 1e-6, final norm,
    drop path 0.1, img_size 512 — 640 for 'l')."""
    if variant not in VIT_VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r} (expected one of {sorted(VIT_VARIANTS)})")
    cfg = dict(img_size=640 if variant == "l" else 512, patch_size=16, drop_path_rate=0.1,
               final_norm=True, norm_eps=1e-6, with_cls_token=True, **VIT_VARIANTS[variant])
    cfg.update(kwargs)
    return VisionTransformer(**cfg)
