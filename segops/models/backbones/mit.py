"""Mix Transformer (MiT) backbone of SegFormer (Xie et al., NeurIPS 2021) as mmseg's
`MixVisionTransformer`.

State-dict keys as mmseg: `layers.<stage>.0` overlapping PatchEmbed (`projection`, `norm`),
`layers.<stage>.1.<block>` encoder layers (`norm1`, `attn.attn.*` torch MHA, `attn.sr`/`attn.norm`
spatial reduction, `norm2`, `ffn.layers.{0,1,4}` = fc1, depth-wise 3x3 pe_conv, fc2) and
`layers.<stage>.2` the stage LayerNorm. LayerNorm eps 1e-6. Returns 4 maps at strides 4..32.

Variants (mmseg segformer_mit-b* configs): embed 32 (b0) or 64, heads 1/2/5/8, layers
b0 2/2/2/2, b1 2/2/2/2, b2 3/4/6/3, b3 3/4/18/3, b4 3/8/27/3, b5 3/6/40/3.
"""
from __future__ import annotations

from torch import Tensor, nn

from segops.models.backbones._transformer import (DropPath, PatchEmbed, drop_path_rates,
                                                  nchw_to_nlc, nlc_to_nchw)

MIT_VARIANTS = {
    "b0": dict(embed_dims=32, num_layers=(2, 2, 2, 2)),
    "b1": dict(embed_dims=64, num_layers=(2, 2, 2, 2)),
    "b2": dict(embed_dims=64, num_layers=(3, 4, 6, 3)),
    "b3": dict(embed_dims=64, num_layers=(3, 4, 18, 3)),
    "b4": dict(embed_dims=64, num_layers=(3, 8, 27, 3)),
    "b5": dict(embed_dims=64, num_layers=(3, 6, 40, 3)),
}


class MixFFN(nn.Module):
    def __init__(self, embed_dims: int, feedforward_channels: int, ffn_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        drop = nn.Dropout(ffn_drop)
        self.layers = nn.Sequential(
            nn.Conv2d(embed_dims, feedforward_channels, 1),
            nn.Conv2d(feedforward_channels, feedforward_channels, 3, padding=1,
                      groups=feedforward_channels),
            nn.GELU(), drop,
            nn.Conv2d(feedforward_channels, embed_dims, 1), drop)
        self.dropout_layer = DropPath(drop_path)

    def forward(self, x: Tensor, hw, identity: Tensor) -> Tensor:
        out = nchw_to_nlc(self.layers(nlc_to_nchw(x, hw)))
        return identity + self.dropout_layer(out)


class EfficientMultiheadAttention(nn.Module):
    """Multi-head attention whose keys/values are spatially reduced by a stride-`sr_ratio`
    conv + LayerNorm (SegFormer's efficient self-attention)."""

    def __init__(self, embed_dims: int, num_heads: int, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, drop_path: float = 0.0, qkv_bias: bool = True,
                 sr_ratio: int = 1, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=attn_drop, bias=qkv_bias,
                                          batch_first=True)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dropout_layer = DropPath(drop_path)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(embed_dims, embed_dims, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(embed_dims, eps=norm_eps)

    def forward(self, x: Tensor, hw, identity: Tensor) -> Tensor:
        kv = x
        if self.sr_ratio > 1:
            kv = self.norm(nchw_to_nlc(self.sr(nlc_to_nchw(x, hw))))
        out = self.attn(x, kv, kv, need_weights=False)[0]
        return identity + self.dropout_layer(self.proj_drop(out))


class MiTEncoderLayer(nn.Module):
    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 qkv_bias: bool = True, sr_ratio: int = 1, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.attn = EfficientMultiheadAttention(embed_dims, num_heads, attn_drop_rate, drop_rate,
                                                drop_path_rate, qkv_bias, sr_ratio, norm_eps)
        self.norm2 = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.ffn = MixFFN(embed_dims, feedforward_channels, drop_rate, drop_path_rate)

    def forward(self, x: Tensor, hw) -> Tensor:
        x = self.attn(self.norm1(x), hw, identity=x)
        return self.ffn(self.norm2(x), hw, identity=x)


class MixVisionTransformer(nn.Module):
    def __init__(self, in_channels: int = 3, embed_dims: int = 64, num_layers=(3, 4, 6, 3),
                 num_heads=(1, 2, 4, 8), patch_sizes=(7, 3, 3, 3), strides=(4, 2, 2, 2),
                 sr_ratios=(8, 4, 2, 1), out_indices=(0, 1, 2, 3), mlp_ratio: int = 4,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        n = len(num_layers)
        if not (n == len(num_heads) == len(patch_sizes) == len(strides) == len(sr_ratios)):
            raise ValueError("MixVisionTransformer: num_layers, num_heads, patch_sizes, strides "
                             "and sr_ratios need one entry per stage")
        if max(out_indices) >= n:
            raise ValueError(f"out_indices {out_indices} out of range for {n} stages")
        self.out_indices = tuple(out_indices)
        dpr = drop_path_rates(drop_path_rate, sum(num_layers))
        self.layers = nn.ModuleList()
        self.out_channels = []
        cur = 0
        for i, depth in enumerate(num_layers):
            dims = embed_dims * num_heads[i]
            embed = PatchEmbed(in_channels, dims, patch_sizes[i], strides[i],
                               padding=patch_sizes[i] // 2, norm=True, norm_eps=norm_eps)
            blocks = nn.ModuleList([
                MiTEncoderLayer(dims, num_heads[i], mlp_ratio * dims, drop_rate, attn_drop_rate,
                                dpr[cur + j], qkv_bias, sr_ratios[i], norm_eps)
                for j in range(depth)])
            self.layers.append(nn.ModuleList([embed, blocks, nn.LayerNorm(dims, eps=norm_eps)]))
            self.out_channels.append(dims)
            in_channels = dims
            cur += depth

    def forward(self, x: Tensor) -> list:
        outs = []
        for i, (embed, blocks, norm) in enumerate(self.layers):
            x, hw = embed(x)
            for block in blocks:
                x = block(x, hw)
            x = nlc_to_nchw(norm(x), hw)
            if i in self.out_indices:
                outs.append(x)
        return outs


def mit(variant: str, **kwargs) -> MixVisionTransformer:
    """MiT-b0..b5 with mmseg's SegFormer config (heads 1/2/5/8, sr 8/4/2/1, drop path 0.1)."""
    if variant not in MIT_VARIANTS:
        raise ValueError(f"unknown MiT variant {variant!r} (expected one of {sorted(MIT_VARIANTS)})")
    cfg = dict(num_heads=(1, 2, 5, 8), patch_sizes=(7, 3, 3, 3), strides=(4, 2, 2, 2),
               sr_ratios=(8, 4, 2, 1), mlp_ratio=4, qkv_bias=True, drop_path_rate=0.1,
               **MIT_VARIANTS[variant])
    cfg.update(kwargs)
    return MixVisionTransformer(**cfg)
