"""Segmentor wrappers following mmseg's EncoderDecoder and CascadeEncoderDecoder."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from segops.models.common import resize
from segops.models.loss_terms import LossTerm, main_and_aux_terms


class EncoderDecoder(nn.Module):
    """backbone -> (neck) -> decode_head, plus auxiliary heads used in training mode.

    `forward(img)` returns logits (N, num_classes, H, W) at the input size in eval mode; in
    training mode it returns {"out": logits, "aux": [aux logits at the input size, ...]}.
    State-dict keys follow mmseg: `backbone.*`, `neck.*`, `decode_head.*`, `auxiliary_head.*`
    (a ModuleList `auxiliary_head.<i>.*` when there are several).
    `loss_terms` (see segops.models.loss_terms): cross-entropy on "out" and on each auxiliary
    output with `aux_weights` (one weight for all, or one per auxiliary output).
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, neck: Optional[nn.Module] = None,
                 auxiliary_head=None, align_corners: bool = False, aux_weights=0.4) -> None:
        super().__init__()
        self.aux_weights = aux_weights
        self.backbone = backbone
        if neck is not None:
            self.neck = neck
        self.decode_head = decode_head
        if isinstance(auxiliary_head, (list, tuple)):
            auxiliary_head = nn.ModuleList(auxiliary_head)
        if auxiliary_head is not None:
            self.auxiliary_head = auxiliary_head
        self.align_corners = align_corners

    @property
    def with_neck(self) -> bool:
        return hasattr(self, "neck")

    def extract_feat(self, img: Tensor):
        x = self.backbone(img)
        if self.with_neck:
            x = self.neck(x)
        return x

    def _decode(self, x) -> Tensor:
        return self.decode_head(x)

    @property
    def num_aux_outputs(self) -> int:
        return len(self._aux_heads())

    @property
    def loss_terms(self) -> list[LossTerm]:
        return main_and_aux_terms(self.num_aux_outputs, self.aux_weights)

    def _aux_heads(self) -> Sequence[nn.Module]:
        aux = getattr(self, "auxiliary_head", None)
        if aux is None:
            return []
        return list(aux) if isinstance(aux, nn.ModuleList) else [aux]

    def forward(self, img: Tensor):
        size = img.shape[2:]
        x = self.extract_feat(img)
        out = resize(self._decode(x), size, self.align_corners)
        if not self.training:
            return out
        aux = [resize(head(x), size, self.align_corners) for head in self._aux_heads()]
        return {"out": out, "aux": aux}


class CascadeEncoderDecoder(EncoderDecoder):
    """mmseg's CascadeEncoderDecoder: `decode_head` is a ModuleList of stages; stage i > 0 is
    called as `head(x, previous_stage_logits)` (OCRNet: FCN soft regions -> OCR head)."""

    def __init__(self, backbone: nn.Module, decode_heads: Sequence[nn.Module], **kwargs) -> None:
        super().__init__(backbone, nn.ModuleList(decode_heads), **kwargs)
        self.num_stages = len(decode_heads)

    def _decode_stages(self, x) -> list:
        outs = [self.decode_head[0](x)]
        for head in self.decode_head[1:]:
            outs.append(head(x, outs[-1]))
        return outs

    def _decode(self, x) -> Tensor:
        return self._decode_stages(x)[-1]

    @property
    def num_aux_outputs(self) -> int:
        return self.num_stages - 1 + len(self._aux_heads())

    def forward(self, img: Tensor):
        """As EncoderDecoder; in training mode "aux" starts with the logits of every stage but
        the last (mmseg supervises each cascade stage: OCRNet's FCN stage has loss weight 0.4),
        followed by the auxiliary heads' logits."""
        if not self.training:
            return super().forward(img)
        size = img.shape[2:]
        x = self.extract_feat(img)
        stages = [resize(o, size, self.align_corners) for o in self._decode_stages(x)]
        aux = [resize(head(x), size, self.align_corners) for head in self._aux_heads()]
        return {"out": stages[-1], "aux": stages[:-1] + aux}
