"""DF1 / DF2, the backbones found by partial order pruning (Li et al., "Partial Order Pruning:
for Best Speed/Accuracy Trade-off in Neural Architecture Search", CVPR 2019), as in
DNL-Semantic-Segmentation / torchcv `model/backbone/dfnet/dfnet_models.py` (`DFNetV1`,
`DFNetV2`), with its module names: a two-conv stem (3x3/2 to 32, 3x3/2 to 64) and stages of
ResNet basic blocks.

- DF1: `stage2` 3 x 64 (/8), `stage3` 3 x 128 (/16), `stage4` 3 x 256 (/32), `stage5` 1 x 512.
- DF2: `stage2_1` 2 x 64 (/8), `stage2_2` 1 x 128, `stage3_1` 10 x 128 (/16), `stage3_2` 1 x 256,
  `stage4_1` 4 x 256 (/32), `stage4_2` 2 x 512.

The classification repository returns the last feature only; as the DF-Seg networks use them
(SFNet `network/dfnet.py`), this backbone returns three: DF1 (stage3, stage4, stage5) at
(1/16, 1/32, 1/32), DF2 (stage2_2, stage3_2, stage4_2) at (1/8, 1/16, 1/32), with
(128, 256, 512) channels.
"""
from __future__ import annotations

from torch import Tensor, nn

from segops.models.backbones.resnet import BasicBlock, ResLayer
from segops.nn.common import make_norm

# variant -> ((stage name, planes, blocks, stride), ...), names of the returned stages
DFNET_STAGES = {
    "df1": ((("stage2", 64, 3, 2), ("stage3", 128, 3, 2), ("stage4", 256, 3, 2),
             ("stage5", 512, 1, 1)), ("stage3", "stage4", "stage5")),
    "df2": ((("stage2_1", 64, 2, 2), ("stage2_2", 128, 1, 1), ("stage3_1", 128, 10, 2),
             ("stage3_2", 256, 1, 1), ("stage4_1", 256, 4, 2), ("stage4_2", 512, 2, 1)),
            ("stage2_2", "stage3_2", "stage4_2")),
}


class DFNet(nn.Module):
    def __init__(self, variant: str = "df1", norm: str = "bn") -> None:
        super().__init__()
        if variant not in DFNET_STAGES:
            raise ValueError(f"variant must be one of {sorted(DFNET_STAGES)}, got {variant!r}")
        stages, self.out_stages = DFNET_STAGES[variant]
        self.stage1 = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1, bias=False), make_norm(norm, 32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, 2, 1, bias=False), make_norm(norm, 64), nn.ReLU(inplace=True))
        inplanes = 64
        self.stage_names = []
        for name, planes, blocks, stride in stages:
            self.add_module(name, ResLayer(BasicBlock, inplanes, planes, blocks, stride, norm=norm))
            self.stage_names.append(name)
            inplanes = planes
        self.out_channels = (128, 256, 512)

    def forward(self, x: Tensor):
        x = self.stage1(x)
        outs = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_stages:
                outs.append(x)
        return tuple(outs)
