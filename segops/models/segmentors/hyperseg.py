"""`hyperseg-m`, `hyperseg-s`: HyperSeg (Nirkin et al., "HyperSeg: Patch-wise
Hypernetwork for Real-time Semantic Segmentation", CVPR 2021) as YuvalNirkin/hyperseg builds
them, with its module names; encoders in `backbones/efficientnet_hyperseg.py`. `hyperseg-l`
is the repository's earlier design (`hyperseg_v0_1.py`, which its VOC config builds): see
`hyperseg_v0.py`, which reuses the patch-wise convolution and the decoder loop below.

- `hyperseg-m` (Cityscapes, 19 classes, EfficientNet-B1): `hyperseg/models/hyperseg_v1_0.py`
  with `configs/train/cityscapes_efficientnet_b1_hyperseg-m.py`: weight mapper with 2 levels,
  feature scales (1, 0.25, 0.25, 0.25, 0.25), decoder kernel sizes (1, 1, 1, 3, 3), level
  widths (64, 32, 16, 16, 16), expansion 2, weight groups (32, 16, 8, 16, 4).
- `hyperseg-s` (Cityscapes, EfficientNet-B1): `models/hyperseg_v1_0_unify.py` with
  `configs/train/cityscapes_efficientnet_b1_hyperseg-s.py`: feature scales
  (1, 0.166, 0.2, 0.25, 0.4), level widths (32, 16, 8, 8, 8), one weight layer shared by
  levels 4 and 5 (`unify_level=4`).

The encoder's last feature goes through the weight mapper ("context head", a small U-Net) to a
signal at 1/32 of the input; 1x1 grouped convs (`signal2weights`) turn slices of it into the
weights of every decoder layer, one set per signal pixel, i.e. per image patch (-s:
consecutive slices; -m: every slice starts at the signal's first channel, as v1_0 builds it).
Each decoder level concatenates the image coordinates, the encoder feature of its resolution
and the upsampled previous level, and applies its layer patch by patch (a 1x1 conv-BN-ReLU, or
an inverted residual block: 1x1, depthwise 3x3 over the patch with a 1-pixel reflected border,
1x1, BN and ReLU6). Loss: bootstrapped cross-entropy (the configs'
BootstrappedCrossEntropyLoss, declared as OHEM cross-entropy).

The decoder holds the reference's cached image-coordinate grids as buffers under its names
(`decoder.coord<h>_<w>`, one per level for each of the config's `coords_res` sizes: -m
512 x 512 and 512 x 1024, -s 768 x 768 and 768 x 1536), so official -m / -s checkpoints load
strictly (`segops.models.checkpoints.HYPERSEG_OFFICIAL` renames the decoder's 1x1 levels, which
the reference nests one `MetaSequential` deeper). The forward computes the same grids in the
input's dtype rather than reading the cache.

Differences from the reference: when a level's size is not a multiple of the patch grid the
feature is padded by replication to the next multiple and the output cropped (the reference
requires multiples), the weight mapper's x2 upsampling is to the exact skip size and a map
smaller than its 2x2 down-convolution is first padded by replication.
"""
from __future__ import annotations

import math
from itertools import groupby

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.backbones.efficientnet_hyperseg import EfficientNetHyperSeg
from segops.models.common import resize
from segops.models.loss_terms import LossTerm
from segops.models.registry import register_model


def divide_feature(in_feature: int, out_features, min_unit: int):
    """How the reference splits the signal's channels between the weight layers: in units of
    `min_unit`, roughly proportional to each layer's weight count, equal counts getting equal
    shares, the largest groups served first and the last group taking the remainder."""
    units = in_feature // min_unit
    order = sorted(range(len(out_features)), key=lambda i: out_features[i])
    groups = [(value, [i for i in members]) for value, members in
              groupby(order, key=lambda i: out_features[i])]
    groups.sort(key=lambda g: g[0] * len(g[1]), reverse=True)
    ratio = units / sum(out_features)
    shares = [float(len(members)) for _, members in groups]
    remaining = units - sum(shares)
    for i, (value, members) in enumerate(groups):
        n = len(members)
        if i < len(groups) - 1:
            extra = max(value * n * ratio, n) // n * n - n
            extra = min(extra, remaining)
            shares[i] += extra
            remaining -= extra
            if remaining == 0:
                break
        else:
            shares[-1] += remaining
    out = [0] * len(out_features)
    for share, (_, members) in zip(shares, groups):
        for i in members:
            out[i] = int(share // len(members) * min_unit)
    return out


class SignalToWeights:
    """`signal2weights`: a grouped 1x1 conv from a slice of the signal to `params` weights per
    pixel (rounded up to a multiple of the groups, the excess dropped)."""

    params: int

    def init_signal(self, channels: int, start: int, groups: int) -> None:
        self.start, self.channels = start, channels
        self.signal2weights = nn.Conv2d(channels, math.ceil(self.params / groups) * groups, 1,
                                        bias=False, groups=groups)

    def weights(self, signal: Tensor) -> Tensor:
        s = signal[:, self.start:self.start + self.channels]
        return self.signal2weights(s)[:, :self.params]


class WeightLayer(SignalToWeights, nn.Module):
    """The weights of several decoder layers at once (the unify version's `weight_blocks`)."""

    def __init__(self, params: int) -> None:
        super().__init__()
        self.params = params


def _patches(x: Tensor, grid, border: int):
    """x (N, C, H, W) cut into grid (fh, fw) patches, each with `border` reflected pixels
    around it: (N * fh * fw, C, ph + 2b, pw + 2b), plus (ph, pw) and the padded size."""
    (fh, fw), (n, c, h, w) = grid, x.shape
    ph, pw = math.ceil(h / fh), math.ceil(w / fw)
    if (ph * fh, pw * fw) != (h, w):
        x = F.pad(x, (0, pw * fw - w, 0, ph * fh - h), mode="replicate")
    if border:
        x = F.pad(x, (border,) * 4, mode="reflect")
    kh, kw = ph + 2 * border, pw + 2 * border
    cols = F.unfold(x, (kh, kw), stride=(ph, pw))  # (N, C*kh*kw, fh*fw)
    return cols.transpose(1, 2).reshape(n * fh * fw, c, kh, kw), (ph, pw)


def _unpatch(y: Tensor, n: int, grid, size) -> Tensor:
    """Inverse of `_patches` (borders consumed): (N * fh * fw, C, ph, pw) -> (N, C, H, W)."""
    (fh, fw), (ph, pw) = grid, y.shape[2:]
    y = y.reshape(n, fh, fw, -1, ph, pw).permute(0, 3, 1, 4, 2, 5)
    return y.reshape(n, -1, fh * ph, fw * pw)[:, :, :size[0], :size[1]]


def _patch_conv(x: Tensor, weights: Tensor, cout: int, k: int = 1,
                depthwise: bool = False) -> Tensor:
    """Each patch (batch entry of x) convolved with its own weights (rows of `weights`)."""
    p, c = x.shape[:2]
    shape = (p * cout, 1, k, k) if depthwise else (p * cout, c, k, k)
    y = F.conv2d(x.reshape(1, p * c, *x.shape[2:]), weights.reshape(shape),
                 groups=p * cout if depthwise else p)
    return y.reshape(p, cout, *y.shape[2:])


def patchwise_conv(x: Tensor, weights: Tensor, cout: int, kernel: int = 1,
                   depthwise: bool = False) -> Tensor:
    """x convolved patch by patch: `weights` (N, P, fh, fw) holds the P conv weights of each
    patch of an fh x fw grid over x; a k x k kernel also reads k // 2 pixels of the neighbouring
    patches (reflected at the image border), the output keeps x's size."""
    n, grid = x.shape[0], weights.shape[2:]
    patches, _ = _patches(x, grid, kernel // 2)
    w = weights.permute(0, 2, 3, 1).reshape(n * grid[0] * grid[1], -1)
    return _unpatch(_patch_conv(patches, w, cout, kernel, depthwise), n, grid, x.shape[2:])


class HyperPatchConv(SignalToWeights, nn.Module):
    """Patch-wise 1x1 conv (the reference's HyperPatchNoPadding with kernel 1)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.cin, self.cout = cin, cout
        self.params = cin * cout

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        return patchwise_conv(x, weights, self.cout)


class HyperPatchInvertedResidual(SignalToWeights, nn.Module):
    """Patch-wise inverted residual: 1x1 to in*expand, BN, ReLU6, depthwise k x k (valid, over a
    patch with a 1-pixel reflected border), BN, ReLU6, 1x1 to out, BN; residual when shapes
    match. BN statistics are those of the bordered patches, as in the reference."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, expand: int = 2) -> None:
        super().__init__()
        self.cin, self.cout, self.k = cin, cout, kernel
        self.hidden = int(round(cin * expand))
        self.ranges = [0, cin * self.hidden, cin * self.hidden + self.hidden * kernel * kernel]
        self.params = self.ranges[-1] + self.hidden * cout
        self.bn1 = nn.BatchNorm2d(self.hidden)
        self.bn2 = nn.BatchNorm2d(self.hidden)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        n, grid = x.shape[0], weights.shape[2:]
        patches, _ = _patches(x, grid, 1)
        w = weights.permute(0, 2, 3, 1).reshape(-1, self.params)
        a, b = self.ranges[1:]
        y = F.relu6(self.bn1(_patch_conv(patches, w[:, :a], self.hidden)))
        y = F.relu6(self.bn2(_patch_conv(y, w[:, a:b], self.hidden, self.k, depthwise=True)))
        y = self.bn3(_patch_conv(y, w[:, b:], self.cout))
        y = _unpatch(y, n, grid, x.shape[2:])
        return x + y if self.cin == self.cout else y


def at_least_2x2(x: Tensor) -> Tensor:
    """x padded by replication to 2 x 2 where smaller, for a 2x2 stride-2 conv (tiny inputs)."""
    h, w = x.shape[2:]
    if h < 2 or w < 2:
        x = F.pad(x, (0, max(0, 2 - w), 0, max(0, 2 - h)), mode="replicate")
    return x


class WeightMapper(nn.Module):
    """The reference's context head: 1x1 conv-BN-ReLU to half width, `levels - 1` stride-2 2x2
    convs down, the coarsest feature replaced by its global average, back up through 1x1
    conv-BN-ReLU over [skip ; upsampled], output [finest skip ; upsampled] (full width)."""

    def __init__(self, channels: int, levels: int = 2) -> None:
        super().__init__()
        half = channels // 2

        def cbr(cin, cout, k=1, s=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, s, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))
        self.in_conv = cbr(channels, half)
        self.down_blocks = nn.ModuleList(cbr(half, half, 2, 2) for _ in range(levels - 1))
        self.up_blocks = nn.ModuleList(cbr(channels, half) for _ in range(levels - 1))

    def forward(self, x: Tensor) -> Tensor:
        feats = [self.in_conv(x)]
        for down in self.down_blocks:
            feats.append(down(at_least_2x2(feats[-1])))
        x = F.adaptive_avg_pool2d(feats[-1], 1).expand_as(feats[-1])
        for up in reversed(self.up_blocks):
            x = up(torch.cat([feats.pop(), x], dim=1))
            x = resize(x, feats[-1].shape[2:], mode="nearest")
        return torch.cat([feats.pop(), x], dim=1)


def coordinate_grid(h: int, w: int, device=None, dtype=None) -> Tensor:
    """(1, 2, h, w): x then y, each from -1 to 1 (the reference's image coordinates)."""
    ys = torch.linspace(-1, 1, h, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, w, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=0).unsqueeze(0)


def _coordinates(x: Tensor) -> Tensor:
    n, _, h, w = x.shape
    return coordinate_grid(h, w, x.device, x.dtype).expand(n, -1, -1, -1)


def run_decoder(levels, img: Tensor, feats, weights, training: bool):
    """The decoder levels, coarsest first, each given its weights: a level reads the image
    coordinates, the encoder feature of its resolution (`feats` finest first, the image below
    them) and the previous level upsampled to it. The output at the image size (in training
    `{"out", "aux": []}`)."""
    p = None
    for level, feat, w in zip(levels, reversed([img] + list(feats)), weights):
        p = feat if p is None else torch.cat([feat, resize(p, feat.shape[2:])], dim=1)
        p = level(torch.cat([_coordinates(p), p], dim=1), w)
    out = resize(p, img.shape[2:])
    return {"out": out, "aux": []} if training else out


class HyperSeg(nn.Module):
    """`unify_level=None`: one weight layer per decoder layer (v1_0; keys
    `decoder.level_<l>.0.signal2weights`); otherwise levels >= unify_level share one weight
    layer (the unify version; keys `decoder.level_blocks.<l>`, `decoder.weight_blocks.<i>`)."""

    def __init__(self, num_classes: int = 19, variant: str = "b1", levels: int = 2,
                 out_feat_scale=0.25, kernel_sizes=(1, 1, 1, 3, 3),
                 level_channels=(64, 32, 16, 16, 16),
                 expand_ratio: int = 2, weight_groups=(32, 16, 8, 16, 4), unify_level=None,
                 loss: str = "ohem_cross_entropy", coords_res=()) -> None:
        super().__init__()
        self.loss_terms = [LossTerm("out", loss)]
        self.backbone = EfficientNetHyperSeg(variant, out_feat_scale)
        signal = self.backbone.feat_channels[-1]
        # level inputs, coarsest first; the image itself is the finest
        feats = ([3] + self.backbone.feat_channels[:-1])[::-1]
        self.decoder = nn.Module()
        self.unify_level = unify_level
        layers, prev = [], 0
        for level, (k, width) in enumerate(zip(kernel_sizes, level_channels)):
            prev += feats[level]
            cout = num_classes if level == len(level_channels) - 1 else width
            layers.append(HyperPatchInvertedResidual(prev + 2, cout, k, expand_ratio) if k > 1
                          else HyperPatchConv(prev + 2, cout))
            prev = cout
        decoder_levels = [_Level(layer) for layer in layers]
        if unify_level is None:
            for level, block in enumerate(decoder_levels):
                self.decoder.add_module(f"level_{level}", block)
            weight_layers = layers
        else:
            self.decoder.level_blocks = nn.ModuleList(decoder_levels)
            shared = sum(layer.params for layer in layers[unify_level - 1:])
            weight_layers = [WeightLayer(layer.params) for layer in layers[:unify_level - 1]]
            weight_layers.append(WeightLayer(shared))
            self.decoder.weight_blocks = nn.ModuleList(weight_layers)
        shares = divide_feature(signal, [w.params for w in weight_layers], max(weight_groups))
        start = 0
        for layer, share, groups in zip(weight_layers, shares, weight_groups):
            layer.init_signal(share, start, groups)
            # v1_0's init_signal2weights hands the signal index down its recursion by value, so
            # each level there (a child one level deeper) reads the signal from channel 0; the
            # unify version's weight layers are siblings and take consecutive slices
            if unify_level is not None:
                start += share
        for h, w in coords_res:  # the reference's MultiScaleDecoder cache, level by level
            for level in range(len(layers)):
                size = (h // 2 ** level, w // 2 ** level)
                self.decoder.register_buffer("coord{}_{}".format(*size), coordinate_grid(*size))
        self.decoder_levels = decoder_levels
        self.layers = layers
        self.weight_layers = weight_layers
        self.weight_mapper = WeightMapper(signal, levels)

    def _level_weights(self, signal: Tensor) -> list:
        if self.unify_level is None:
            return [w.weights(signal) for w in self.weight_layers]
        u = self.unify_level - 1
        own = [w.weights(signal) for w in self.weight_layers[:u]]
        shared = self.weight_layers[u].weights(signal)
        return own + list(torch.split(shared, [layer.params for layer in self.layers[u:]], dim=1))

    def forward(self, img: Tensor):
        *feats, last = self.backbone(img)
        weights = self._level_weights(self.weight_mapper(last))
        return run_decoder(self.decoder_levels, img, feats, weights, self.training)


class _Level(nn.Module):
    """One decoder level: `0` the hyper layer, `1` the BN following a patch-wise 1x1 conv (then
    ReLU); the reference nests these two in a `MetaSequential` at `0` (`level_<l>.0.0`,
    `level_<l>.0.1`)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.add_module("0", layer)
        if isinstance(layer, HyperPatchConv):
            self.add_module("1", nn.BatchNorm2d(layer.cout))

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        x = getattr(self, "0")(x, weights)
        return F.relu(getattr(self, "1")(x)) if hasattr(self, "1") else x


register_model("hyperseg-m", HyperSeg, out_feat_scale=(1.0, 0.25, 0.25, 0.25, 0.25),
               coords_res=((512, 512), (512, 1024)))
register_model("hyperseg-s", HyperSeg, out_feat_scale=(1.0, 0.166, 0.2, 0.25, 0.4),
               level_channels=(32, 16, 8, 8, 8), unify_level=4,
               coords_res=((768, 768), (768, 1536)))
