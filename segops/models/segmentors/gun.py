"""`gun`: Guided Upsampling Network (Mazzini, BMVC 2018). No official code exists; this
follows the paper's description: a multi-resolution encoder (Sec. 3.2: the image at full and
at half resolution through encoders sharing weights, the half-resolution branch going deeper
for context, the two fused at 1/8 of the input) and the Guided Upsampling Module (Sec. 3.1,
`segops.nn.GuidedUpsampling`), which upsamples the 1/8 logits to the input size by sampling
them at positions displaced by a predicted offsets table.

The paper's layer widths could not be recovered from its text, so these are our choices and
its parameter count is that of this documented structure: the shared encoder is a ResNet-18
(V1b stem) at output stride 8 (strides 1, 2, 1, 1; dilations 1, 1, 2, 4); the full-resolution
branch runs its stem and stages 1-2 (128 channels at 1/8), the half-resolution branch the
whole network (512 channels at 1/16); fusion: [upsampled context ; high-resolution feature]
-> 3x3 conv-BN-ReLU to 128 -> 1x1 classifier. Guidance branch: the full-resolution stage-1
feature (64 channels, 1/4) -> 3x3 conv-BN-ReLU to 32 -> 1x1 conv to 2 offsets (zero-initialised,
so training starts from bilinear upsampling), bilinearly upsampled to the input size.
Cross-entropy on the output. Cityscapes, 19 classes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segops.models.backbones.resnet import ResNet
from segops.models.common import resize
from segops.models.loss_terms import main_and_aux_terms
from segops.models.registry import register_model
from segops.nn import ConvModule, GuidedUpsampling


class GUN(nn.Module):
    """Keys: `backbone.*` (ResNet-18), `fusion`, `conv_seg`, `guidance.{0,1}`."""

    def __init__(self, num_classes: int = 19, channels: int = 128,
                 guidance_channels: int = 32) -> None:
        super().__init__()
        self.backbone = ResNet(18, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
        c1, c2, _, c4 = self.backbone.out_channels
        self.fusion = ConvModule(c2 + c4, channels, 3, padding=1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.guidance = nn.Sequential(ConvModule(c1, guidance_channels, 3, padding=1),
                                      nn.Conv2d(guidance_channels, 2, 1))
        nn.init.zeros_(self.guidance[1].weight)
        nn.init.zeros_(self.guidance[1].bias)
        self.upsample = GuidedUpsampling()

    loss_terms = main_and_aux_terms(0)

    def _high_resolution(self, img: Tensor):
        r = self.backbone
        x1 = r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(img)))))
        return x1, r.layer2(x1)

    def forward(self, img: Tensor):
        size = img.shape[2:]
        x1, x2 = self._high_resolution(img)
        half = resize(img, ((size[0] + 1) // 2, (size[1] + 1) // 2))
        context = resize(self.backbone(half)[-1], x2.shape[2:])
        logits = self.conv_seg(self.fusion(torch.cat([context, x2], dim=1)))
        offsets = resize(self.guidance(x1), size)
        out = self.upsample(logits, offsets)
        return {"out": out, "aux": []} if self.training else out


register_model("gun", GUN)
