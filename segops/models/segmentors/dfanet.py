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
This structure has 1.83M (A) / 1.10M (B) parameters and 2.95 / 1.57 GMACs at 1024x1024;
the paper reports 7.8M / 4.8M and 3.4 / 2.1 GFLOPs (its comparison with other methods), so
its block internals, which it does not publish, must be wider than the ones assumed here.
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
