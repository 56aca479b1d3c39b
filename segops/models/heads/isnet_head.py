"""ISNet head (Jin et al., "ISNet: Integrate Image-Level and Semantic-Level Context for Semantic
Segmentation", ICCV 2021), following the author's sssegmentation
(`ssseg/modules/models/segmentors/isnet/{isnet,imagelevel,semanticlevel}.py`,
`configs/isnet/base_cfg.py`): 3x3 `bottleneck` 2048 -> 512; image-level context (`ilc_net`: the
features attend to [global average; features]); a first prediction (`decoder_stage1`); semantic-
level context (`slc_net`: each pixel attends to the class centres of the first prediction's
argmax regions, each centre the softmax-of-logits weighted mean of its region's features);
`conv_seg` on the fused context. Both `correlate_net`s are `segops.nn.SelfAttentionBlock`
(sssegmentation's SelfAttentionBlock: two-conv query/key projections, normed value and output
projections), so the disentangled_non_local operator serves them. Submodule names follow
sssegmentation where they map; its conv-BN-ReLU Sequentials are ConvModules here.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segops.models.common import BaseDecodeHead, resize
from segops.nn import ConvModule, SelfAttentionBlock


def _correlate_net(key_in_channels: int, channels: int, transform_channels: int, norm, act):
    return SelfAttentionBlock(key_in_channels, channels, transform_channels, channels,
                              key_query_num_convs=2, value_out_norm=True, norm=norm, act=act)


def class_centres_per_pixel(feats: Tensor, logits: Tensor) -> Tensor:
    """sssegmentation's semantic-level gathering: pixels are grouped by the argmax class; a
    group's centre is sum softmax(logit of that class over the group) * feature; each pixel gets
    its group's centre. (N, C, H, W), (N, K, H, W) -> (N, C, H, W)."""
    n, c, h, w = feats.shape
    k = logits.shape[1]
    flat_logits = logits.reshape(n, k, h * w)
    label = flat_logits.argmax(dim=1)  # (N, L)
    member = nn.functional.one_hot(label, k).transpose(1, 2).bool()  # (N, K, L)
    masked = flat_logits.masked_fill(~member, float("-inf"))
    weights = torch.softmax(masked, dim=-1).nan_to_num(0.0)  # classes without pixels: zeros
    centres = torch.bmm(weights, feats.reshape(n, c, h * w).transpose(1, 2))  # (N, K, C)
    per_pixel = centres.gather(1, label.unsqueeze(-1).expand(n, h * w, c))  # (N, L, C)
    return per_pixel.transpose(1, 2).reshape(n, c, h, w)


class ImageLevelContext(nn.Module):
    def __init__(self, channels: int, transform_channels: int, norm="bn", act="relu",
                 align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.correlate_net = _correlate_net(2 * channels, channels, transform_channels, norm, act)
        self.bottleneck = ConvModule(2 * channels, channels, 3, padding=1, norm=norm, act=act)

    def forward(self, x: Tensor) -> Tensor:
        x_global = resize(self.global_avgpool(x), x.shape[2:], self.align_corners)
        context = self.correlate_net(x, torch.cat([x_global, x], dim=1))
        return self.bottleneck(torch.cat([x, context], dim=1))


class SemanticLevelContext(nn.Module):
    def __init__(self, channels: int, transform_channels: int, norm="bn", act="relu") -> None:
        super().__init__()
        self.correlate_net = _correlate_net(channels, channels, transform_channels, norm, act)
        self.bottleneck = ConvModule(2 * channels, channels, 3, padding=1, norm=norm, act=act)

    def forward(self, x: Tensor, logits: Tensor, image_context: Tensor) -> Tensor:
        context = self.correlate_net(x, class_centres_per_pixel(x, logits))
        return self.bottleneck(torch.cat([image_context, context], dim=1))


class ISNetHead(BaseDecodeHead):
    """In training mode `forward` returns (final logits, stage-1 logits); sssegmentation
    supervises the stage-1 prediction with weight 0.4."""

    def __init__(self, in_channels, channels: int, num_classes: int, *,
                 transform_channels: int = 256, **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        conv = dict(norm=self.norm, act=self.act)
        self.bottleneck = ConvModule(self.in_channels, channels, 3, padding=1, **conv)
        self.ilc_net = ImageLevelContext(channels, transform_channels, align_corners=self.align_corners,
                                         **conv)
        self.slc_net = SemanticLevelContext(channels, transform_channels, **conv)
        self.decoder_stage1 = nn.Sequential(ConvModule(channels, channels, 1, **conv),
                                            nn.Dropout2d(self.dropout.p if self.dropout else 0.0),
                                            nn.Conv2d(channels, num_classes, 1))

    def forward(self, inputs):
        feats = self.bottleneck(self._transform_inputs(inputs))
        image_context = self.ilc_net(feats)
        stage1 = self.decoder_stage1(feats)
        out = self.cls_seg(self.slc_net(feats, stage1, image_context))
        return (out, stage1) if self.training else out
