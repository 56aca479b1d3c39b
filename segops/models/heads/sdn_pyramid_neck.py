"""SDN necks (Tan et al., "Semantic Diffusion Network for Semantic Segmentation", NeurIPS 2022)
built on `segops.nn.SemanticDiffusion` (SPEC §2.4). No official code exists; parity with the
authors' model is unverified.

`SDNPyramidNeck` (multi-scale, on Semantic FPN): level i of the pyramid is diffused with level
i+1 as guidance (projected and resized inside the layer); the coarsest level passes unchanged.
The single-scale neck is `segops.models.heads.sdn_neck.SDNNeck`.
"""
from __future__ import annotations

from torch import nn

from segops.models.heads._layers import nn_layer


class SDNPyramidNeck(nn.Module):
    def __init__(self, channels: int, num_levels: int, backend: str = "auto", **kw) -> None:
        super().__init__()
        cls = nn_layer("SemanticDiffusion")
        self.diffusions = nn.ModuleList([cls(channels, channels, backend=backend, **kw)
                                         for _ in range(num_levels - 1)])

    def forward(self, feats):
        feats = list(feats)
        out = [sd(feats[i], feats[i + 1]) for i, sd in enumerate(self.diffusions)]
        return tuple(out + feats[len(self.diffusions):])
