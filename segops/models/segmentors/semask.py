"""SeMask with Semantic FPN: `semask-fpn_swin-{t,s,b,l}` (ADE20K, 150 classes), as
Picsart-AI-Research/SeMask-Segmentation `SeMask-FPN/configs/semask_swin/ade20k/
semfpn_semask_swin_{tiny,small}_patch4_window7_512x512_80k_ade20k.py`, `..._base_patch4_window12_
512x512...` and `..._large_patch4_window12_640x640...` (base model `configs/_base_/models/
semfpn_semask_swin.py`): SeMask-Swin backbone -> BranchFPNHead (256 channels, dropout 0.1).

Training: {"out": logits, "aux": [], "semantic_prior": summed per-stage class logits}, both at
the input size. Losses as the reference head: cross-entropy on "out" (the L config: OHEM with
min_kept 100000) and cross-entropy on "semantic_prior" with weight cate_w = 0.4.
"""
from __future__ import annotations

from torch import Tensor

from segops.models.backbones.semask_swin import semask_swin
from segops.models.backbones.swin import SWIN_VARIANTS
from segops.models.common import resize
from segops.models.heads.branch_fpn_head import BranchFPNHead
from segops.models.loss_terms import LossTerm
from segops.models.registry import register_model
from segops.models.segmentors.encoder_decoder import EncoderDecoder

SEMANTIC_PRIOR_WEIGHT = 0.4  # the configs' cate_w


class SeMaskEncoderDecoder(EncoderDecoder):
    """EncoderDecoder whose backbone returns (features, class logits) and whose decode head
    returns (logits, semantic-prior logits)."""

    def __init__(self, backbone, decode_head, main_loss: LossTerm = LossTerm("out"),
                 align_corners: bool = False) -> None:
        super().__init__(backbone, decode_head, align_corners=align_corners)
        self.main_loss = main_loss

    @property
    def loss_terms(self) -> list[LossTerm]:
        return [self.main_loss, LossTerm("semantic_prior", weight=SEMANTIC_PRIOR_WEIGHT)]

    def forward(self, img: Tensor):
        size = img.shape[2:]
        out, prior = self.decode_head(self.extract_feat(img))
        out = resize(out, size, self.align_corners)
        if not self.training:
            return out
        return {"out": out, "aux": [],
                "semantic_prior": resize(prior, size, self.align_corners)}


def semask_fpn(variant: str, num_classes: int = 150, norm: str = "bn") -> SeMaskEncoderDecoder:
    backbone = semask_swin(variant, num_classes=num_classes)
    head = BranchFPNHead(feature_strides=(4, 8, 16, 32), in_channels=backbone.num_features,
                         in_index=[0, 1, 2, 3], channels=256, num_classes=num_classes,
                         dropout_ratio=0.1, norm=norm, align_corners=False)
    main_loss = (LossTerm("out", "ohem_cross_entropy", kwargs={"min_kept": 100000})
                 if variant == "l" else LossTerm("out"))
    return SeMaskEncoderDecoder(backbone, head, main_loss)


for _v in SWIN_VARIANTS:
    register_model(f"semask-fpn_swin-{_v}", semask_fpn, variant=_v)
