"""SDN necks (Tan et al., "Semantic Diffusion Network for Semantic Segmentation", NeurIPS 2022)
built on `segops.nn.SemanticDiffusion` (docs/operators.md §2.4). No official code exists: these follow the
paper description, and parity with the authors' model is unverified.

* `SDNNeck`, single-scale (plugged between an FCN's or Segmenter's encoder and decoder): the top
  backbone feature U is diffused with the guidance of the single-scale use, a stride-2 3x3 conv
  of U (the layer's `single_scale=True` mode; projected and resized back to U's grid inside the
  layer). Every other backbone output passes through unchanged, so any mmseg-style decode head
  can sit on top.
* `SDNPyramidNeck`, multi-scale (on Semantic FPN): level i of the pyramid is diffused with level
  i+1 as guidance; the coarsest level passes unchanged.
"""
from __future__ import annotations

from torch import nn

from segops.nn import SemanticDiffusion


class SDNNeck(nn.Module):
    """`diffusion` = `SemanticDiffusion(in_channels, guidance_channels, single_scale=True)`
    applied to `feats[in_index]`. `guidance_channels` defaults to in_channels // 4 (our choice;
    the paper gives no width for the single-scale guidance)."""

    def __init__(self, in_channels: int, guidance_channels: int | None = None, in_index: int = -1,
                 **diffusion_kw) -> None:
        super().__init__()
        if guidance_channels is None:
            guidance_channels = max(in_channels // 4, 1)
        self.in_index = in_index
        self.diffusion = SemanticDiffusion(in_channels, guidance_channels, single_scale=True,
                                           **diffusion_kw)

    def forward(self, feats):
        feats = list(feats)
        feats[self.in_index] = self.diffusion(feats[self.in_index])
        return tuple(feats)


class SDNPyramidNeck(nn.Module):
    def __init__(self, channels: int, num_levels: int, **diffusion_kw) -> None:
        super().__init__()
        self.diffusions = nn.ModuleList([SemanticDiffusion(channels, channels, **diffusion_kw)
                                         for _ in range(num_levels - 1)])

    def forward(self, feats):
        feats = list(feats)
        out = [sd(feats[i], feats[i + 1]) for i, sd in enumerate(self.diffusions)]
        return tuple(out + feats[len(self.diffusions):])
