"""Real-time segmentors (Cityscapes defaults: 19 classes).

The mmseg-config models follow their mmseg configs exactly (backbone, widths, heads, auxiliary
heads and their loss weights; state_dict keys as mmseg's):
- `bisenetv1_r18-d32`: `configs/bisenetv1/bisenetv1_r18-d32_4xb4-160k_cityscapes-1024x1024.py`
- `bisenetv2_fcn`: `configs/bisenetv2/bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024.py`
- `stdc1`, `stdc2`: `configs/stdc/stdc{1,2}_4xb12-80k_cityscapes-512x1024.py`
- `icnet_r18-d8`, `icnet_r50-d8`: `configs/icnet/icnet_r{18,50}-d8_4xb2-80k_cityscapes-832x832.py`
"""
from __future__ import annotations

from segops.models.backbones.bisenetv1 import BiSeNetV1
from segops.models.backbones.bisenetv2 import BiSeNetV2
from segops.models.backbones.icnet import ICNet
from segops.models.backbones.resnet import ResNet
from segops.models.backbones.stdc import STDCContextPathNet, STDCNet
from segops.models.common import resize
from segops.models.heads.fcn_head import FCNHead
from segops.models.heads.stdc_head import STDCHead
from segops.models.loss_terms import LossTerm
from segops.models.necks.ic_neck import ICNeck
from segops.models.registry import register_model
from segops.models.segmentors.encoder_decoder import EncoderDecoder


def _fcn(in_channels: int, channels: int, num_classes: int, in_index: int, num_convs: int = 1,
         **kw) -> FCNHead:
    """mmseg's FCNHead as these configs use it: no input concatenation."""
    return FCNHead(in_channels, channels, num_classes, num_convs=num_convs, concat_input=False,
                   in_index=in_index, **kw)


def bisenetv1(num_classes: int = 19, norm: str = "bn") -> EncoderDecoder:
    """BiSeNetV1 on ResNet-18 (V1b stem, output stride 32); FCN decode head on the fused
    feature, FCN auxiliary heads on the two context features (loss weight 1.0 each)."""
    resnet = ResNet(18, strides=(1, 2, 2, 2), norm=norm)
    backbone = BiSeNetV1(resnet, norm=norm)
    aux = [_fcn(128, 64, num_classes, i, norm=norm) for i in (1, 2)]
    return EncoderDecoder(backbone, _fcn(256, 256, num_classes, 0, norm=norm),
                          auxiliary_head=aux, aux_weights=1.0)


def bisenetv2(num_classes: int = 19, norm: str = "bn") -> EncoderDecoder:
    """BiSeNetV2 with the FCN decode head (1024 channels) and the four "booster" FCN heads on
    semantic stages 1-4 (two convs each, loss weight 1.0)."""
    aux = [_fcn(cin, ch, num_classes, i, num_convs=2, norm=norm)
           for i, (cin, ch) in enumerate(((16, 16), (32, 64), (64, 256), (128, 1024)), 1)]
    return EncoderDecoder(BiSeNetV2(), _fcn(128, 1024, num_classes, 0, norm=norm),
                          auxiliary_head=aux, aux_weights=1.0)


class STDCEncoderDecoder(EncoderDecoder):
    """EncoderDecoder whose last auxiliary head is STDC's detail head. Training mode returns
    {"out", "aux": [context 1/8, context 1/16 logits], "detail"}: "detail" is the boundary
    channel of mmseg's 2-class detail head, upsampled to the input size (align_corners=True, as
    the head's loss resizes it); supervising that one channel with BCE + Dice is the official
    STDC-Seg detail loss. Each auxiliary output is upsampled with its head's align_corners."""

    def forward(self, img):
        if not self.training:
            return super().forward(img)
        size = img.shape[2:]
        x = self.extract_feat(img)
        out = resize(self._decode(x), size, self.align_corners)
        *aux_heads, detail_head = self._aux_heads()
        aux = [resize(h(x), size, h.align_corners) for h in aux_heads]
        detail = resize(detail_head(x)[:, 1:], size, detail_head.align_corners)
        return {"out": out, "aux": aux, "detail": detail}

    @property
    def num_aux_outputs(self) -> int:
        return len(self._aux_heads()) - 1

    @property
    def loss_terms(self) -> list[LossTerm]:
        """mmseg's stdc config: OHEM cross-entropy (thresh 0.7, min_kept 10000) on the decode and
        both context heads, weight 1.0; detail head: BCE 1.0 + Dice 1.0."""
        ohem = dict(thresh=0.7, min_kept=10000)
        terms = [LossTerm("out", "ohem_cross_entropy", 1.0, ohem)]
        terms += [LossTerm(f"aux.{i}", "ohem_cross_entropy", 1.0, ohem)
                  for i in range(self.num_aux_outputs)]
        return terms + [LossTerm("detail", "detail_aggregation", 1.0)]


def stdc(stdc_type: str, num_classes: int = 19, norm: str = "bn") -> STDCEncoderDecoder:
    """STDC-Seg: STDCNet1/2 context path, FCN decode head on the fused 1/8 feature
    (align_corners=True), FCN heads on the two context features, detail head on the stage-3
    feature."""
    backbone = STDCContextPathNet(STDCNet(stdc_type, norm=norm), norm=norm)
    aux = [_fcn(128, 64, num_classes, 2, norm=norm), _fcn(128, 64, num_classes, 1, norm=norm),
           STDCHead(256, 64, 2, num_convs=1, concat_input=False, in_index=0, norm=norm,
                    align_corners=True)]
    return STDCEncoderDecoder(backbone, _fcn(256, 256, num_classes, 3, norm=norm,
                                             align_corners=True),
                              auxiliary_head=aux, align_corners=True)


def icnet(depth: int, num_classes: int = 19, norm: str = "bn") -> EncoderDecoder:
    """ICNet: three-branch backbone on ResNetV1c-D8, cascade feature fusion neck, FCN decode head
    on the fused 1/8 feature (no dropout), FCN cascade auxiliary heads on the 1/16 and 1/8
    fusion inputs (loss weight 0.4)."""
    layer_channels = (128, 512) if depth == 18 else (512, 2048)
    backbone = ICNet(depth, layer_channels=layer_channels, norm=norm)
    aux = [_fcn(128, 128, num_classes, i, norm=norm) for i in (0, 1)]
    head = _fcn(128, 128, num_classes, 2, dropout_ratio=0.0, norm=norm)
    return EncoderDecoder(backbone, head, neck=ICNeck(norm=norm), auxiliary_head=aux,
                          aux_weights=0.4)


register_model("bisenetv1_r18-d32", bisenetv1)
register_model("bisenetv2_fcn", bisenetv2)
register_model("stdc1", stdc, stdc_type="STDCNet1")
register_model("stdc2", stdc, stdc_type="STDCNet2")
register_model("icnet_r18-d8", icnet, depth=18)
register_model("icnet_r50-d8", icnet, depth=50)
