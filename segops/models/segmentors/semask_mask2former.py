"""SeMask Mask2Former with the MSFaPN pixel decoder: `semask-mask2former-msfapn_swin-l` (ADE20K,
150 classes), as Picsart-AI-Research/SeMask-Segmentation `SeMask-FAPN/SeMask-Mask2Former/configs/
ade20k/semantic-segmentation/semask_swin/msfapn_maskformer2_semask_swin_large_IN21k_384_bs16_
160k_res640.yaml` (base `semask_maskformer2_msfapn_R50_bs16_160k.yaml`; meta architecture
`semask_mask_former_model.py` SeMaskMaskFormer): SeMask-Swin-L (window 12, semantic windows 12,
global semantic attention in stages 3-4) -> BranchMaskFormerHead (`segops.models.heads.
mask2former_head`: 256-d MSFaPN pixel decoder, 9-layer masked-attention decoder, 100 queries).

Module names as the reference: `backbone.*` (the Swin parts with mmseg's names, see
`segops.models.backbones.semask_swin`), `sem_seg_head.{pixel_decoder, predictor}.*`.

The input is padded bottom/right to a multiple of 32 (the config's size divisibility). Eval mode
returns the reference's semantic inference, softmax(class)[:-1] x sigmoid(mask) summed over the
queries (per-class scores, not logits; argmax gives the label), at the input size. Training
returns {"out": those scores, "aux": [], "masks": {"pred_logits", "pred_masks", "aux_outputs"},
"semantic_prior": the summed class maps at the input size}; loss terms as the config:
"mask_classification" on "masks" (class 2.0, mask 5.0, dice 5.0, no-object 0.1, 12544 points,
oversample 3.0, importance 0.75, the 9 intermediate predictions supervised too) and cross-entropy
with weight 0.4 (CATE_WEIGHT) on "semantic_prior".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.backbones.semask_swin import semask_swin
from segops.models.heads.mask2former_head import BranchMaskFormerHead
from segops.models.loss_terms import LossTerm
from segops.models.registry import register_model

SIZE_DIVISIBILITY = 32
MASK_CLASSIFICATION = dict(class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
                           no_object_weight=0.1, num_points=12544, oversample_ratio=3.0,
                           importance_sample_ratio=0.75, size_divisibility=SIZE_DIVISIBILITY)


class SeMaskMaskFormer(nn.Module):
    def __init__(self, backbone: nn.Module, sem_seg_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head

    @property
    def loss_terms(self) -> list[LossTerm]:
        return [LossTerm("masks", "mask_classification", kwargs=dict(MASK_CLASSIFICATION)),
                LossTerm("semantic_prior", weight=0.4)]

    def forward(self, img: Tensor):
        h, w = img.shape[-2:]
        d = SIZE_DIVISIBILITY
        x = F.pad(img, [0, (d - w % d) % d, 0, (d - h % d) % d])
        features, priors = self.backbone(x)
        preds, prior = self.sem_seg_head(features, priors)
        masks = F.interpolate(preds["pred_masks"], size=x.shape[-2:], mode="bilinear",
                              align_corners=False)[..., :h, :w]
        scores = torch.einsum("bqc,bqhw->bchw", preds["pred_logits"].softmax(-1)[..., :-1],
                              masks.sigmoid())
        if not self.training:
            return scores
        return {"out": scores, "aux": [], "masks": preds,
                "semantic_prior": prior[..., :h, :w]}


def semask_mask2former(variant: str = "l", num_classes: int = 150) -> SeMaskMaskFormer:
    backbone = semask_swin(variant, num_classes=num_classes, global_late_stages=True)
    head = BranchMaskFormerHead(backbone.num_features, num_classes)
    return SeMaskMaskFormer(backbone, head)


register_model("semask-mask2former-msfapn_swin-l", semask_mask2former, variant="l")
