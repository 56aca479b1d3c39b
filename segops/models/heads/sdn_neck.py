"""SDN neck (Tan et al., "Semantic Diffusion Network for Semantic Segmentation", NeurIPS 2022),
single-scale form (as plugged between an FCN's encoder and decoder).

No official code exists; this follows the paper description (see SPEC §2.4): the top backbone
feature U is diffused by `segops.nn.SemanticDiffusion` (semantic difference convolution with a
guidance V, BN, ReLU, then a 1x1 conv over [U; Y] back to U's channels), with the guidance of
the single-scale use being a stride-2 3x3 ConvModule of U (projected and resized to U's grid
inside the layer). Every other backbone output passes through unchanged, so any mmseg-style
decode head can sit on top. Parity with the authors' model is unverified.
"""
from __future__ import annotations

from torch import nn

from segops.models.common import ConvModule
from segops.models.heads._layers import nn_layer


class SDNNeck(nn.Module):
    def __init__(self, in_channels: int, guidance_channels: int | None = None, in_index: int = -1,
                 norm="bn", backend: str = "auto", **diffusion_kw) -> None:
        super().__init__()
        guidance_channels = in_channels if guidance_channels is None else guidance_channels
        self.in_index = in_index
        self.guidance = ConvModule(in_channels, guidance_channels, 3, stride=2, padding=1,
                                   norm=norm)
        self.diffusion = nn_layer("SemanticDiffusion")(in_channels, guidance_channels,
                                                       backend=backend, **diffusion_kw)

    def forward(self, feats):
        feats = list(feats)
        u = feats[self.in_index]
        feats[self.in_index] = self.diffusion(u, self.guidance(u))
        return tuple(feats)
