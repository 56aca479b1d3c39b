"""ResNet and ResNet-V1c backbones with mmseg's structure and state_dict keys.

Follows mmseg `mmseg/models/backbones/resnet.py` (`ResNet`, `ResNetV1c`) and
`mmseg/models/utils/res_layer.py` (`ResLayer`): "pytorch" style (the stride sits on the 3x3 conv),
deep stem `stem.{0,1,3,4,6,7}` (three 3x3 convs, stem_channels//2, stem_channels//2,
stem_channels), max-pool, `layer1..layer4`, per-stage strides and dilations, and
`contract_dilation` (the first block of a dilated stage uses half the dilation). The segmentation
"D8" setting is strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contract_dilation=True: output stride 8.
An mmseg checkpoint (`backbone.*` keys) loads unchanged.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from segops.nn.common import make_norm


def _norm_name(norm: Optional[str], postfix) -> str:
    return f"{'gn' if norm == 'gn' else 'bn'}{postfix}"


class _ResidualBlock(nn.Module):
    """`convs` each followed by its norm (mmseg's names `conv<i>`, `bn<i>`/`gn<i>`), ReLU between
    them, the shortcut (`downsample` when the shape changes) added, then ReLU."""

    def __init__(self, convs, norm: str, stride: int, dilation: int,
                 downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.norm_names = []
        for i, conv in enumerate(convs, 1):
            self.add_module(f"conv{i}", conv)
            self.norm_names.append(_norm_name(norm, i))
            self.add_module(self.norm_names[-1], make_norm(norm, conv.out_channels))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation

    @property
    def last_norm(self) -> nn.Module:
        return getattr(self, self.norm_names[-1])

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        for i, name in enumerate(self.norm_names, 1):
            out = getattr(self, name)(getattr(self, f"conv{i}")(out))
            if i < len(self.norm_names):
                out = self.relu(out)
        return self.relu(out + identity)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs (mmseg: the second conv is not dilated)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None, norm: str = "bn") -> None:
        super().__init__([nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation,
                                    dilation=dilation, bias=False),
                          nn.Conv2d(planes, planes, 3, padding=1, bias=False)],
                         norm, stride, dilation, downsample)


class Bottleneck(_ResidualBlock):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels), residual, ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None, norm: str = "bn") -> None:
        super().__init__([nn.Conv2d(inplanes, planes, 1, bias=False),
                          nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation,
                                    dilation=dilation, bias=False),
                          nn.Conv2d(planes, planes * self.expansion, 1, bias=False)],
                         norm, stride, dilation, downsample)


class ResLayer(nn.Sequential):
    """One stage: `num_blocks` blocks, the first with `stride` and a 1x1 projection shortcut
    (`downsample.0` conv, `downsample.1` norm) when the shape changes."""

    def __init__(self, block, inplanes: int, planes: int, num_blocks: int, stride: int = 1,
                 dilation: int = 1, norm: str = "bn", multi_grid: Optional[Sequence[int]] = None,
                 contract_dilation: bool = False) -> None:
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                make_norm(norm, planes * block.expansion))
        if multi_grid is not None:
            if len(multi_grid) != num_blocks:
                raise ValueError(f"multi_grid must have one dilation per block ({num_blocks}), "
                                 f"got {tuple(multi_grid)}")
            dilations = list(multi_grid)
        else:
            first = dilation // 2 if (dilation > 1 and contract_dilation) else dilation
            dilations = [first] + [dilation] * (num_blocks - 1)
        layers = [block(inplanes, planes, stride, dilations[0], downsample, norm)]
        for i in range(1, num_blocks):
            layers.append(block(planes * block.expansion, planes, 1, dilations[i], None, norm))
        super().__init__(*layers)


class ResNet(nn.Module):
    """mmseg's ResNet (V1b when `deep_stem=False`, V1c when True). Returns the outputs of the
    stages in `out_indices` as a tuple. `stem_pool_ceil_mode` rounds the stem max-pool's output
    size up, as mmseg's ICNet and the openseg / GALD ResNets do."""

    arch_settings = {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    }

    def __init__(self, depth: int, in_channels: int = 3, stem_channels: int = 64,
                 base_channels: int = 64, num_stages: int = 4, strides=(1, 2, 2, 2),
                 dilations=(1, 1, 1, 1), out_indices=(0, 1, 2, 3), deep_stem: bool = False,
                 norm: str = "bn", multi_grid: Optional[Sequence[int]] = None,
                 contract_dilation: bool = False, zero_init_residual: bool = True,
                 stem_pool_ceil_mode: bool = False) -> None:
        super().__init__()
        if depth not in self.arch_settings:
            raise ValueError(f"ResNet depth must be one of {sorted(self.arch_settings)}, got {depth}")
        if not 1 <= num_stages <= 4:
            raise ValueError(f"num_stages must be in 1..4, got {num_stages}")
        if len(strides) != num_stages or len(dilations) != num_stages:
            raise ValueError(f"strides {tuple(strides)} and dilations {tuple(dilations)} must "
                             f"both have num_stages={num_stages} entries")
        if max(out_indices) >= num_stages:
            raise ValueError(f"out_indices {tuple(out_indices)} must be < num_stages={num_stages}")
        self.depth = depth
        self.deep_stem = deep_stem
        self.out_indices = tuple(out_indices)
        self.strides = tuple(strides)
        self.dilations = tuple(dilations)
        self.contract_dilation = contract_dilation
        block, stage_blocks = self.arch_settings[depth]
        self.block = block
        self.stage_blocks = stage_blocks[:num_stages]

        if deep_stem:
            half = stem_channels // 2
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, half, 3, stride=2, padding=1, bias=False),
                make_norm(norm, half), nn.ReLU(inplace=True),
                nn.Conv2d(half, half, 3, stride=1, padding=1, bias=False),
                make_norm(norm, half), nn.ReLU(inplace=True),
                nn.Conv2d(half, stem_channels, 3, stride=1, padding=1, bias=False),
                make_norm(norm, stem_channels), nn.ReLU(inplace=True))
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False)
            self.norm1_name = _norm_name(norm, 1)
            self.add_module(self.norm1_name, make_norm(norm, stem_channels))
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1,
                                    ceil_mode=stem_pool_ceil_mode)

        inplanes = stem_channels
        self.res_layers = []
        for i, num_blocks in enumerate(self.stage_blocks):
            planes = base_channels * 2 ** i
            layer = ResLayer(block, inplanes, planes, num_blocks, stride=strides[i],
                             dilation=dilations[i], norm=norm,
                             multi_grid=multi_grid if i == num_stages - 1 else None,
                             contract_dilation=contract_dilation)
            inplanes = planes * block.expansion
            name = f"layer{i + 1}"
            self.add_module(name, layer)
            self.res_layers.append(name)
        self.out_channels = tuple(base_channels * 2 ** i * block.expansion
                                  for i in range(num_stages))
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # mmseg's default init when no checkpoint is given: Kaiming convs, norms at 1, and the
        # last norm of each residual branch at 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, _ResidualBlock):
                    nn.init.zeros_(m.last_norm.weight)

    def forward(self, x: Tensor):
        if x.dim() != 4:
            raise ValueError(f"ResNet expects an (N, C, H, W) image batch, got shape {tuple(x.shape)}")
        if self.deep_stem:
            x = self.stem(x)
        else:
            x = self.relu(getattr(self, self.norm1_name)(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


class ResNetV1c(ResNet):
    """ResNet-V1c (Bag of Tricks, He et al. 2019): the 7x7 stem conv replaced by three 3x3 convs."""

    def __init__(self, depth: int, **kwargs) -> None:
        super().__init__(depth, deep_stem=True, **kwargs)


def resnet_v1c_d8(depth: int, norm: str = "bn", **kwargs) -> ResNetV1c:
    """ResNet-V1c at output stride 8, the dilated "D8" backbone of mmseg's `*_r{depth}-d8` configs."""
    return ResNetV1c(depth, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True,
                     norm=norm, **kwargs)
