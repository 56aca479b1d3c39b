"""SDN necks (Tan et al., "Semantic Diffusion Network for Semantic Segmentation", NeurIPS 2022)
built on `segops.nn.SemanticDiffusion` (SPEC §2.4). No official code exists; parity with the
authors' model is unverified.

* `SDNPyramidNeck` (multi-scale, on Semantic FPN): level i of the pyramid is diffused with level
  i+1 as guidance (projected and resized inside the layer); the coarsest level passes unchanged.
* `SDNSingleNeck` (single-scale, on Segmenter's ViT map): the guidance is a stride-2 3x3 conv of U
  (`SemanticDiffusion(single_scale=True)`).
"""
from __future__ import annotations

from torch import nn


def semantic_diffusion_cls():
    import segops.nn as snn
    cls = getattr(snn, "SemanticDiffusion", None)
    if cls is None:
        raise RuntimeError("segops.nn.SemanticDiffusion is not available in this build of segops; "
                           "the SDN models cannot be built")
    return cls


class SDNPyramidNeck(nn.Module):
    def __init__(self, channels: int, num_levels: int, backend: str = "auto", **kw) -> None:
        super().__init__()
        cls = semantic_diffusion_cls()
        self.diffusions = nn.ModuleList([cls(channels, channels, backend=backend, **kw)
                                         for _ in range(num_levels - 1)])

    def forward(self, feats):
        feats = list(feats)
        out = [sd(feats[i], feats[i + 1]) for i, sd in enumerate(self.diffusions)]
        return tuple(out + feats[len(self.diffusions):])


class SDNSingleNeck(nn.Module):
    def __init__(self, channels: int, guidance_channels=None, in_index: int = -1,
                 backend: str = "auto", **kw) -> None:
        super().__init__()
        cls = semantic_diffusion_cls()
        self.in_index = in_index
        self.diffusion = cls(channels, guidance_channels or channels, single_scale=True,
                             backend=backend, **kw)

    def forward(self, feats):
        feats = list(feats)
        feats[self.in_index] = self.diffusion(feats[self.in_index])
        return tuple(feats)
