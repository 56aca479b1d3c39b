"""HRNet backbone (Wang et al., TPAMI 2020), laid out like mmseg's `HRNet` so its checkpoints load.

Structure and state_dict keys follow `mmseg/models/backbones/hrnet.py`: stem `conv1/bn1/conv2/bn2`,
`layer1` (Bottleneck stage), `transition{1,2,3}`, `stage{2,3,4}` made of HRModules with
`branches` and `fuse_layers`. Blocks use mmseg's ResNet block names (`conv1`, `bn1`, ...,
`downsample.0/1`). `forward` returns the 4 branch outputs (strides 4, 8, 16, 32), the HRNetV2
representation before any head.

Configurations (mmseg `open-mmlab://msra/hrnetv2_*` configs):
  w18_small: stage blocks 2/2/2/2, modules 1/1/3/2, widths 18/36/72/144
  w18:       stage blocks 4/4/4/4, modules 1/1/4/3, widths 18/36/72/144
  w48:       as w18 with widths 48/96/192/384
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from segops.nn.common import make_norm


def _bn(norm: str, c: int) -> nn.Module:
    layer = make_norm(norm, c)
    if layer is None:
        raise ValueError("HRNet needs a norm layer (norm='bn' or 'syncbn')")
    return layer


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, norm: str = "bn") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _bn(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _bn(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck, pytorch style (stride on the 3x3 conv), expansion 4."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, norm: str = "bn") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _bn(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = _bn(norm, planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _bn(norm, planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def _make_blocks(block, inplanes: int, planes: int, num_blocks: int, norm: str,
                 stride: int = 1) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
            _bn(norm, planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample, norm)]
    layers += [block(planes * block.expansion, planes, norm=norm) for _ in range(1, num_blocks)]
    return nn.Sequential(*layers)


class _Upsample(nn.Module):
    """mmseg's `Upsample(scale_factor)` at index 2 of the up-fusion Sequential: bilinear resize to
    int(size * scale_factor) (HRModule.forward then resizes to the exact target size, as mmseg)."""

    def __init__(self, scale_factor: int) -> None:
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, x: Tensor) -> Tensor:
        size = [int(t * self.scale_factor) for t in x.shape[-2:]]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class HRModule(nn.Module):
    """Parallel branches followed by all-to-all multi-resolution fusion."""

    def __init__(self, num_branches: int, block, num_blocks, in_channels: list, num_channels,
                 multiscale_output: bool = True, norm: str = "bn") -> None:
        super().__init__()
        if not (num_branches == len(num_blocks) == len(in_channels) == len(num_channels)):
            raise ValueError(f"HRModule: num_branches={num_branches} but num_blocks="
                             f"{len(num_blocks)}, in_channels={len(in_channels)}, "
                             f"num_channels={len(num_channels)} entries")
        self.num_branches = num_branches
        self.in_channels = list(in_channels)
        self.branches = nn.ModuleList()
        for i in range(num_branches):
            self.branches.append(_make_blocks(block, self.in_channels[i], num_channels[i],
                                              num_blocks[i], norm))
            self.in_channels[i] = num_channels[i] * block.expansion
        self.fuse_layers = self._make_fuse_layers(multiscale_output, norm)
        self.relu = nn.ReLU(inplace=False)

    def _make_fuse_layers(self, multiscale_output: bool, norm: str):
        if self.num_branches == 1:
            return None
        c = self.in_channels
        fuse = nn.ModuleList()
        for i in range(self.num_branches if multiscale_output else 1):
            row = nn.ModuleList()
            for j in range(self.num_branches):
                if j > i:  # lower resolution: 1x1 conv + BN, then upsample
                    row.append(nn.Sequential(nn.Conv2d(c[j], c[i], 1, bias=False),
                                             _bn(norm, c[i]), _Upsample(2 ** (j - i))))
                elif j == i:
                    row.append(None)
                else:  # higher resolution: (i - j) stride-2 3x3 convs
                    downs = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        cout = c[i] if last else c[j]
                        mods = [nn.Conv2d(c[j], cout, 3, 2, 1, bias=False), _bn(norm, cout)]
                        if not last:
                            mods.append(nn.ReLU(inplace=False))
                        downs.append(nn.Sequential(*mods))
                    row.append(nn.Sequential(*downs))
            fuse.append(row)
        return fuse

    def forward(self, x: list) -> list:
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        if self.num_branches == 1:
            return x
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = x[i]
            for j in range(self.num_branches):
                if j == i:
                    continue
                z = row[j](x[j])
                if j > i and z.shape[2:] != x[i].shape[2:]:
                    z = F.interpolate(z, size=x[i].shape[2:], mode="bilinear", align_corners=False)
                y = y + z
            out.append(self.relu(y))
        return out


class HRNet(nn.Module):
    """mmseg HRNet; `extra` has keys stage1..stage4, each with num_modules, num_branches, block,
    num_blocks, num_channels (the mmseg config dict)."""

    def __init__(self, extra: dict, in_channels: int = 3, norm: str = "bn",
                 multiscale_output: bool = True) -> None:
        super().__init__()
        for i in range(1, 5):
            cfg = extra[f"stage{i}"]
            if len(cfg["num_blocks"]) != cfg["num_branches"] or \
                    len(cfg["num_channels"]) != cfg["num_branches"]:
                raise ValueError(f"HRNet stage{i}: num_blocks and num_channels need "
                                 f"num_branches={cfg['num_branches']} entries")
        self.extra = extra
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 2, 1, bias=False)
        self.bn1 = _bn(norm, 64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = _bn(norm, 64)
        self.relu = nn.ReLU(inplace=True)

        cfg = extra["stage1"]
        block = BLOCKS[cfg["block"]]
        self.layer1 = _make_blocks(block, 64, cfg["num_channels"][0], cfg["num_blocks"][0], norm)
        pre = [cfg["num_channels"][0] * block.expansion]
        for s in (2, 3, 4):
            cfg = extra[f"stage{s}"]
            block = BLOCKS[cfg["block"]]
            cur = [c * block.expansion for c in cfg["num_channels"]]
            setattr(self, f"transition{s - 1}", self._make_transition(pre, cur, norm))
            modules = []
            for m in range(cfg["num_modules"]):
                ms = multiscale_output or s < 4 or m < cfg["num_modules"] - 1
                hm = HRModule(cfg["num_branches"], block, cfg["num_blocks"], cur,
                              cfg["num_channels"], ms, norm)
                cur = hm.in_channels
                modules.append(hm)
            setattr(self, f"stage{s}", nn.Sequential(*modules))
            pre = cur
        self.out_channels = pre

    @staticmethod
    def _make_transition(pre: list, cur: list, norm: str) -> nn.ModuleList:
        layers = nn.ModuleList()
        for i, c in enumerate(cur):
            if i < len(pre):
                if c != pre[i]:
                    layers.append(nn.Sequential(nn.Conv2d(pre[i], c, 3, 1, 1, bias=False),
                                                _bn(norm, c), nn.ReLU(inplace=True)))
                else:
                    layers.append(None)
            else:
                downs = []
                for j in range(i + 1 - len(pre)):
                    cout = c if j == i - len(pre) else pre[-1]
                    downs.append(nn.Sequential(nn.Conv2d(pre[-1], cout, 3, 2, 1, bias=False),
                                               _bn(norm, cout), nn.ReLU(inplace=True)))
                layers.append(nn.Sequential(*downs))
        return layers

    def forward(self, x: Tensor) -> list:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        ys = [self.layer1(x)]
        for s in (2, 3, 4):
            trans = getattr(self, f"transition{s - 1}")
            xs = []
            for i in range(self.extra[f"stage{s}"]["num_branches"]):
                if trans[i] is None:
                    xs.append(ys[i])
                else:
                    xs.append(trans[i](ys[-1]))
            ys = getattr(self, f"stage{s}")(xs)
        return ys


def hrnet_extra(width: int, small: bool = False) -> dict:
    """The `extra` dict of mmseg's hrnetv2_w{width} (and hrnetv2_w18_small when small)."""
    nb = 2 if small else 4
    w = (width, 2 * width, 4 * width, 8 * width)
    return dict(
        stage1=dict(num_modules=1, num_branches=1, block="BOTTLENECK", num_blocks=(nb,),
                    num_channels=(64,)),
        stage2=dict(num_modules=1, num_branches=2, block="BASIC", num_blocks=(nb,) * 2,
                    num_channels=w[:2]),
        stage3=dict(num_modules=3 if small else 4, num_branches=3, block="BASIC",
                    num_blocks=(nb,) * 3, num_channels=w[:3]),
        stage4=dict(num_modules=2 if small else 3, num_branches=4, block="BASIC",
                    num_blocks=(nb,) * 4, num_channels=w),
    )


def hrnet(variant: str, norm: str = "bn", **kwargs) -> HRNet:
    """variant: 'w18_small', 'w18' or 'w48'."""
    table = {"w18_small": (18, True), "w18": (18, False), "w48": (48, False)}
    if variant not in table:
        raise ValueError(f"unknown HRNet variant {variant!r} (expected one of {sorted(table)})")
    width, small = table[variant]
    return HRNet(hrnet_extra(width, small), norm=norm, **kwargs)
