"""SeMask Swin Transformer (Jain et al., 2021): Swin stages, each followed by a semantic layer
that predicts a class map (the semantic prior) and uses it to re-weight the stage's features.

Follows Picsart-AI-Research/SeMask-Segmentation `SeMask-FPN/mmseg/models/backbones/
semask_swin_transformer.py`. The Swin parts are `segops.models.backbones.swin` (mmseg's module
names: official SeMask checkpoints need mmseg's swin2mmseg key conversion for them); the semantic
layers keep the official names, `stages.<i>.semantic_layer.{norm1, class_injection.<j>.{mlp_cls_q,
mlp_cls_k, mlp_v, mlp_res, gamma}}`.

A semantic layer is LayerNorm, then per `SemanticAttention`: prior = Linear_q(x) (one logit per
class), weights = softmax(prior @ Linear_k(x)^T) over tokens, x = x + gamma * Linear_res(weights @
Linear_v(x)) with gamma starting at 0. The residual is taken on the normalised tokens, as in the
reference. The attention runs inside non-overlapping windows of `sem_window_size` (zero-padded
bottom/right, padding tokens not masked, as the reference) or, in the reference's "large" setting
(embed dims 96 or 192 with more than 19 classes: the T, S and L ADE20K models), over the whole map
in stages 3 and 4.

The semantic attention is `segops.interlaced_sparse_attention` in "short" mode with scale 1: its
groups are the windows (block = the window, or the whole map for the global stages) with members
in the window partition's row-major order, query = the class logits, key = Linear_k, value =
Linear_v; so it runs on the fused backends (`segops.use_backend`, or `build(..., backend=)`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.backbones._transformer import nlc_to_nchw
from segops.models.backbones.swin import SWIN_VARIANTS, SwinBlockSequence, SwinTransformer
from segops.ops.interlaced_sparse_attention import interlaced_sparse_attention


class SemanticAttention(nn.Module):
    """Attention within groups of tokens whose logits are class scores: runs through
    `segops.interlaced_sparse_attention` in "short" mode (the groups are the contiguous
    `block_size` blocks of the map, members row-major, as Swin's window partition) with scale 1."""

    def __init__(self, dims: int, num_classes: int) -> None:
        super().__init__()
        self.mlp_cls_q = nn.Linear(dims, num_classes)
        self.mlp_cls_k = nn.Linear(dims, num_classes)
        self.mlp_v = nn.Linear(dims, dims)
        self.mlp_res = nn.Linear(dims, dims)
        self.proj_drop = nn.Dropout(0.1)
        self.gamma = nn.Parameter(torch.zeros(1))
        for layer in (self.mlp_cls_q, self.mlp_cls_k, self.mlp_v):
            nn.init.kaiming_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.mlp_res.weight)
        nn.init.zeros_(self.mlp_res.bias)

    def forward(self, x: Tensor, block_size):
        """x (B, H, W, C), H and W multiples of block_size -> (class logits (B, H, W, K),
        re-weighted features (B, H, W, C))."""
        prior = self.mlp_cls_q(x)
        maps = [t.permute(0, 3, 1, 2) for t in (prior, self.mlp_cls_k(x), self.mlp_v(x))]
        attended = interlaced_sparse_attention(*maps, block_size, "short", scale=1.0)
        feats = self.proj_drop(self.mlp_res(attended.permute(0, 2, 3, 1)))
        return prior, self.gamma * feats + x


class SemanticLayer(nn.Module):
    """Official `SWSeMaskBlock` (window_size set: attention inside windows, the map zero-padded
    bottom/right to whole windows) / `SeMaskBlock` (window_size None: over the whole map)."""

    def __init__(self, dims: int, num_classes: int, window_size, num_blocks: int = 1) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dims)
        self.class_injection = nn.ModuleList([SemanticAttention(dims, num_classes)
                                              for _ in range(num_blocks)])

    def forward(self, x: Tensor, hw):
        b, length, c = x.shape
        h, w = hw
        x = self.norm1(x).view(b, h, w, c)
        if self.window_size is None:
            block = (h, w)
        else:
            ws = self.window_size
            x = F.pad(x, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
            block = (ws, ws)
        for attention in self.class_injection:
            prior, x = attention(x, block)
        return tuple(t[:, :h, :w].reshape(b, h * w, -1) for t in (prior, x))


class SeMaskStage(SwinBlockSequence):
    """Swin blocks -> `semantic_layer` (attached by SeMaskSwinTransformer) -> patch merging."""

    def forward(self, x: Tensor, hw):
        """As SwinBlockSequence.forward, plus the stage's class logits (B, H*W, K) last."""
        for block in self.blocks:
            x = block(x, hw)
        prior, x = self.semantic_layer(x, hw)
        return (*self._with_downsampled(x, hw), prior)


class SeMaskSwinTransformer(SwinTransformer):
    """`forward(img)` -> (feature maps per out index, class-logit maps (N, K, H_i, W_i) per out
    index)."""

    def __init__(self, num_classes: int = 150, sem_window_size: int = 7,
                 num_sem_blocks=(1, 1, 1, 1), global_late_stages=None, **swin_kwargs) -> None:
        """global_late_stages: global semantic attention in stages 3 and 4; None picks the
        SeMask-FPN rule (embed dims 96 or 192 with more than 19 classes). SeMask-Mask2Former's
        backbone always uses them."""
        super().__init__(stage_cls=SeMaskStage, **swin_kwargs)
        if global_late_stages is None:
            global_late_stages = self.num_features[0] in (96, 192) and num_classes > 19
        for i, (stage, dims) in enumerate(zip(self.stages, self.num_features)):
            window = None if global_late_stages and i >= 2 else sem_window_size
            stage.semantic_layer = SemanticLayer(dims, num_classes, window, num_sem_blocks[i])

    def forward(self, img: Tensor):
        x, hw = self.patch_embed(img)
        x = self.drop_after_pos(x)
        outs, priors = [], []
        for i, stage in enumerate(self.stages):
            x, hw, out, out_hw, prior = stage(x, hw)
            if i in self.out_indices:
                outs.append(self._output_map(i, out, out_hw))
                priors.append(nlc_to_nchw(prior, out_hw))
        return outs, priors


def semask_swin(variant: str, num_classes: int = 150, **kwargs) -> SeMaskSwinTransformer:
    """SeMask-Swin as the official ADE20K SeMask-FPN configs: the Swin variant's dims, depths,
    heads and window (semantic windows the same size), drop path 0.3, one semantic attention per
    stage."""
    if variant not in SWIN_VARIANTS:
        raise ValueError(f"unknown Swin variant {variant!r} "
                         f"(expected one of {sorted(SWIN_VARIANTS)})")
    cfg = dict(SWIN_VARIANTS[variant], drop_path_rate=0.3)
    cfg["sem_window_size"] = cfg["window_size"]
    cfg.update(kwargs)
    return SeMaskSwinTransformer(num_classes=num_classes, **cfg)
