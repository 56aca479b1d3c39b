"""ISANet head (Huang et al., 2019) as mmseg's `ISAHead` (`mmseg/models/decode_heads/isa_head.py`):
3x3 `in_conv`, interlaced sparse self-attention (long-range then short-range groups, through
`segops.nn.InterlacedSparseAttention`), `out_conv` over [attention output; in_conv output],
classifier.

State-dict keys are mmseg's (`global_relation.*`, `local_relation.*` directly under the head):
the segops layer is held as `isa`, and hooks drop/insert the `isa.` level when saving/loading.
"""
from __future__ import annotations

import torch

from segops.models.common import BaseDecodeHead, ConvModule
from segops.models.heads._layers import nn_layer, norm_kwargs


class ISAHead(BaseDecodeHead):
    def __init__(self, in_channels, channels: int, num_classes: int, *, isa_channels: int = 256,
                 down_factor=(8, 8), **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.down_factor = tuple(down_factor)
        self.in_conv = ConvModule(self.in_channels, channels, 3, padding=1, norm=self.norm,
                                  act=self.act)
        cls = nn_layer("InterlacedSparseAttention")
        self.isa = cls(channels, isa_channels, block_size=self.down_factor, backend=self.backend,
                       **norm_kwargs(cls, self.norm))
        self.out_conv = ConvModule(2 * channels, channels, 1, norm=self.norm, act=self.act)
        self._register_state_dict_hook(_drop_isa_level)
        self._register_load_state_dict_pre_hook(self._insert_isa_level)

    def _insert_isa_level(self, state_dict, prefix, *args) -> None:
        # Keys saved without the `isa.` level (as mmseg's) go back under it.
        top = {k.split(".")[0] for k in self.isa.state_dict()}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if key[len(prefix):].split(".")[0] in top:
                state_dict[prefix + "isa." + key[len(prefix):]] = state_dict.pop(key)

    def forward(self, inputs):
        x = self.in_conv(self._transform_inputs(inputs))
        out = self.out_conv(torch.cat([self.isa(x), x], dim=1))
        return self.cls_seg(out)


def _drop_isa_level(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "isa.")]:
        state_dict[prefix + key[len(prefix) + 4:]] = state_dict.pop(key)
    return state_dict
