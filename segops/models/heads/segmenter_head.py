"""Segmenter mask transformer decoder (Strudel et al., ICCV 2021) as mmseg's
`SegmenterMaskTransformerHead`: patch tokens are projected (`dec_proj`), K learned class
embeddings (`cls_emb`) are appended, `num_layers` ViT encoder layers run on the joint sequence,
then masks = <l2-normalised patch_proj(patches), l2-normalised classes_proj(classes)>,
LayerNorm over classes (`mask_norm`). Keys as mmseg (1.x), which removes BaseDecodeHead's
`conv_seg` from this head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.backbones._transformer import ViTEncoderLayer, drop_path_rates
from segops.models.common import BaseDecodeHead


class SegmenterMaskTransformerHead(BaseDecodeHead):
    def __init__(self, in_channels: int, num_layers: int, num_heads: int, embed_dims: int,
                 mlp_ratio: int = 4, drop_path_rate: float = 0.1, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, qkv_bias: bool = True, init_std: float = 0.02,
                 **kwargs) -> None:
        super().__init__(in_channels=in_channels, **kwargs)
        dpr = drop_path_rates(drop_path_rate, num_layers)
        self.layers = nn.ModuleList([
            ViTEncoderLayer(embed_dims, num_heads, mlp_ratio * embed_dims, drop_rate,
                            attn_drop_rate, dpr[i], qkv_bias) for i in range(num_layers)])
        self.dec_proj = nn.Linear(in_channels, embed_dims)
        self.cls_emb = nn.Parameter(torch.randn(1, self.num_classes, embed_dims))
        self.patch_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        self.classes_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        self.decoder_norm = nn.LayerNorm(embed_dims)
        self.mask_norm = nn.LayerNorm(self.num_classes)
        del self.conv_seg  # unused: the masks are the logits
        nn.init.trunc_normal_(self.cls_emb, std=init_std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, inputs) -> Tensor:
        x = self._transform_inputs(inputs)
        b, c, h, w = x.shape
        x = self.dec_proj(x.flatten(2).transpose(1, 2))
        x = torch.cat([x, self.cls_emb.expand(b, -1, -1)], dim=1)
        for layer in self.layers:
            x = layer(x)
        x = self.decoder_norm(x)
        k = self.num_classes
        patches = self.patch_proj(x[:, :-k])
        classes = self.classes_proj(x[:, -k:])
        patches = F.normalize(patches, dim=2)
        classes = F.normalize(classes, dim=2)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))
        return masks.transpose(1, 2).reshape(b, k, h, w)
