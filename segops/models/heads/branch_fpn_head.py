"""SeMask's `BranchFPNHead` (Picsart-AI-Research/SeMask-Segmentation `SeMask-FPN/mmseg/models/
decode_heads/branch_fpn_head.py`): the Semantic FPN head on the backbone features, plus a
parameter-free branch that sums the backbone's per-stage class logits, each upsampled to the
finest stride (the semantic prior, supervised in training). Keys as FPNHead."""
from __future__ import annotations

from torch import Tensor, nn

from segops.models.common import resize
from segops.models.heads.fpn_head import FPNHead, _Up2


class BranchFPNHead(FPNHead):
    def __init__(self, feature_strides, **kwargs) -> None:
        super().__init__(feature_strides, **kwargs)
        # Same number of 2x upsamples per level as the FPN branch, no convolutions.
        self.prior_upsamples = nn.ModuleList(
            nn.Sequential(*(_Up2(self.align_corners) for _ in range(len(head) // 2)))
            for head in self.scale_heads)

    def forward(self, inputs):
        """inputs = (features, class logits) per stage -> (logits, semantic-prior logits), both
        at the finest stride."""
        features, priors = inputs
        priors = self._transform_inputs(priors)
        prior = priors[0]
        for upsample, level in zip(self.prior_upsamples[1:], priors[1:]):
            prior = prior + resize(upsample(level), prior.shape[2:], self.align_corners)
        return super().forward(features), prior
