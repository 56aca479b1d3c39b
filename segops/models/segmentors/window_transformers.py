"""UPerNet on window-attention transformers (ADE20K, 150 classes), with the head and auxiliary
head of mmseg's UPerNet-Swin configs (`segops.models.segmentors.transformer_models.upernet`;
auxiliary loss weight 0.4), which is what Swin-Transformer-Semantic-Segmentation, the pipeline the
Focal Transformer README says its segmentation models follow, uses:

* `upernet_focal-{t,s,b}`: Focal Transformer (`segops.models.backbones.focal`; the README's
  ADE20K table, UperNet at 512x512 crops, with the absolute position embedding for 512x512
  inputs that its parameter counts imply, see there).
* `lg-t`: Local-to-Global Transformer, tiny (`segops.models.backbones.lg`; no code of the paper
  exists, see there), with the same UperNet.
"""
from __future__ import annotations

from segops.models.backbones.focal import FOCAL_VARIANTS, focal
from segops.models.backbones.lg import lg_transformer
from segops.models.registry import register_model
from segops.models.segmentors.transformer_models import upernet


def upernet_focal(variant: str, num_classes: int = 150, norm: str = "bn"):
    return upernet(focal(variant, pos_embed_img_size=512), num_classes, norm)


def upernet_lg(variant: str, num_classes: int = 150, norm: str = "bn"):
    return upernet(lg_transformer(variant), num_classes, norm)


for _v in FOCAL_VARIANTS:
    register_model(f"upernet_focal-{_v}", upernet_focal, variant=_v)
register_model("lg-t", upernet_lg, variant="t")
