"""Context heads with no public code, built from their papers (the structure where a paper
leaves details open is ours, and each class says which parts those are). All sit on the
ResNet-D8 dilated backbones of `dilated_fcn` with a 3x3 `in_conv` from 2048 to 512 channels
(R18: 512 to 128), a classifier `conv_seg`, and mmseg's auxiliary FCN head.

- ACFNet (Zhang et al., ICCV 2019): attentional class features.
- HMANet (Niu et al., TGRS 2021): class-augmented attention + region shuffle attention.
- RecoNet (Chen et al., ECCV 2020): tensor generation and low-rank reconstruction.
- OrdNet (Huang et al., TIP 2020): middle-range patch attention + reweighted long-range.
- GPSNet (Geng et al., TIP 2021): gated path selection over dense dilated convolutions.

Class attention maps onto the non-local operator: gathering class centres
`c_k = sum_j softmax_j(z_kj) f_j` from coarse logits z is `disentangled_non_local` with one-hot
queries (query k = e_k, keys z_j: <e_k, z_j> = z_kj), and distributing them back
`f_i = sum_k softmax_k(z_ik) c_k` is the same operator with the logits as queries and one-hot
keys; both run fused (`class_centres`, `class_context`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segops.models.common import BaseDecodeHead
from segops.models.heads.aspp_head import ASPPHead
from segops.nn import ConvModule, InterlacedSparseAttention, NonLocal2d, SelfAttentionBlock
from segops.nn.interlaced_sparse_attention import ISASelfAttentionBlock, interlaced_relations
from segops.ops.disentangled_non_local import disentangled_non_local


def _one_hot_grid(logits: Tensor) -> Tensor:
    """(N, K, K, 1): position k holds the one-hot vector e_k."""
    n, k = logits.shape[:2]
    return torch.eye(k, dtype=logits.dtype, device=logits.device).expand(n, k, k)[..., None]


def class_centres(logits: Tensor, feats: Tensor, backend: str = "auto") -> Tensor:
    """(N, K, H, W) logits, (N, C, H, W) features -> (N, C, K, 1) centres, each the
    softmax-over-positions weighted mean of the features (OCR's spatial gather)."""
    return disentangled_non_local(_one_hot_grid(logits), logits, feats, whiten=False, scale=1.0,
                                  backend=backend)


def class_context(logits: Tensor, centres: Tensor, backend: str = "auto") -> Tensor:
    """Per position, the centres weighted by the softmax over classes of its logits."""
    return disentangled_non_local(logits, _one_hot_grid(logits), centres, whiten=False,
                                  scale=1.0, backend=backend)


class _CoarseFineHead(BaseDecodeHead):
    """A head with a supervised coarse prediction `coarse_seg` (1x1 conv): in training mode
    `forward` returns (final logits, coarse logits)."""

    def _outputs(self, final: Tensor, coarse: Tensor):
        return (final, coarse) if self.training else final

    def _coarse(self, feat: Tensor) -> Tensor:
        return self.coarse_seg(self.dropout(feat) if self.dropout is not None else feat)


class ACFHead(ASPPHead, _CoarseFineHead):
    """ACFNet: mmseg's ASPP (as DeepLabV3) gives the features and, through `coarse_seg`, a
    coarse prediction; the attentional class feature module reduces the features (`acf_reduce`,
    1x1 to `acf_channels`), gathers class centres with the coarse logits (`class_centres`) and
    gives each pixel the centres weighted by its class probabilities (`class_context`);
    `fuse` (3x3) over [ASPP features; class features], classifier. The reduce width and the
    3x3 fuse are our choices (the paper gives no widths)."""

    def __init__(self, in_channels, channels: int, num_classes: int, *, acf_channels: int = 256,
                 **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.coarse_seg = nn.Conv2d(channels, num_classes, 1)
        self.acf_reduce = ConvModule(channels, acf_channels, 1, norm=self.norm, act=self.act)
        self.fuse = ConvModule(channels + acf_channels, channels, 3, padding=1, norm=self.norm,
                               act=self.act)
        self.backend = "auto"

    def forward(self, inputs):
        feat = self._aspp(self._transform_inputs(inputs))
        coarse = self._coarse(feat)
        reduced = self.acf_reduce(feat)
        context = class_context(coarse, class_centres(coarse, reduced, self.backend),
                                self.backend)
        return self._outputs(self.cls_seg(self.fuse(torch.cat([feat, context], 1))), coarse)


class HMAHead(_CoarseFineHead):
    """HMANet: `in_conv`, then two attentions fused by a 1x1 `fuse` over [x; class; region]:
    class-augmented attention (a coarse prediction, its class centres, and pixel-to-centre
    attention `class_attention`, a SelfAttentionBlock with OCR's projections) and region
    shuffle attention (`region_attention`: attention across the regions, then within each
    8 x 8 region, i.e. `segops.nn.InterlacedSparseAttention`). The paper's class channel
    attention is left out; widths are ours."""

    def __init__(self, in_channels, channels: int, num_classes: int, *,
                 key_channels: int = 256, region_size=(8, 8), **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        conv = dict(norm=self.norm, act=self.act)
        self.in_conv = ConvModule(self.in_channels, channels, 3, padding=1, **conv)
        self.coarse_seg = nn.Conv2d(channels, num_classes, 1)
        self.class_attention = SelfAttentionBlock(channels, channels, key_channels, channels,
                                                  key_query_num_convs=2, value_out_norm=True,
                                                  **conv)
        self.region_attention = InterlacedSparseAttention(channels, key_channels, region_size,
                                                          **conv)
        self.fuse = ConvModule(3 * channels, channels, 1, **conv)

    def forward(self, inputs):
        x = self.in_conv(self._transform_inputs(inputs))
        coarse = self._coarse(x)
        centres = class_centres(coarse, x, self.class_attention.backend)
        classes = self.class_attention(x, centres)
        regions = self.region_attention(x)
        return self._outputs(self.cls_seg(self.fuse(torch.cat([x, classes, regions], 1))),
                             coarse)


class _ContextHead(BaseDecodeHead):
    """`in_conv` (3x3) -> `context(x)` -> `fuse` over [x; context] -> classifier."""

    def __init__(self, in_channels, channels: int, num_classes: int, fuse_kernel: int = 3,
                 **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        conv = dict(norm=self.norm, act=self.act)
        self.in_conv = ConvModule(self.in_channels, channels, 3, padding=1, **conv)
        self.fuse = ConvModule(2 * channels, channels, fuse_kernel, padding=fuse_kernel // 2,
                               **conv)

    def context(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, inputs):
        x = self.in_conv(self._transform_inputs(inputs))
        return self.cls_seg(self.fuse(torch.cat([x, self.context(x)], 1)))


class OrdHead(_ContextHead):
    """OrdNet: short range from the convolutions; middle range: attention inside `patch_size`
    patches (`middle_range`, the interlaced attention operator's short mode, zero-padded as
    ISA); reweighted long range: a non-local block (`long_range`, `segops.nn.NonLocal2d`) whose
    context is scaled per pixel by `reweight` (1x1 conv + sigmoid). The gate form and widths are
    ours."""

    def __init__(self, in_channels, channels: int, num_classes: int, *,
                 key_channels: int = 256, patch_size=(8, 8), **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.middle_range = ISASelfAttentionBlock(channels, key_channels, patch_size, "short",
                                                  norm=self.norm, act=self.act)
        self.long_range = NonLocal2d(channels, reduction=2, use_scale=True, norm_cfg=self.norm)
        self.reweight = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def context(self, x: Tensor) -> Tensor:
        middle = interlaced_relations(x, self.middle_range)
        long = self.long_range(middle) - middle
        return middle + self.reweight(x) * long


class RecoHead(_ContextHead):
    """RecoNet: the tensor generation module makes `rank` rank-1 attention tensors from sigmoid
    vectors along C (global average, 1x1 conv per rank: `channel_generator`), H and W (average
    over the other spatial side, 1x1 conv to `rank` maps: `height_generator`,
    `width_generator`); the reconstruction module sums them, weighted by learnable `lambdas`,
    into a C x H x W attention that multiplies the features; 1x1 `fuse`. The paper's H/W
    generators convolve over a fixed spatial size; ours pool over the other side and project
    channels, so any input size works."""

    def __init__(self, in_channels, channels: int, num_classes: int, *, rank: int = 64,
                 **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, fuse_kernel=1, **kwargs)
        self.rank = rank
        self.channel_generator = nn.Conv2d(channels, rank * channels, 1)
        self.height_generator = nn.Conv2d(channels, rank, 1)
        self.width_generator = nn.Conv2d(channels, rank, 1)
        self.lambdas = nn.Parameter(torch.full((rank,), 1.0 / rank))

    def context(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        ch = torch.sigmoid(self.channel_generator(x.mean((2, 3), keepdim=True))).view(n, -1, c)
        hv = torch.sigmoid(self.height_generator(x.mean(3, keepdim=True)))[..., 0]  # (N, r, H)
        wv = torch.sigmoid(self.width_generator(x.mean(2, keepdim=True)))[:, :, 0]  # (N, r, W)
        attention = torch.einsum("r,nrc,nrh,nrw->nchw", self.lambdas, ch, hv, wv)
        return x * attention


class GPSHead(_ContextHead):
    """GPSNet: a densely connected stack of dilated 3x3 convs (`paths`, rates `dilations`,
    `growth` channels each, each seeing the input and all previous paths) whose outputs are
    scaled by image-dependent gates (`gate`: global average -> linear -> sigmoid, one gate per
    path) and fused back to `channels` (`path_fuse`, 1x1); then [x; paths] -> 3x3 `fuse`. Rates,
    growth and the gate form are ours (the paper's dynamic path selection, simplified)."""

    def __init__(self, in_channels, channels: int, num_classes: int, *,
                 dilations=(1, 2, 4, 8, 12, 16), growth: int = 128, **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        conv = dict(norm=self.norm, act=self.act)
        self.paths = nn.ModuleList(
            ConvModule(channels + i * growth, growth, 3, padding=d, dilation=d, **conv)
            for i, d in enumerate(dilations))
        self.gate = nn.Linear(channels, len(dilations))
        self.path_fuse = ConvModule(channels + len(dilations) * growth, channels, 1, **conv)

    def context(self, x: Tensor) -> Tensor:
        gates = torch.sigmoid(self.gate(x.mean((2, 3))))
        feats = [x]
        for i, path in enumerate(self.paths):
            feats.append(path(torch.cat(feats, 1)) * gates[:, i, None, None, None])
        return self.path_fuse(torch.cat(feats, 1))
