"""GateNet decoder (Zhao et al., "Suppress and Balance: A Simple Gated Network for Salient Object
Detection", ECCV 2020), following Xiaoqi-Zhao-DLUT/GateNet-RGB-Saliency `model_GateNet_ResNet.py`,
`model_GateNet_vgg16.py` and `multi_scale_module.py` (FoldConv_aspp). Saliency: one output
channel (logits).

Transition layers `dem1..5` (dem1: Fold-ASPP, the ASPP run on the 2x2 space-to-depth fold of
the map and unfolded back; or, with `context="pafem"`, `segops.nn.PAFEM`, whose dilated branches
carry position attention on the non-local operator), gate units `attention_feature1..5` (two
sigmoid gates per level, globally averaged), the gated FPN branch `output1..5` and the gated
parallel branch `out_res` (VGG: behind 32-channel `dem*_1` convs); the prediction is the sum of
both branches. Module names and Sequential indices are the reference's; the encoder sits under
`backbone.` here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.common import resize
from segops.nn.pafem import PAFEM, conv_bn_prelu


class FoldASPP(nn.Module):
    """GateNet's FoldConv_aspp: 3x3 `down_conv`, unfold into non-overlapping `win` x `win`
    windows as channels, ASPP (`conv1` 1x1, `conv2` 3x3 dilation 2, `conv3`/`conv4` dilations
    4/6, `conv5` image pooling; each to half the folded width), `fuse`, fold back, 1x1
    `up_conv`. Odd sides drop their last row/column in the windows and get zeros there, as the
    reference's unfold/fold do."""

    def __init__(self, in_channels: int, channels: int, win: int = 2) -> None:
        super().__init__()
        self.win = win
        folded = channels * win * win
        branch = folded // 2
        self.down_conv = conv_bn_prelu(in_channels, channels, 3)
        self.conv1 = conv_bn_prelu(folded, branch)
        self.conv2 = conv_bn_prelu(folded, branch, 3, 2)
        self.conv3 = conv_bn_prelu(folded, branch, 3, 4)
        self.conv4 = conv_bn_prelu(folded, branch, 3, 6)
        self.conv5 = conv_bn_prelu(folded, branch)
        self.fuse = conv_bn_prelu(5 * branch, folded)
        self.up_conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[2:]
        win = self.win
        x = self.down_conv(x)
        n = x.shape[0]
        x = F.unfold(x, win, stride=win).view(n, -1, h // win, w // win)
        pooled = resize(self.conv5(F.adaptive_avg_pool2d(x, 1)), x.shape[2:])
        x = self.fuse(torch.cat([self.conv1(x), self.conv2(x), self.conv3(x), self.conv4(x),
                                 pooled], dim=1))
        x = F.fold(x.reshape(n, x.shape[1], -1), (h, w), win, stride=win)
        return self.up_conv(x)


def _gate(in_channels: int, mids) -> nn.Sequential:
    """conv-BN-PReLU per width in `mids` (3x3, bias), then a 3x3 conv to the two gates."""
    layers = []
    for mid in mids:
        layers += list(conv_bn_prelu(in_channels, mid, 3))
        in_channels = mid
    return nn.Sequential(*layers, nn.Conv2d(in_channels, 2, 3, padding=1))


class GateNetDecoder(nn.Module):
    """`forward(E1..E5, size)` -> (final logits, FPN-branch logits) at `size`.

    `encoder_channels`: E1..E5 (strides 2/4/8/16/16 for ResNet, 1/2/4/8/16 for VGG);
    `transition_channels`: T1..T5; `parallel_channels`: None (ResNet: the gated T maps feed
    `out_res` directly, width 256) or the `dem*_1` width (VGG: 32, `out_res` width 64)."""

    def __init__(self, encoder_channels, transition_channels=(64, 64, 128, 256, 512),
                 parallel_channels=None, context: str = "fold_aspp") -> None:
        super().__init__()
        e1, e2, e3, e4, e5 = encoder_channels
        t1, t2, t3, t4, t5 = transition_channels
        if context == "fold_aspp":
            self.dem1 = nn.Sequential(FoldASPP(e5, t5), nn.BatchNorm2d(t5), nn.PReLU())
        elif context == "pafem":
            self.dem1 = PAFEM(e5, t5)
        else:
            raise ValueError(f"context must be 'fold_aspp' or 'pafem', got {context!r}")
        self.dem2 = conv_bn_prelu(e4, t4, 3)
        self.dem3 = conv_bn_prelu(e3, t3, 3)
        self.dem4 = conv_bn_prelu(e2, t2, 3)
        self.dem5 = conv_bn_prelu(e1, t1, 3)
        self.attention_feature1 = _gate(e5 + t5, (512, 128))
        self.attention_feature2 = _gate(e4 + 256, (256, 64))
        self.attention_feature3 = _gate(e3 + 128, (128,))
        self.attention_feature4 = _gate(e2 + 64, (64,))
        self.attention_feature5 = _gate(e1 + t1, ())
        self.output1 = conv_bn_prelu(t5, 256, 3)
        self.output2 = conv_bn_prelu(256, 128, 3)
        self.output3 = conv_bn_prelu(128, 64, 3)
        self.output4 = conv_bn_prelu(64, t1, 3)
        self.output5 = nn.Sequential(nn.Conv2d(t1, 1, 3, padding=1))
        self.parallel = parallel_channels is not None
        if self.parallel:
            for i, t in enumerate((t5, t4, t3, t2, t1), 1):
                setattr(self, f"dem{i}_1", conv_bn_prelu(t, parallel_channels, 3))
            res_in, res_width = 5 * parallel_channels + 1, 64
        else:
            res_in, res_width = t5 + t4 + t3 + t2 + t1 + 1, 256
        self.out_res = nn.Sequential(*conv_bn_prelu(res_in, res_width, 3),
                                     *conv_bn_prelu(res_width, res_width, 3),
                                     nn.Conv2d(res_width, 1, 3, padding=1))

    def forward(self, encoded, size):
        transitions = [self.dem1(encoded[4]), self.dem2(encoded[3]), self.dem3(encoded[2]),
                       self.dem4(encoded[1]), self.dem5(encoded[0])]  # T5 .. T1
        gates = [self.attention_feature1, self.attention_feature2, self.attention_feature3,
                 self.attention_feature4, self.attention_feature5]
        outputs = [self.output1, self.output2, self.output3, self.output4, self.output5]
        levels = encoded[::-1]  # E5 .. E1
        gated, decoded = [], None
        for k, (t, e) in enumerate(zip(transitions, levels)):
            # the top level gates on its own transition map; the others on the upsampled
            # decoder output, which they also add
            context = t if decoded is None else resize(decoded, e.shape[2:])
            g = torch.sigmoid(gates[k](torch.cat([e, context], dim=1))).mean(dim=(2, 3),
                                                                              keepdim=True)
            decoded = outputs[k](g[:, :1] * t if decoded is None else context + g[:, :1] * t)
            branch = getattr(self, f"dem{k + 1}_1")(t) if self.parallel else t
            gated.append(resize(g[:, 1:] * branch, levels[4].shape[2:]))
        fpn = resize(decoded, size)
        res = resize(self.out_res(torch.cat([decoded] + gated, dim=1)), size)
        return fpn + res, fpn
