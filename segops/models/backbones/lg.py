"""Local-to-Global Transformer backbone (Li et al., "Local-to-Global Self-Attention in Vision
Transformers", arXiv 2107.04735), built on Swin.

What could be checked, and against what: only the paper's abstract is available (arXiv
2107.04735 abstract pages). Its body (the method's equations, the LG-T configuration, the
ImageNet and ADE20K tables) is in no stored source, and the code its abstract announces
(github.com/ljpadam/LG-Transformer) was never released (the repository's issue #1, "where is
your code?", is open). The abstract says: a multi-path structure in each stage of a hierarchical
window-attention Transformer, local-to-global reasoning at multiple granularities, a marginal
increase in computation. The structure below agrees with that and with the model zoo issue
("multi-path local windows plus global pooled attention"), and its compute does: 953.6 GMACs
for UperNet at 512x2048 against Swin-T's 944.4 (+1%). Its size is our choice, not checked: the
paths have their own projections, so the backbone has 40.1M parameters against Swin-T's 27.5M
(UperNet: 72.5M against 59.9M); paths sharing the local projections would add only their bias
tables; a third-party digest of the paper's conclusion speaks of a "limited sacrifice in model
parameters", which the +46% here may not be. This is our reading, not a reproduction.

Every Swin block's attention gets parallel paths whose outputs are summed (one stochastic-depth
mask for the sum):
  * `attn.local`: Swin's (shifted) window attention on the full-resolution map (mmseg's
    ShiftWindowMSA, unchanged);
  * `attn.paths.<k>` for each ratio r of the stage's `pool_ratios`: the map average-pooled by r
    (ceil mode), window attention with the same window size (so each window covers r times more
    of the image), bilinearly upsampled back;
  * the last path: the map adaptively average-pooled to one window (window_size x window_size
    tokens), self-attention over it (global context at a coarse granularity), upsampled back.
Each path has its own qkv, projection and relative position bias (a `WindowMSA`). On a fused
backend every path's window attention runs on `segops.interlaced_sparse_attention` (short mode,
bias = the path's relative position bias; the local path with the shift mask), as Swin's does.

`lg-t` uses Swin-T's shape (96 dims, depths 2/2/6/2, heads 3/6/12/24, window 7, drop path 0.3)
with one 2x-pooled path in stages 1-3 (stage 4 is about one window at 512x512 crops, so only the
global path is added there).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.backbones._transformer import nchw_to_nlc, nlc_to_nchw
from segops.models.backbones.swin import (SWIN_VARIANTS, ShiftWindowMSA, SwinTransformer,
                                          WindowMSA, window_partition, window_reverse)

LG_VARIANTS = {"t": dict(SWIN_VARIANTS["t"], pool_ratios=((2,), (2,), (2,), ()))}


class PooledWindowPath(nn.Module):
    """Window attention over an average-pooled copy of the map (pooled by `ratio`, or to a single
    window when `ratio` is None), upsampled back to the map's size."""

    def __init__(self, dims: int, num_heads: int, window_size: int, ratio: Optional[int],
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.window_size = window_size
        self.ratio = ratio
        self.w_msa = WindowMSA(dims, num_heads, window_size, qkv_bias, attn_drop, proj_drop)

    def forward(self, x: Tensor, hw) -> Tensor:
        ws = self.window_size
        m = nlc_to_nchw(x, hw)
        if self.ratio is None:
            m = F.adaptive_avg_pool2d(m, ws)
        else:
            m = F.avg_pool2d(m, self.ratio, ceil_mode=True)
        ph, pw = m.shape[-2:]
        m = F.pad(m.permute(0, 2, 3, 1), (0, 0, 0, (ws - pw % ws) % ws, 0, (ws - ph % ws) % ws))
        hp, wp = m.shape[1:3]
        backend = self.w_msa.fused_backend(m)
        if backend is None:
            out = window_reverse(self.w_msa(window_partition(m, ws)), ws, hp, wp)
        else:
            out = self.w_msa.forward_map(m, None, backend)
        out = out[:, :ph, :pw]
        out = F.interpolate(out.permute(0, 3, 1, 2), size=tuple(hw), mode="bilinear",
                            align_corners=False)
        return nchw_to_nlc(out)


class LGAttention(nn.Module):
    """Swin's window attention `local` plus the pooled paths, summed. Takes over the local
    attention's stochastic depth so one drop mask covers the sum."""

    def __init__(self, local: ShiftWindowMSA, pool_ratios) -> None:
        super().__init__()
        msa = local.w_msa
        dims = msa.qkv.in_features
        self.drop = local.drop
        local.drop = nn.Identity()
        self.local = local
        self.paths = nn.ModuleList(
            PooledWindowPath(dims, msa.num_heads, msa.window_size, r, msa.qkv.bias is not None,
                             msa.attn_drop.p, msa.proj_drop.p)
            for r in (*pool_ratios, None))

    def forward(self, x: Tensor, hw) -> Tensor:
        out = self.local(x, hw)
        for path in self.paths:
            out = out + path(x, hw)
        return self.drop(out)


class LGTransformer(SwinTransformer):
    def __init__(self, pool_ratios=((2,), (2,), (2,), ()), **swin_kwargs) -> None:
        super().__init__(**swin_kwargs)
        if len(pool_ratios) != len(self.stages):
            raise ValueError(f"pool_ratios: expected one tuple per stage ({len(self.stages)}), "
                             f"got {len(pool_ratios)}")
        for stage, ratios in zip(self.stages, pool_ratios):
            for block in stage.blocks:
                block.attn = LGAttention(block.attn, ratios)


def lg_transformer(variant: str, **kwargs) -> LGTransformer:
    if variant not in LG_VARIANTS:
        raise ValueError(f"unknown LG variant {variant!r} (expected one of {sorted(LG_VARIANTS)})")
    return LGTransformer(**{**LG_VARIANTS[variant], "drop_path_rate": 0.3, **kwargs})
