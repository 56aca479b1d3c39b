"""`hyperseg-l`: HyperSeg-L (Nirkin et al., "HyperSeg: Patch-wise Hypernetwork for Real-time
Semantic Segmentation", CVPR 2021) as YuvalNirkin/hyperseg trains it on PASCAL VOC:
`configs/train/vocsbd_efficientnet_b3_hyperseg-l.py` builds `hyperseg/models/hyperseg_v0_1.py`
`hyperseg_efficientnet("efficientnet-b3", levels=3, kernel_sizes=(1, 1, 3, 3, 3, 3),
expand_ratio=2, with_out_fc=False, decoder_dropout=None, weight_groups=16)`, to which the
trainer passes the dataset's 21 classes: 39,680,458 parameters. The module names and
state_dict keys are the reference's, so its checkpoints load as they are.

- Encoder: EfficientNet-B3 (`backbones/efficientnet_hyperseg.py`), each resolution's last
  feature narrowed to a quarter of its width, (6, 8, 12, 34, 96) channels at 1/2 .. 1/32, and
  the 1536-channel head output at 1/32.
- Weight mapper (`weight_mapper`, the paper's context head) on the head output, at full width
  throughout: two 2x2 stride-2 conv-BN-ReLU steps down (`down_<i>`), the coarsest map replaced
  by its global average, then back up twice: x2 nearest upsampling, concatenation after the
  skip and a 1x1 conv-BN (`flat_<i>`; ReLU after `flat_1` only). Its output is cut into
  consecutive channel slices, one per decoder level, each turned into that level's weights by
  a 1x1 conv with 16 groups (`out_conv.conv_<i>`) whose output, the level's weight count
  rounded up to a multiple of 16, is cropped back to that count. The reference splits the
  channels with `divide_feature_legacy`; for weight counts that all differ, as -l's six do, it
  gives the split of v1_0's `divide_feature` used here (592, 272, 416, 96, 48, 112).
- Decoder (`decoder.level_<l>.0`): six levels, coarsest first, the last on the image itself,
  each given 2 coordinate channels, the encoder feature of its resolution and the previous
  level (see `hyperseg.run_decoder`), each as wide as its feature (the last: the classes).
  Kernel-1 levels: a patch-wise 1x1 conv, BN, ReLU. Kernel-3 levels: an inverted residual
  (`conv`: 1x1 to twice the input width, depthwise 3x3, 1x1 to the output, each followed by BN,
  the first two by ReLU6) in which, unlike v1_0's, each of the three convolutions cuts the map
  into the weight grid's patches on its own, the 3x3 one reading a pixel of the neighbouring
  patches (reflected at the image border). The patch-wise convolutions have no parameters: one
  set of weights per patch comes from the weight mapper.
- Loss: the trainer's default `nn.CrossEntropyLoss(ignore_index=255)`.

Differences from the reference: where a level's size is not a multiple of the patch grid, the
map is padded by replication to the next multiple and the output cropped (the reference rounds
the patch size down, and then fails or leaves the pixels past the last whole patch at zero);
the weight mapper's x2 upsampling is to the exact skip size and a map smaller than a 2x2
down-convolution is first padded by replication (the reference needs the 1/32 map's sides to
be multiples of 4). The config's `inference_hflip=True` applies in the reference to
image-pyramid (list) inputs only, never to a tensor input, so it has no counterpart here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.backbones.efficientnet_hyperseg import EfficientNetHyperSeg
from segops.models.common import resize
from segops.models.loss_terms import LossTerm
from segops.models.registry import register_model
from segops.models.segmentors.hyperseg import (_Level, at_least_2x2, divide_feature,
                                               patchwise_conv, run_decoder)


class PatchConv(nn.Module):
    """A k x k conv applied patch by patch with weights it is given (the reference's
    MetaPatchConv2d with reflected padding k // 2); no parameters of its own."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, depthwise: bool = False) -> None:
        super().__init__()
        self.cout, self.kernel, self.depthwise = cout, kernel, depthwise
        self.params = cout * (1 if depthwise else cin) * kernel * kernel

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        return patchwise_conv(x, weights, self.cout, self.kernel, self.depthwise)


class PatchConvBlock(nn.Sequential):
    """The reference's `make_meta_patch_conv2d_block`: `0` the patch-wise conv, `1` BN, then the
    activation if any."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, depthwise: bool = False,
                 activation: nn.Module | None = None) -> None:
        super().__init__(PatchConv(cin, cout, kernel, depthwise), nn.BatchNorm2d(cout),
                         *([activation] if activation is not None else []))
        self.params = self[0].params

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        x = self[0](x, weights)
        for layer in list(self)[1:]:
            x = layer(x)
        return x


class PatchInvertedResidual(nn.Module):
    """`conv`: 1x1 to cin * expand (BN, ReLU6; left out when expand is 1), depthwise k x k (BN,
    ReLU6), 1x1 to cout (BN), each patch-wise on its own slice of the weights; plus the input
    when cin == cout."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, expand: int = 2) -> None:
        super().__init__()
        hidden = int(round(cin * expand))
        blocks = [PatchConvBlock(cin, hidden, activation=nn.ReLU6())] if expand != 1 else []
        blocks += [PatchConvBlock(hidden, hidden, kernel, depthwise=True, activation=nn.ReLU6()),
                   PatchConvBlock(hidden, cout)]
        self.conv = nn.ModuleList(blocks)
        self.params = sum(block.params for block in blocks)
        self.residual = cin == cout

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        y = x
        for block, w in zip(self.conv, weights.split([b.params for b in self.conv], dim=1)):
            y = block(y, w)
        return x + y if self.residual else y


class WeightMapperV0(nn.Module):
    """v0_1's `WeightMapper` with `avg_pool=True`: see the module docstring."""

    def __init__(self, channels: int, level_params, levels: int = 3, groups: int = 16) -> None:
        super().__init__()
        self.levels = levels
        for i in range(levels - 1):
            self.add_module(f"down_{i}", nn.Sequential(
                nn.Conv2d(channels, channels, 2, 2, bias=False), nn.BatchNorm2d(channels),
                nn.ReLU()))
            self.add_module(f"flat_{i}", nn.Sequential(
                nn.Conv2d(2 * channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                *([nn.ReLU()] if i > 0 else [])))
        self.level_params = list(level_params)
        padded = [math.ceil(p / groups) * groups for p in self.level_params]
        self.shares = divide_feature(channels, padded, max(8, groups))
        self.out_conv = nn.Module()
        for i, (share, out) in enumerate(zip(self.shares, padded)):
            self.out_conv.add_module(f"conv_{i}", nn.Conv2d(share, out, 1, groups=groups,
                                                            bias=False))

    def forward(self, x: Tensor) -> list:
        feats = [x]
        for i in range(self.levels - 1):
            feats.append(getattr(self, f"down_{i}")(at_least_2x2(feats[-1])))
        feats[-1] = F.adaptive_avg_pool2d(feats[-1], 1).expand_as(feats[-1])
        for i in reversed(range(self.levels - 1)):
            up = resize(feats.pop(), feats[-1].shape[2:], mode="nearest")
            feats[-1] = getattr(self, f"flat_{i}")(torch.cat([feats[-1], up], dim=1))
        slices = feats[0].split(self.shares, dim=1)
        return [conv(s)[:, :params] for conv, s, params in
                zip(self.out_conv.children(), slices, self.level_params)]


class HyperSegV0(nn.Module):
    """hyperseg_v0_1.py's HyperGen (backbone, decoder, weight_mapper); defaults: -l's config."""

    def __init__(self, num_classes: int = 21, variant: str = "b3", levels: int = 3,
                 out_feat_scale=0.25, kernel_sizes=(1, 1, 3, 3, 3, 3), expand_ratio: int = 2,
                 weight_groups: int = 16, loss: str = "cross_entropy") -> None:
        super().__init__()
        self.loss_terms = [LossTerm("out", loss)]
        self.backbone = EfficientNetHyperSeg(variant, out_feat_scale)
        # level inputs, coarsest first; the image itself is the finest
        feats = ([3] + self.backbone.feat_channels[:-1])[::-1]
        self.decoder = nn.Module()
        layers, prev = [], 0
        for level, k in enumerate(kernel_sizes):
            cin = prev + feats[level] + 2
            prev = num_classes if level == len(kernel_sizes) - 1 else feats[level]
            layers.append(PatchInvertedResidual(cin, prev, k, expand_ratio) if k > 1
                          else PatchConvBlock(cin, prev, activation=nn.ReLU()))
            self.decoder.add_module(f"level_{level}", _Level(layers[-1]))
        self.decoder_levels = list(self.decoder.children())
        self.weight_mapper = WeightMapperV0(self.backbone.feat_channels[-1],
                                            [layer.params for layer in layers], levels,
                                            weight_groups)

    def forward(self, img: Tensor):
        *feats, last = self.backbone(img)
        return run_decoder(self.decoder_levels, img, feats, self.weight_mapper(last),
                           self.training)


register_model("hyperseg-l", HyperSegV0)
