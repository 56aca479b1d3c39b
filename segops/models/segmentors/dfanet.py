"""`dfanet-a`, `dfanet-b`: DFANet (Li et al., "DFANet: Deep Feature Aggregation for Real-Time
Semantic Segmentation", CVPR 2019). No official code exists; the structure follows the paper:
three XceptionA (or B) backbones in cascade (Sec. 3.2, Fig. 3). Sub-network aggregation: the
second and third backbones start from [previous enc2 ; previous fc-attention output upsampled
to 1/4]. Sub-stage aggregation: each later stage takes [previous backbone's same stage ;
its own previous stage]. Decoder (Sec. 3.3): the three enc2 outputs, each 1x1 conv-BN-ReLU to
32 channels and upsampled to 1/4, summed and passed through a 1x1 conv-BN-ReLU; the three
fc-attention outputs, each 1x1 conv-BN-ReLU to 32 and upsampled to 1/4, added; a 1x1
classifier; bilinear upsampling to the input (align_corners=True). The decoder width 32 is
our choice (the paper gives none). Widths of A and B: Table 1 (see backbones/xception_a.py).
Cross-entropy on the output only (the paper names no auxiliary loss). Cityscapes, 19 classes.

Size against the paper. This structure has 1,829,715 (A) / 1,099,011 (B) parameters, of which
the three fc attentions hold 3 x (c4*1000 + 1000 + 1000*c4 + 2*c4) = 1,156,152 / 771,768. The
paper reports 7.8M / 4.8M (its comparison table), and no reading of Table 1 reaches that:
B's widths are 2/3 of A's wherever the table scales them (stage outputs, in-block widths, the
concatenated inputs), while the stem (8), the fc layer (1000), the decoder (32) and the class
count are the same for both. So any reading has K + L*w + Q*w^2 parameters, w = 1 (B) or 1.5
(A), with Q in layers between two scaled widths (whatever the block internals are) and L in
layers between a fixed and a scaled width. 7.8M and 4.8M (each +-0.05M) force
Q_B = (P_A - 1.5 P_B) / 0.75 <= 0.97M and so K + L_B >= 4.75M - 0.97M = 3.78M. Here
K = 5,475, L_B = 848,288 and Q_B = 245,248 (fitted exactly to the counts at four widths), and
the fc attentions (2 x 1000 x 128 per backbone of B) are 0.77M of L_B: the figure needs 4.4
times the width-linear parameters, i.e. far more fc attention than the table gives. Readings
that widen the blocks move Q, not L, and miss both ways, e.g. full 3x3 convolutions instead of
separable ones give 6.17M / 3.01M parameters at 19.3 / 8.8 GMACs, and an ImageNet 1000-way
classifier kept in each backbone gives 2.41M / 1.49M. Both paper figures are about 4.3x this
count; the paper does not say how it counted.

Compute: `segops.models.summary` gives 2.95 (A) / 1.57 (B) GMACs at 1024x1024 (5.91 / 3.13
GFLOPs at two FLOPs per multiply-accumulate). The paper's 3.4 / 2.1 "GFLOPs" (and 1.7 for A at
512x1024, half the pixels) agree with the multiply-accumulate convention: ours is 87% / 75% of
them, where counting FLOPs would put it at 174% / 149%. The rest (0.45 / 0.53 GMACs, not
scaling with the width) is not attributable to any layer the paper describes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segops.models.backbones.xception_a import XceptionA
from segops.models.common import resize
from segops.models.loss_terms import main_and_aux_terms
from segops.models.registry import register_model
from segops.nn import ConvModule


class DFANet(nn.Module):
    """Keys: `backbone` (XceptionA with stem), `backbone2`, `backbone3` (no stem, widened
    inputs), `enc2_reduce.{0,1,2}`, `fca_reduce.{0,1,2}`, `conv_fusion`, `conv_out`."""

    def __init__(self, variant: str = "a", num_classes: int = 19,
                 decoder_channels: int = 32) -> None:
        super().__init__()
        self.backbone = XceptionA(variant)
        c2, c3, c4 = self.backbone.out_channels
        wider = (c2 + c4, c2 + c3, c3 + c4)
        self.backbone2 = XceptionA(variant, wider, stem=False)
        self.backbone3 = XceptionA(variant, wider, stem=False)
        d = decoder_channels
        self.enc2_reduce = nn.ModuleList(ConvModule(c2, d, 1) for _ in range(3))
        self.fca_reduce = nn.ModuleList(ConvModule(c4, d, 1) for _ in range(3))
        self.conv_fusion = ConvModule(d, d, 1)
        self.conv_out = nn.Conv2d(d, num_classes, 1)

    loss_terms = main_and_aux_terms(0)

    def _cascade(self, net: XceptionA, prev):
        e2p, e3p, e4p, fcap = prev
        e2 = net.enc2(torch.cat([e2p, resize(fcap, e2p.shape[2:], align_corners=True)], dim=1))
        e3 = net.enc3(torch.cat([e3p, resize(e2, e3p.shape[2:], align_corners=True)], dim=1))
        e4 = net.enc4(torch.cat([e4p, resize(e3, e4p.shape[2:], align_corners=True)], dim=1))
        return e2, e3, e4, net.fca(e4)

    def forward(self, img: Tensor):
        stages = [self.backbone(img)]
        for net in (self.backbone2, self.backbone3):
            stages.append(self._cascade(net, stages[-1]))
        quarter = stages[0][0].shape[2:]
        up = lambda x: resize(x, quarter, align_corners=True)  # noqa: E731
        fused = self.conv_fusion(sum(up(r(s[0])) for r, s in zip(self.enc2_reduce, stages)))
        fused = fused + sum(up(r(s[3])) for r, s in zip(self.fca_reduce, stages))
        out = resize(self.conv_out(fused), img.shape[2:], align_corners=True)
        return {"out": out, "aux": []} if self.training else out


register_model("dfanet-a", DFANet, variant="a")
register_model("dfanet-b", DFANet, variant="b")
