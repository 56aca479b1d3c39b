"""`rgpnet`: RGPNet (Arani et al., "RGPNet: A Real-Time General Purpose Semantic Segmentation",
WACV 2021). No official code exists; this follows the paper's description (Sec. 3, Fig. 2):
an encoder, an adaptor module and a light decoder. The adaptor gives each encoder level i a
feature that merges three paths: the level's own feature (transform, 1x1), the shallower
level's transformed feature brought down by a strided 3x3 conv, and the deeper level's
transformed feature upsampled; the decoder aggregates the adapted features top-down (upsample,
add, 3x3 conv) and classifies at 1/4 of the input.

Widths are not given by the paper's text we followed, so they are our choices and the
parameter count is that of this documented structure: encoder ResNet-101 (V1b stem; `depth`
selects 18/34/50 too), adaptor and decoder width 128, 1x1 classifier; bilinear upsampling
(align_corners=False). Cross-entropy on the output. Cityscapes, 19 classes.
"""
from __future__ import annotations

from torch import Tensor, nn

from segops.models.backbones.resnet import ResNet
from segops.models.common import resize
from segops.models.loss_terms import main_and_aux_terms
from segops.models.registry import register_model
from segops.nn import ConvModule


class Adaptor(nn.Module):
    """`transform.<i>` (1x1 ConvModules), `down.<i>` (stride-2 3x3 ConvModules taking level i
    to level i + 1)."""

    def __init__(self, in_channels, channels: int) -> None:
        super().__init__()
        self.transform = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels)
        self.down = nn.ModuleList(ConvModule(channels, channels, 3, 2, 1)
                                  for _ in range(len(in_channels) - 1))

    def forward(self, feats):
        t = [f(x) for f, x in zip(self.transform, feats)]
        out = []
        for i, x in enumerate(t):
            if i > 0:
                x = x + resize(self.down[i - 1](t[i - 1]), x.shape[2:])
            if i + 1 < len(t):
                x = x + resize(t[i + 1], x.shape[2:])
            out.append(x)
        return out


class RGPNet(nn.Module):
    """Keys: `backbone.*`, `adaptor.*`, `decoder.<i>` (3x3 ConvModules, levels 1/4..1/16),
    `conv_seg`."""

    def __init__(self, depth: int = 101, num_classes: int = 19, channels: int = 128) -> None:
        super().__init__()
        self.backbone = ResNet(depth)
        levels = self.backbone.out_channels
        self.adaptor = Adaptor(levels, channels)
        self.decoder = nn.ModuleList(ConvModule(channels, channels, 3, padding=1)
                                     for _ in range(len(levels) - 1))
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    loss_terms = main_and_aux_terms(0)

    def forward(self, img: Tensor):
        adapted = self.adaptor(self.backbone(img))
        x = adapted[-1]
        for conv, skip in zip(reversed(self.decoder), reversed(adapted[:-1])):
            x = conv(skip + resize(x, skip.shape[2:]))
        out = resize(self.conv_seg(x), img.shape[2:])
        return {"out": out, "aux": []} if self.training else out


register_model("rgpnet", RGPNet)
