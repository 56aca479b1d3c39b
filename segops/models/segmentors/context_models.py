"""Context-head segmentors of the model zoo's third part (issue 17), on the dilated ResNet
backbones of `dilated_fcn` (19 Cityscapes classes by default). Each factory's docstring names
the reference it follows and says which segops operator, if any, its head runs on.
"""
from __future__ import annotations

from torch import nn

from segops.models.backbones.resnet import ResNet, ResNetV1c, resnet_v1c_d8
from segops.models.backbones.vgg import VGG16BN
from segops.models.heads.dfn_head import DFNDecoder
from segops.models.heads.fcn_head import FCNHead
from segops.models.heads.gald_head import DualGCNHead, GALDHead
from segops.models.heads.gatenet_head import GateNetDecoder
from segops.models.heads.isnet_head import ISNetHead
from segops.models.heads.ocnet_head import ASPOCHead, PyramidOCHead
from segops.models.heads.paper_heads import ACFHead, GPSHead, HMAHead, OrdHead, RecoHead
from segops.models.heads.psa_head import PSAHead
from segops.models.loss_terms import LossTerm
from segops.models.registry import register_model
from segops.models.segmentors.encoder_decoder import EncoderDecoder
from segops.models.segmentors.dilated_fcn import (WIDTHS, MultiOutputEncoderDecoder,
                                                  d8_segmentor, deeplabv3, openseg_segmentor)
from segops.nn import smooth_dilated_convs


def psanet(depth: int, **kw):
    """PSANet: mmseg `configs/_base_/models/psanet_r50-d8.py` (PSAHead bi-direction, mask 97 x 97,
    shrink factor 2, softmax, normalization factor 1; auxiliary FCNHead weight 0.4)."""
    return d8_segmentor(depth, PSAHead, mask_size=(97, 97), shrink_factor=2,
                        normalization_factor=1.0, psa_softmax=True, **kw)


def ocnet_asp(depth: int = 101, **kw):
    """OCNet ASP-OC: openseg.pytorch `lib/models/nets/ocnet.py` `AspOCNet` and
    `lib/models/modules/asp_oc_block.py` (ASP_OC_Module(512, 256), dropout 0.1) on
    `openseg_segmentor`. The object context is `segops.nn.SelfAttentionBlock` (the
    disentangled_non_local operator without whitening)."""
    kw.setdefault("dropout_ratio", 0.1)
    return openseg_segmentor(depth, ASPOCHead, dilations=(12, 24, 36), **kw)


def ocnet_pyramid(depth: int = 101, **kw):
    """OCNet Pyramid-OC: OCNet.pytorch / openseg `ResNet101PyramidOC` with
    `pyramid_oc_block.py` (Pyramid_OC_Module(512, 512, sizes 1, 2, 3, 6), dropout 0.05) on
    `openseg_segmentor`; the regional attention runs on the interlaced_sparse_attention
    operator (see `PyramidObjectContextAttention`)."""
    return openseg_segmentor(depth, PyramidOCHead, sizes=(1, 2, 3, 6), **kw)


def sssegmentation_aux_head(depth: int, num_classes: int, norm: str = "bn",
                            align_corners: bool = False) -> FCNHead:
    """sssegmentation's auxiliary decoder: 3x3 conv 1024 -> 512 + BN + ReLU, dropout 0.1,
    classifier (R18 override: 256 -> 128)."""
    aux_in = WIDTHS[depth][2]
    return FCNHead(aux_in, aux_in // 2, num_classes, num_convs=1, concat_input=False, in_index=2,
                   dropout_ratio=0.1, norm=norm, align_corners=align_corners)


def isnet(depth: int = 101, *, num_classes: int = 19, norm: str = "bn",
          align_corners: bool = False, aux: bool = True):
    """ISNet: sssegmentation `configs/isnet/isnet_resnet101os8_cityscapes.py` (ResNet-101 V1c
    output stride 8, stem 64; head feats 512, transform 256, concat_input, no shortcut, dropout
    0.1; auxiliary decoder on stage 3; losses: final 1.0, stage 1 0.4, auxiliary 0.4). "aux" is
    [stage-1 logits, auxiliary logits]."""
    in_ch, ch, _, _ = WIDTHS[depth]
    head = ISNetHead(in_ch, ch, num_classes, transform_channels=256, in_index=3,
                     dropout_ratio=0.1, norm=norm, align_corners=align_corners)
    auxiliary = sssegmentation_aux_head(depth, num_classes, norm, align_corners) if aux else None
    return MultiOutputEncoderDecoder(resnet_v1c_d8(depth, norm=norm), head, auxiliary_head=auxiliary,
                                align_corners=align_corners)


def gald_backbone(depth: int, norm: str = "bn") -> ResNetV1c:
    """lxtGH/GALD-DGCNet's ResNet: deep stem 64-64-128, output stride 8, stage 3 dilation 2 in
    every block (no contraction), stage 4 dilations 4 x multi-grid (1, 2, 4), ceil-mode max-pool."""
    blocks = ResNetV1c.arch_settings[depth][1][3]
    backbone = ResNetV1c(depth, stem_channels=128, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                         multi_grid=[4 * (1, 2, 4)[i % 3] for i in range(blocks)], norm=norm,
                         stem_pool_ceil_mode=True)
    return backbone


def _gald_family(head_cls, aux_act, depth: int, *, num_classes: int = 19, norm: str = "bn",
                 align_corners: bool = True, aux: bool = True):
    in_ch, ch, aux_in, _ = WIDTHS[depth]
    head = head_cls(in_ch, ch, num_classes, in_index=3, norm=norm, align_corners=align_corners)
    auxiliary = (FCNHead(aux_in, 512, num_classes, num_convs=1, concat_input=False, in_index=2,
                         dropout_ratio=0.1, conv_bias=True, norm=norm, act=aux_act,
                         align_corners=align_corners) if aux else None)
    return EncoderDecoder(gald_backbone(depth, norm), head, auxiliary_head=auxiliary,
                          align_corners=align_corners)


def gald(depth: int = 101, **kw):
    """GALD-Net: lxtGH/GALD-DGCNet `libs/models/GALDNet.py` `GALD_res101` (GALDHead(2048, 512);
    "dsn" auxiliary head: 3x3 conv(bias) 1024 -> 512 + BN + ReLU, dropout 0.1, classifier;
    `libs/core/loss.py` CriterionDSN weight 0.4). Outputs are upsampled with align_corners=True,
    as its loss does. The reference's depthwise convs are unpadded and stride 2: the stage-4
    map must be at least 15 x 15 (inputs of about 113 x 113 and up)."""
    return _gald_family(GALDHead, "relu", depth, **kw)


def dgcnet(depth: int = 101, **kw):
    """DGCNet: lxtGH/GALD-DGCNet `libs/models/DualGCNNet.py` `DualSeg_res101` (DualGCNHead(2048,
    512); "dsn": 3x3 conv(bias) 1024 -> 512 + BN without ReLU, dropout 0.1, classifier; loss
    weight 0.4)."""
    return _gald_family(DualGCNHead, None, depth, **kw)


class DFN(nn.Module):
    """DFN segmentor: backbone -> DFNDecoder. Eval: the last (stride-4) smooth prediction.
    Train: {"out": that prediction, "aux": the three coarser smooth predictions, "border": the
    four border logit maps}; TorchSeg's loss: cross-entropy on every smooth prediction (weight
    1) plus `border_weight` x the sigmoid focal loss on every border map."""

    def __init__(self, backbone: nn.Module, decode_head: DFNDecoder,
                 border_weight: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.border_weight = border_weight

    def forward(self, img):
        smooth, border = self.decode_head(self.backbone(img), img.shape[2:])
        if not self.training:
            return smooth[-1]
        return {"out": smooth[-1], "aux": smooth[:-1], "border": border}

    @property
    def loss_terms(self) -> list[LossTerm]:
        n_smooth = len(self.decode_head.smooth_heads)
        return ([LossTerm("out")] + [LossTerm(f"aux.{i}") for i in range(n_smooth - 1)]
                + [LossTerm(f"border.{i}", "border_focal", self.border_weight)
                   for i in range(len(self.decode_head.border_heads))])


def dfn(depth: int = 101, *, num_classes: int = 19, norm: str = "bn"):
    """DFN: TorchSeg `model/dfn/voc.dfn.R101_v1c/network.py` (ResNet-101 with TorchSeg's deep
    stem 64-64-128, output stride 32; smooth network 512 channels, border network 21 channels;
    `config.py` aux_loss_alpha 0.1 for the border loss)."""
    backbone = ResNetV1c(depth, stem_channels=128, norm=norm)
    return DFN(backbone, DFNDecoder(backbone.out_channels, num_classes, norm=norm))


class GateNet(nn.Module):
    """GateNet saliency segmentor: encoder levels E1..E5 -> GateNetDecoder. Eval: the final
    1-channel logits. Train: {"out": final, "aux": [FPN-branch logits]}; the reference's
    loss is BCE-with-logits on both, weight 1 each (`train.py`)."""

    def __init__(self, backbone: nn.Module, decode_head: GateNetDecoder) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    def encode(self, img):
        if isinstance(self.backbone, VGG16BN):
            return self.backbone(img)
        b = self.backbone  # ResNet: E1 is the stem output before the max-pool
        stem = b.relu(getattr(b, b.norm1_name)(b.conv1(img)))
        return (stem,) + tuple(b(img))

    def forward(self, img):
        final, fpn = self.decode_head(self.encode(img), img.shape[2:])
        return {"out": final, "aux": [fpn]} if self.training else final

    @property
    def loss_terms(self) -> list[LossTerm]:
        return [LossTerm("out", "binary_cross_entropy"),
                LossTerm("aux.0", "binary_cross_entropy")]


def gatenet_resnet(depth: int = 50, *, context: str = "fold_aspp", norm: str = "bn"):
    """GateNet-ResNet50: GateNet-RGB-Saliency `model_GateNet_ResNet.py` (torchvision ResNet,
    7x7 stem, stage 4 at stride 1, so output stride 16; Fold-ASPP on stage 4). `context="pafem"`
    puts `segops.nn.PAFEM` (position attention per dilated branch) in Fold-ASPP's place."""
    backbone = ResNet(depth, strides=(1, 2, 2, 1), norm=norm)
    encoder = (backbone.conv1.out_channels,) + backbone.out_channels
    return GateNet(backbone, GateNetDecoder(encoder, context=context))


def gatenet_vgg16(*, context: str = "fold_aspp"):
    """GateNet-VGG16: GateNet-RGB-Saliency `model_GateNet_vgg16.py` (torchvision VGG-16-BN
    features without the last pool; transitions 32..512, 32-channel parallel branch)."""
    backbone = VGG16BN()
    decoder = GateNetDecoder(backbone.out_channels, (32, 64, 128, 256, 512),
                             parallel_channels=32, context=context)
    return GateNet(backbone, decoder)


def deeplabv3_smoothed(depth: int = 101, **kw):
    """DeepLabV3 with smoothed dilated convolutions: mmseg's deeplabv3_r{depth}-d8 with every
    dilated conv (backbone stages 3-4, ASPP branches 12/24/36) a `segops.nn.SmoothedDilatedConv2d`
    (separable-and-shared smoothing, Wang & Ji, KDD 2018; +(2r-1)^2 parameters per layer)."""
    return smooth_dilated_convs(deeplabv3(depth, **kw))


def acfnet(depth: int = 101, **kw):
    """ACFNet (paper only, see `segops.models.heads.paper_heads.ACFHead`): mmseg's ASPP
    (dilations 1, 12, 24, 36), coarse prediction supervised with weight 0.4 (our choice), class
    centres and attentional class features on the non-local operator."""
    return d8_segmentor(depth, ACFHead, dilations=(1, 12, 24, 36), acf_channels=256,
                        segmentor=MultiOutputEncoderDecoder, **kw)


def hmanet(depth: int = 101, **kw):
    """HMANet (paper only, `HMAHead`): class-augmented attention (SelfAttentionBlock over
    class centres) and region shuffle attention (InterlacedSparseAttention, 8 x 8 regions);
    coarse prediction supervised with weight 0.4 (our choice)."""
    return d8_segmentor(depth, HMAHead, key_channels=256, region_size=(8, 8),
                        segmentor=MultiOutputEncoderDecoder, **kw)


def reconet(depth: int = 101, **kw):
    """RecoNet (paper only, `RecoHead`): rank-64 tensor generation and reconstruction."""
    return d8_segmentor(depth, RecoHead, rank=64, **kw)


def ordnet(depth: int = 101, **kw):
    """OrdNet (paper only, `OrdHead`): middle-range attention in 8 x 8 patches (interlaced
    attention operator, short mode), reweighted long-range non-local block."""
    return d8_segmentor(depth, OrdHead, key_channels=256, patch_size=(8, 8), **kw)


def gpsnet(depth: int = 101, **kw):
    """GPSNet (paper only, `GPSHead`): gated dense dilated paths (rates 1, 2, 4, 8, 12, 16)."""
    return d8_segmentor(depth, GPSHead, dilations=(1, 2, 4, 8, 12, 16), growth=128, **kw)


for _name, _factory, _preset in (
        ("ocnet-asp_r101-d8", ocnet_asp, {"depth": 101}),
        ("ocnet-pyramid_r101-d8", ocnet_pyramid, {"depth": 101}),
        ("isnet_r101-d8", isnet, {"depth": 101}), ("gald_r101-d8", gald, {"depth": 101}),
        ("dgcnet_r101-d8", dgcnet, {"depth": 101}), ("dfn_r101", dfn, {"depth": 101}),
        ("gatenet_r50", gatenet_resnet, {"depth": 50}), ("gatenet_vgg16", gatenet_vgg16, {}),
        ("deeplabv3-sd_r101-d8", deeplabv3_smoothed, {"depth": 101}),
        ("acfnet_r101-d8", acfnet, {"depth": 101}), ("hmanet_r101-d8", hmanet, {"depth": 101}),
        ("reconet_r101-d8", reconet, {"depth": 101}), ("ordnet_r101-d8", ordnet, {"depth": 101}),
        ("gpsnet_r101-d8", gpsnet, {"depth": 101})):
    register_model(_name, _factory, **_preset)

for _method, _factory, _depths in (("psanet", psanet, (50, 101)),):
    for _depth in _depths:
        register_model(f"{_method}_r{_depth}-d8", _factory, depth=_depth)
