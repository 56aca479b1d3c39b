"""Non-local and disentangled non-local heads as mmseg's `NLHead`
(`mmseg/models/decode_heads/nl_head.py`, Wang et al., CVPR 2018) and `DNLHead`
(`mmseg/models/decode_heads/dnl_head.py`, Yin et al., ECCV 2020): an FCNHead whose two convs
enclose one `segops.nn.NonLocal2d` / `segops.nn.DisentangledNonLocal2d` block (`nl_block` /
`dnl_block`, mmcv/mmseg state_dict keys)."""
from __future__ import annotations

import torch

from segops.models.heads.fcn_head import FCNHead
from segops.nn import DisentangledNonLocal2d, NonLocal2d


class _BlockFCNHead(FCNHead):
    block_name = ""

    def forward(self, inputs):
        x = self._transform_inputs(inputs)
        out = self.convs[1](getattr(self, self.block_name)(self.convs[0](x)))
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls_seg(out)


class NLHead(_BlockFCNHead):
    block_name = "nl_block"

    def __init__(self, in_channels, channels: int, num_classes: int, *, reduction: int = 2,
                 use_scale: bool = True, mode: str = "embedded_gaussian", **kwargs) -> None:
        kwargs.pop("num_convs", None)
        super().__init__(in_channels, channels, num_classes, num_convs=2, **kwargs)
        self.nl_block = NonLocal2d(channels, reduction=reduction, use_scale=use_scale, mode=mode,
                                   norm_cfg=self.norm)


class DNLHead(_BlockFCNHead):
    block_name = "dnl_block"

    def __init__(self, in_channels, channels: int, num_classes: int, *, reduction: int = 2,
                 use_scale: bool = True, mode: str = "embedded_gaussian",
                 temperature: float = 0.05, **kwargs) -> None:
        kwargs.pop("num_convs", None)
        super().__init__(in_channels, channels, num_classes, num_convs=2, **kwargs)
        self.dnl_block = DisentangledNonLocal2d(channels, reduction=reduction,
                                                use_scale=use_scale, mode=mode,
                                                temperature=temperature, norm_cfg=self.norm)
