"""How a model says what its training loss is, so a trainer needs no per-model code.

In training mode a segops model returns a dict of outputs: "out" (the logits at the input
size), "aux" (a list of auxiliary logits) and any model-specific entries (e.g. "detail" for
STDC's detail head). The model's `loss_terms` lists one `LossTerm` per supervised output; the
total loss is the weighted sum of the terms. The label handed to each term is the (N, H, W)
class-index map (ignore index 255), resized with nearest interpolation to that output's size
when the output is not at the label's size.

Loss names (implemented in `segops.models.losses`):
- "cross_entropy": pixel-wise cross-entropy, ignore index 255 (kwargs: class_weight).
- "ohem_cross_entropy": cross-entropy over the hard pixels only, as mmseg's OHEMPixelSampler
  (kwargs: thresh, min_kept).
- "detail_aggregation": STDC's detail loss on a 1-channel logit map: BCE + Dice against the
  multi-scale Laplacian boundary target computed from the label.
- "border_focal": DFN's border network loss: focal loss on a 1-channel logit map against the
  label's class boundaries.
- "binary_cross_entropy": sigmoid cross-entropy of a 1-channel logit map against a binary
  (saliency) mask (GateNet's BCEWithLogitsLoss).
- "pixel_contrast": pixel-wise contrastive loss on an embedding output (kwargs as
  ContrastiveSeg: temperature, memory sizes, ...).
- "mask_classification": Mask2Former's set loss on a {"pred_logits" (N, Q, K+1), "pred_masks"
  (N, Q, h, w), "aux_outputs": [same, per decoder layer]} output: Hungarian matching of queries
  to the label's class regions, cross-entropy on the classes (no-object weight), sigmoid BCE and
  Dice on point-sampled masks, every aux output supervised alike (kwargs: class_weight,
  mask_weight, dice_weight, no_object_weight, num_points, oversample_ratio,
  importance_sample_ratio, size_divisibility: the multiple the model pads its input to).
"""
from __future__ import annotations

from dataclasses import dataclass, field

LOSS_NAMES = ("cross_entropy", "ohem_cross_entropy", "detail_aggregation", "border_focal",
              "pixel_contrast", "mask_classification", "binary_cross_entropy")


@dataclass(frozen=True)
class LossTerm:
    """`weight * loss(outputs[output], label, **kwargs)`. `output` names an entry of the
    train-mode output dict; "<name>.<i>" is the i-th element of a list entry ("aux.<i>": the
    i-th auxiliary output)."""

    output: str
    loss: str = "cross_entropy"
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {', '.join(LOSS_NAMES)}, got {self.loss!r}")

    def select(self, outputs: dict):
        """The output this term supervises."""
        name, _, index = self.output.partition(".")
        return outputs[name][int(index)] if index else outputs[name]


def main_and_aux_terms(num_aux: int, aux_weights=0.4) -> list[LossTerm]:
    """Cross-entropy on "out" (weight 1) and on each auxiliary output (a weight per output, or
    one for all: mmseg's configs use 0.4)."""
    if isinstance(aux_weights, (int, float)):
        aux_weights = [aux_weights] * num_aux
    if len(aux_weights) != num_aux:
        raise ValueError(f"aux_weights: expected {num_aux} weights, got {len(aux_weights)}")
    return [LossTerm("out")] + [LossTerm(f"aux.{i}", weight=float(w))
                                for i, w in enumerate(aux_weights)]
