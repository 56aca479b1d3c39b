"""VGG-16 with batch norm (Simonyan & Zisserman, ICLR 2015, configuration D), torchvision's
`vgg16_bn` feature extractor with its keys (`features.<i>`), without the classifier. Returns
the five blocks' outputs before their max-pools (64, 128, 256, 512, 512 channels at 1, 1/2,
1/4, 1/8, 1/16 of the input).
"""
from __future__ import annotations

from torch import Tensor, nn

from segops.nn.common import make_norm

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG16BN(nn.Module):
    def __init__(self, in_channels: int = 3, norm: str = "bn") -> None:
        super().__init__()
        layers, self.block_ends = [], []
        cin = in_channels
        for widths in VGG16_BLOCKS:
            if layers:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            for c in widths:
                layers += [nn.Conv2d(cin, c, 3, padding=1), make_norm(norm, c),
                           nn.ReLU(inplace=True)]
                cin = c
            self.block_ends.append(len(layers) - 1)
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        self.out_channels = tuple(w[-1] for w in VGG16_BLOCKS)

    def forward(self, x: Tensor):
        outs = []
        for i, layer in enumerate(self.features[:-1]):
            x = layer(x)
            if i in self.block_ends:
                outs.append(x)
        return tuple(outs)
