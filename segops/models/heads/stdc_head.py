"""STDC's detail head as mmseg's `STDCHead` (`mmseg/models/decode_heads/stdc_head.py`)."""
from __future__ import annotations

import torch
from torch import nn

from segops.models.heads.fcn_head import FCNHead


class STDCHead(FCNHead):
    """An FCNHead (mmseg: 2 classes, boundary / not) on the backbone's 1/8 feature, used only
    in training. It carries the fixed Laplacian kernel (`laplacian_kernel` buffer) and the
    fixed 0.6/0.3/0.1 scale-fusion weights (`fusion_kernel`, a parameter that does not
    require grad) with which the boundary target is made from the label, so mmseg checkpoints
    load with the same keys."""

    def __init__(self, in_channels, channels: int, num_classes: int = 2, *,
                 boundary_threshold: float = 0.1, **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.boundary_threshold = boundary_threshold
        self.register_buffer("laplacian_kernel", torch.tensor(
            [[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]]).reshape(1, 1, 3, 3))
        self.fusion_kernel = nn.Parameter(torch.tensor([0.6, 0.3, 0.1]).reshape(1, 3, 1, 1),
                                          requires_grad=False)
