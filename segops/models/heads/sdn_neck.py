"""SDN neck (Tan et al., "Semantic Diffusion Network for Semantic Segmentation", NeurIPS 2022),
single-scale form (as plugged between an FCN's encoder and decoder).

No official code exists; this follows the paper description (see SPEC §2.4): the top backbone
feature U is diffused by `segops.nn.SemanticDiffusion` (semantic difference convolution with a
guidance V, BN, ReLU, then a 1x1 conv over [U; Y] back to U's channels), with the guidance of
the single-scale use being a stride-2 3x3 conv of U (the layer's `single_scale=True` mode;
projected and resized back to U's grid inside the layer). Every other backbone output passes through unchanged, so any mmseg-style
decode head can sit on top. Parity with the authors' model is unverified.
"""
from __future__ import annotations

from torch import nn

from segops.models.heads._layers import nn_layer


class SDNNeck(nn.Module):
    """`diffusion` = `segops.nn.SemanticDiffusion(in_channels, guidance_channels,
    single_scale=True)` applied to `feats[in_index]`. `guidance_channels` defaults to
    in_channels // 4 (our choice; the paper gives no width for the single-scale guidance)."""

    def __init__(self, in_channels: int, guidance_channels: int | None = None, in_index: int = -1,
                 backend: str = "auto", **diffusion_kw) -> None:
        super().__init__()
        if guidance_channels is None:
            guidance_channels = max(in_channels // 4, 1)
        self.in_index = in_index
        self.diffusion = nn_layer("SemanticDiffusion")(in_channels, guidance_channels,
                                                       single_scale=True, backend=backend,
                                                       **diffusion_kw)

    def forward(self, feats):
        feats = list(feats)
        feats[self.in_index] = self.diffusion(feats[self.in_index])
        return tuple(feats)
