"""PSANet head (Zhao et al., ECCV 2018) as mmseg's `PSAHead`
(`mmseg/models/decode_heads/psa_head.py`), bi-directional, non-compact: the collect and the
distribute branch each reduce the input (1x1 ConvModule), shrink the map by `shrink_factor`,
predict an Hm x Wm window per position (`attention`: 1x1 ConvModule + 1x1 conv without bias),
lay the windows out densely with `segops.nn.PSAMask`, softmax over the source positions, and
aggregate the reduced features with that map. `proj` (1x1, padding 1, as mmseg) fuses both
branches, which are resized back and concatenated with the input into the 3x3 `bottleneck`.

mmseg needs mmcv's compiled `PSAMask` for this head; here the shuffle is a PyTorch gather. The
attention weights are predicted, not dot products, so no segops operator applies. State-dict
keys are mmseg's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.common import BaseDecodeHead, resize
from segops.nn import ConvModule, PSAMask


class PSAHead(BaseDecodeHead):
    def __init__(self, in_channels, channels: int, num_classes: int, *, mask_size=(97, 97),
                 shrink_factor: int = 2, normalization_factor: float = 1.0,
                 psa_softmax: bool = True, **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.mask_size = tuple(mask_size)
        self.shrink_factor = shrink_factor
        if normalization_factor is None:
            normalization_factor = self.mask_size[0] * self.mask_size[1]
        self.normalization_factor = normalization_factor
        self.psa_softmax = psa_softmax
        conv = dict(norm=self.norm, act=self.act)
        windows = self.mask_size[0] * self.mask_size[1]

        def attention():
            return nn.Sequential(ConvModule(channels, channels, 1, **conv),
                                 nn.Conv2d(channels, windows, 1, bias=False))
        self.reduce = ConvModule(self.in_channels, channels, 1, **conv)
        self.attention = attention()
        self.reduce_p = ConvModule(self.in_channels, channels, 1, **conv)
        self.attention_p = attention()
        self.psamask_collect = PSAMask("collect", self.mask_size)
        self.psamask_distribute = PSAMask("distribute", self.mask_size)
        self.proj = ConvModule(2 * channels, self.in_channels, 1, padding=1, **conv)
        self.bottleneck = ConvModule(2 * self.in_channels, channels, 3, padding=1, **conv)

    def _shrunk_size(self, h: int, w: int):
        """mmseg's rule: both sides odd -> ceil with align_corners=True, else floor without."""
        s = self.shrink_factor
        if h % s and w % s:
            return ((h - 1) // s + 1, (w - 1) // s + 1), True
        return (h // s, w // s), False

    def _aggregate(self, feat: Tensor, windows: Tensor, psamask: PSAMask) -> Tensor:
        n, c, h, w = feat.shape
        attn = psamask(windows)
        if self.psa_softmax:
            attn = F.softmax(attn, dim=1)
        out = torch.bmm(feat.reshape(n, c, h * w), attn.reshape(n, h * w, h * w))
        return out.view(n, c, h, w) * (1.0 / self.normalization_factor)

    def forward(self, inputs):
        x = self._transform_inputs(inputs)
        x_col, x_dis = self.reduce(x), self.reduce_p(x)
        align_corners = self.align_corners
        if self.shrink_factor != 1:
            size, align_corners = self._shrunk_size(*x_col.shape[2:])
            x_col = resize(x_col, size, align_corners)
            x_dis = resize(x_dis, size, align_corners)
        out = torch.cat([self._aggregate(x_col, self.attention(x_col), self.psamask_collect),
                         self._aggregate(x_dis, self.attention_p(x_dis),
                                         self.psamask_distribute)], dim=1)
        out = resize(self.proj(out), x.shape[2:], align_corners)
        return self.cls_seg(self.bottleneck(torch.cat([x, out], dim=1)))
