"""SeMask's Mask2Former head with the MSFaPN pixel decoder (Picsart-AI-Research/SeMask-Segmentation
`SeMask-FAPN/SeMask-Mask2Former/mask2former/modeling/`: `meta_arch/branch_mask_former_head.py`
BranchMaskFormerHead, `pixel_decoder/msdeformattn_fapn.py` MSDeformAttnPixelFANDecoder,
`transformer_decoder/mask2former_transformer_decoder.py` MultiScaleMaskedTransformerDecoder).
Module names as the reference (detectron2 `Conv2d` with a `norm` submodule: `NormConv2d`).

* Pixel decoder: the stride-8/16/32 features are projected (1x1 conv + GroupNorm(32)), refined by
  a 6-layer multi-scale deformable-attention encoder (sine position + level embeddings), and the
  stride-4 feature joins FPN-style: lateral 1x1 conv, the upsampled stride-8 output added, FaPN's
  feature alignment (a modulated deformable 3x3 conv whose offsets come from [lateral, 2 x
  top-down]; 8 deformable groups), a 3x3 output conv. `mask_features` is a 1x1 conv of the
  stride-4 output.
* Transformer decoder: 100 learned queries, 9 layers cycling over the stride-32/16/8 maps, each
  masked cross-attention (attention limited to the previous prediction's mask > 0.5, resized to
  the level) -> self-attention -> FFN (post-norm); class and mask predictions after every layer.
* Semantic head: the backbone's per-stage class maps, each upsampled to stride 4 and summed, then
  upsampled 4x (align_corners=True, as the reference).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.heads._deformable import (ModulatedDeformConv2d, MSDeformAttn,
                                             position_embedding_sine)


class NormConv2d(nn.Conv2d):
    """detectron2's `Conv2d`: a conv with an optional `norm` submodule and activation."""

    def __init__(self, *args, norm=None, activation=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return x if self.activation is None else self.activation(x)


class MSDeformAttnEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes) -> Tensor:
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src,
                                                            spatial_shapes)))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnEncoder(nn.Module):
    def __init__(self, layers: list) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    def __init__(self, d_model: int = 256, n_heads: int = 8, num_layers: int = 6,
                 d_ffn: int = 1024, dropout: float = 0.0, n_levels: int = 3,
                 n_points: int = 4) -> None:
        super().__init__()
        self.encoder = MSDeformAttnEncoder([
            MSDeformAttnEncoderLayer(d_model, d_ffn, n_levels, n_heads, n_points, dropout)
            for _ in range(num_layers)])
        self.level_embed = nn.Parameter(torch.randn(n_levels, d_model))

    def forward(self, srcs: list, pos_embeds: list) -> list:
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i]
                         for i, p in enumerate(pos_embeds)], 1)
        # Reference point of every token: its pixel centre, normalised, on every level.
        refs = []
        for h, w in shapes:
            ys, xs = torch.meshgrid(
                (torch.arange(h, dtype=src.dtype, device=src.device) + 0.5) / h,
                (torch.arange(w, dtype=src.dtype, device=src.device) + 0.5) / w, indexing="ij")
            refs.append(torch.stack((xs.flatten(), ys.flatten()), -1))
        ref = torch.cat(refs)[None, :, None].expand(src.shape[0], -1, len(shapes), -1)
        for layer in self.encoder.layers:
            src = layer(src, pos, ref, shapes)
        n = src.shape[0]
        return [t.transpose(1, 2).reshape(n, -1, h, w)
                for t, (h, w) in zip(src.split([h * w for h, w in shapes], 1), shapes)]


class FeatureAlign(nn.Module):
    """FaPN's feature alignment without the selection module: offsets from [lateral,
    2 x upsampled top-down] (1x1 conv + norm), a modulated deformable 3x3 conv of the top-down
    feature, ReLU, plus the lateral feature."""

    def __init__(self, channels: int, norm: nn.Module, deformable_groups: int = 8) -> None:
        super().__init__()
        self.offset = NormConv2d(2 * channels, channels, 1, bias=False, norm=norm)
        self.dcpack_L2 = ModulatedDeformConv2d(channels, channels, 3, 1, deformable_groups)

    def forward(self, lateral: Tensor, top_down: Tensor) -> Tensor:
        if top_down.shape[-2:] != lateral.shape[-2:]:
            top_down = F.interpolate(top_down, lateral.shape[-2:], mode="bilinear",
                                     align_corners=False)
        offset = self.offset(torch.cat([lateral, top_down * 2], dim=1))
        return F.relu(self.dcpack_L2(top_down, offset)) + lateral


class MSDeformAttnPixelFANDecoder(nn.Module):
    """in_channels: the stride-4, 8, 16, 32 feature widths (the last three go through the
    deformable encoder)."""

    def __init__(self, in_channels, conv_dim: int = 256, mask_dim: int = 256, n_heads: int = 8,
                 enc_layers: int = 6, enc_ffn: int = 1024, dropout: float = 0.0) -> None:
        super().__init__()
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, 1), nn.GroupNorm(32, conv_dim))
            for c in list(in_channels[1:])[::-1])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.transformer = MSDeformAttnTransformerEncoderOnly(
            conv_dim, n_heads, enc_layers, enc_ffn, dropout, n_levels=len(in_channels) - 1)
        self.conv_dim = conv_dim
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        self.adapter_1 = NormConv2d(in_channels[0], conv_dim, 1, bias=False,
                                    norm=nn.GroupNorm(32, conv_dim))
        output_norm = nn.GroupNorm(32, conv_dim)
        # As the reference, the alignment's offset conv shares the output conv's GroupNorm.
        self.align_1 = FeatureAlign(conv_dim, output_norm)
        self.layer_1 = NormConv2d(conv_dim, conv_dim, 3, padding=1, bias=False, norm=output_norm,
                                  activation=F.relu)

    def forward(self, features: list):
        """features: stride 4, 8, 16, 32 maps -> (mask features (stride 4), [stride-32, 16, 8
        maps] for the transformer decoder)."""
        coarse_first = list(features[1:])[::-1]
        srcs = [proj(x) for proj, x in zip(self.input_proj, coarse_first)]
        pos = [position_embedding_sine(x, self.conv_dim // 2) for x in coarse_first]
        outs = self.transformer(srcs, pos)
        lateral = self.adapter_1(features[0])
        top_down = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear",
                                           align_corners=False)
        finest = self.layer_1(self.align_1(lateral, top_down))
        return self.mask_features(finest), outs


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        q = tgt + query_pos
        return self.norm(tgt + self.self_attn(q, q, value=tgt, need_weights=False)[0])


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor, pos: Tensor,
                query_pos: Tensor) -> Tensor:
        out = self.multihead_attn(tgt + query_pos, memory + pos, value=memory,
                                  attn_mask=memory_mask, need_weights=False)[0]
        return self.norm(tgt + out)


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor) -> Tensor:
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MultiScaleMaskedTransformerDecoder(nn.Module):
    def __init__(self, num_classes: int, hidden_dim: int = 256, num_queries: int = 100,
                 nheads: int = 8, dim_feedforward: int = 2048, dec_layers: int = 9,
                 mask_dim: int = 256, num_feature_levels: int = 3) -> None:
        super().__init__()
        self.num_heads = nheads
        self.num_feature_levels = num_feature_levels
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers))
        for layer in self.modules():
            if isinstance(layer, (SelfAttentionLayer, CrossAttentionLayer, FFNLayer)):
                for p in layer.parameters():
                    if p.dim() > 1:
                        nn.init.xavier_uniform_(p)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, feats: list, mask_features: Tensor) -> dict:
        """feats: the pixel decoder's stride-32, 16, 8 maps (hidden_dim channels)."""
        src, pos, sizes = [], [], []
        for i in range(self.num_feature_levels):
            sizes.append(feats[i].shape[-2:])
            pos.append(position_embedding_sine(feats[i], feats[i].shape[1] // 2)
                       .flatten(2).permute(2, 0, 1))
            src.append((feats[i].flatten(2) + self.level_embed.weight[i][None, :, None])
                       .permute(2, 0, 1))
        bs = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        classes, masks = [], []
        cls, mask, attn_mask = self._predict(output, mask_features, sizes[0])
        classes.append(cls)
        masks.append(mask)
        for i, (cross, self_attn, ffn) in enumerate(zip(self.transformer_cross_attention_layers,
                                                        self.transformer_self_attention_layers,
                                                        self.transformer_ffn_layers)):
            level = i % self.num_feature_levels
            # A query whose mask covers nothing attends everywhere.
            attn_mask[attn_mask.all(-1)] = False
            output = cross(output, src[level], attn_mask, pos[level], query_embed)
            output = ffn(self_attn(output, query_embed))
            cls, mask, attn_mask = self._predict(output, mask_features,
                                                 sizes[(i + 1) % self.num_feature_levels])
            classes.append(cls)
            masks.append(mask)
        return {"pred_logits": classes[-1], "pred_masks": masks[-1],
                "aux_outputs": [{"pred_logits": c, "pred_masks": m}
                                for c, m in zip(classes[:-1], masks[:-1])]}

    def _predict(self, output: Tensor, mask_features: Tensor, attn_size):
        decoded = self.decoder_norm(output).transpose(0, 1)
        cls = self.class_embed(decoded)
        mask = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        attn = F.interpolate(mask, size=attn_size, mode="bilinear", align_corners=False)
        attn = attn.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1)
        return cls, mask, (attn < 0.5).detach()


class SemanticPriorHead(nn.Module):
    """The reference's parameter-free `SemanticHead`."""

    def __init__(self, feature_strides=(4, 8, 16, 32)) -> None:
        super().__init__()
        self.feature_strides = tuple(feature_strides)

    def forward(self, priors: list) -> Tensor:
        out = priors[0]
        for stride, prior in zip(self.feature_strides[1:], priors[1:]):
            for _ in range(int(math.log2(stride // self.feature_strides[0]))):
                prior = F.interpolate(prior, scale_factor=2, mode="bilinear", align_corners=True)
            out = out + F.interpolate(prior, size=out.shape[2:], mode="bilinear",
                                      align_corners=True)
        return F.interpolate(out, size=[4 * s for s in out.shape[2:]], mode="bilinear",
                             align_corners=True)


class BranchMaskFormerHead(nn.Module):
    def __init__(self, in_channels, num_classes: int, conv_dim: int = 256,
                 mask_dim: int = 256) -> None:
        super().__init__()
        self.sem_head = SemanticPriorHead()
        self.pixel_decoder = MSDeformAttnPixelFANDecoder(in_channels, conv_dim, mask_dim)
        self.predictor = MultiScaleMaskedTransformerDecoder(num_classes, conv_dim,
                                                            mask_dim=mask_dim)

    def forward(self, features: list, priors: list):
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.predictor(multi_scale, mask_features), self.sem_head(priors)
