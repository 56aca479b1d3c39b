"""`dfnet-df1`, `dfnet-df2`: DF-Seg, the segmentation networks of "Partial Order Pruning"
(Li et al., CVPR 2019, Sec. 4.3) on the DF1 / DF2 backbones (`backbones/dfnet.py`).

The paper describes the head only at block level (pyramid pooling on the last feature, then
fusion with the two shallower features); its layer widths follow the DF-Seg network of SFNet
(Xiangtai Li, `network/dfnet.py` `DFSegnet` with `network/nn/operators.py` `PSPModule`,
`Aux_Module`): PSP module on the 512-channel feature (pooled 1x1 convs + BN, 1x1 bottleneck
to 128 + BN + ReLU + dropout), 1x1 convs (with bias) bringing each feature to 128 channels,
two fusion nodes (deeper feature upsampled, concatenated, 3x3 conv to 128) and a classifier
(3x3 conv 128 -> 256 with bias, BN, ReLU, dropout 0.1, 1x1 conv). Cross-entropy on the one
output, no auxiliary head. (SFNet halves the image in eval mode; this model does not, so eval
and train see the same scale.) Cityscapes, 19 classes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segops.models.backbones.dfnet import DFNet
from segops.models.common import resize
from segops.models.loss_terms import main_and_aux_terms
from segops.models.registry import register_model
from segops.nn.common import make_norm


class PSPModule(nn.Module):
    """`stages.<i>` (pool, 1x1 conv, BN), `bottleneck` (1x1 conv, BN, ReLU, dropout 0.1)."""

    def __init__(self, in_channels: int, out_channels: int, sizes=(1, 2, 3, 6)) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s),
                          nn.Conv2d(in_channels, out_channels, 1, bias=False),
                          make_norm("bn", out_channels)) for s in sizes)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels + len(sizes) * out_channels, out_channels, 1, bias=False),
            make_norm("bn", out_channels), nn.ReLU(), nn.Dropout2d(0.1))

    def forward(self, x: Tensor) -> Tensor:
        pooled = [resize(stage(x), x.shape[2:], align_corners=True) for stage in self.stages]
        return self.bottleneck(torch.cat(pooled + [x], dim=1))


class FusionNode(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fusion = nn.Conv2d(2 * channels, channels, 3, padding=1, bias=False)

    def forward(self, deeper: Tensor, shallower: Tensor) -> Tensor:
        deeper = resize(deeper, shallower.shape[2:], align_corners=True)
        return self.fusion(torch.cat([deeper, shallower], dim=1))


class DFSeg(nn.Module):
    """Keys: `backbone.*`, `cc5`, `cc4`, `cc3`, `ppm.*`, `fn4`, `fn3`, `fc.aux.*` (SFNet's)."""

    def __init__(self, variant: str = "df1", num_classes: int = 19, inner: int = 128) -> None:
        super().__init__()
        self.backbone = DFNet(variant)
        c3, c4, c5 = self.backbone.out_channels
        self.cc5 = nn.Conv2d(inner, inner, 1)
        self.cc4 = nn.Conv2d(c4, inner, 1)
        self.cc3 = nn.Conv2d(c3, inner, 1)
        self.ppm = PSPModule(c5, inner)
        self.fn4 = FusionNode(inner)
        self.fn3 = FusionNode(inner)
        self.fc = nn.Module()
        self.fc.aux = nn.Sequential(nn.Conv2d(inner, 256, 3, padding=1), make_norm("bn", 256),
                                    nn.ReLU(inplace=True), nn.Dropout2d(0.1),
                                    nn.Conv2d(256, num_classes, 1))

    loss_terms = main_and_aux_terms(0)

    def forward(self, img: Tensor):
        x3, x4, x5 = self.backbone(img)
        fused = self.fn4(self.cc5(self.ppm(x5)), self.cc4(x4))
        out = resize(self.fc.aux(self.fn3(fused, self.cc3(x3))), img.shape[2:],
                     align_corners=True)
        return {"out": out, "aux": []} if self.training else out


register_model("dfnet-df1", DFSeg, variant="df1")
register_model("dfnet-df2", DFSeg, variant="df2")
