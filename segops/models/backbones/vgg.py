"""VGG-16 with batch norm (Simonyan & Zisserman, 2015) as torchvision's `vgg16_bn().features`:
13 conv(bias)-BN-ReLU layers and 5 max-pools in one Sequential `features`, so its
`features.<N>.*` keys are torchvision's (and mmseg's) and its checkpoints load unchanged."""
from __future__ import annotations

from torch import Tensor, nn

# channels per conv, "M" a 2x2 max-pool (torchvision's configuration "D")
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16BN(nn.Module):
    """`forward(x)` returns the outputs of the five conv blocks (before each block's pool:
    strides 1, 2, 4, 8, 16; channels 64, 128, 256, 512, 512), as saliency decoders use them."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        layers, block_ends = [], []
        for v in VGG16:
            if v == "M":
                block_ends.append(len(layers))
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.block_ends = tuple(block_ends)  # index of the pool after each block
        self.out_channels = (64, 128, 256, 512, 512)

    def forward(self, x: Tensor):
        outs, start = [], 0
        for end in self.block_ends:
            x = self.features[start:end](x)
            outs.append(x)
            start = end
        return tuple(outs)
