"""Loading pretrained weights: `load_pretrained(model, checkpoint, key_map)`, used by
`segops.models.build(name, pretrained=...)`.

A checkpoint is a state_dict, or a dict holding one under "state_dict" (mmseg, mmengine) or
"model" (openseg.pytorch, the official Segmenter); a "module." prefix (DataParallel) is dropped.
Models with an mmseg config take mmseg's checkpoints unchanged. Models that follow another
official repository also take that repository's key layout, through the `KeyMap` registered
for them in `OFFICIAL_KEY_MAPS` (`official_key_map(name)`):

* `ocnet_r101-d8`: openseg.pytorch `BaseOCNet` checkpoints (`backbone.resinit.*`,
  `oc_module_pre.*`, `oc_module.*`, `cls.*`, `dsn.*`).
* `stlnet_r101-d8`: the STL block under the official `STL` module's own names
  (`conv_start.*`, `tem.*`, `ptfem.*`, which the official code gives the whole block); the
  official repository has no network around it, so the other keys are segops' (mmseg's).
* `gald_r101-d8`, `dgcnet_r101-d8`: lxtGH/GALD-DGCNet `GALD_res101` / `DualSeg_res101`
  checkpoints (`conv1.*` + `bn1.*` deep stem, `layer<i>.*`, `head.*`, `dsn.*`).
* `dfn_r101`: TorchSeg's DFN, VOC or Cityscapes (`backbone.conv1.*`, `global_context.*`,
  `smooth_*`, `cabs.*`, `border_*`).
* `isnet_r101-d8`: sssegmentation's ISNet (`backbone_net.*`, `bottleneck.*`, `ilc_net.*`,
  `slc_net.*`, `decoder_stage1/2.*`, `auxiliary_decoder.*`).
* `gatenet_r50`, `gatenet_vgg16`: GateNet-RGB-Saliency's `GateNet` of
  `model_GateNet_ResNet.py` / `model_GateNet_vgg16.py` (encoder at the top level: `conv1`,
  `bn1`, `layer<i>` / `conv1`..`conv5`).
* `hyperseg-m`, `hyperseg-s`: YuvalNirkin/hyperseg (`hyperseg_v1_0.py` / `_unify.py` with their
  Cityscapes configs), coordinate-grid buffers included. `hyperseg-l` (`hyperseg_v0_1.py`, which
  its VOC config builds) needs no map: its keys are the official ones.
* `ocnet-asp_r101-d8`: openseg.pytorch `AspOCNet` checkpoints (`backbone.resinit.*`,
  `context.{0,1}` = the 3x3 conv, `context.2.*` = `ASP_OC_Module`, `cls.*`, `dsn.*`).
* `ocnet-pyramid_r101-d8`: openseg.pytorch's `PyramidOCNet` (last at commit 5ec9f10:
  `conv_3x3.*`, `context.stages.*`, `context.conv_bn_dropout.*`, `cls_head.*`, `dsn_head.*`) plus
  `context.up_dr.*`, the branch that openseg leaves commented out and OCNet.pytorch (and segops)
  concatenate instead of the backbone's output: a checkpoint of that openseg commit lacks
  `up_dr` and does not load strictly; OCNet.pytorch's own checkpoints (one shared key/query
  conv, InPlaceABN) do not fit this model either.
* `bisenetv1_xception39`: TorchSeg checkpoints ({"model": ...}) load unchanged (same names).
* `dfnet-df1`, `dfnet-df2`: SFNet's (lxtGH/SFSegNets) `DFSegnet` checkpoints, trunk `dfv1` /
  `dfv2` ({"state_dict": ...} with DataParallel's "module." prefix), load unchanged (same
  names, `backbone.stage*`, `ppm.*`, `cc3/4/5`, `fn3/4`, `fc.aux.*`).
* `semask-fpn_swin-{t,s,b,l}` (SeMask-FPN, mmseg 0.x) and `semask-mask2former-msfapn_swin-l`
  (SeMask-Mask2Former, detectron2): the official Swin names of the backbone
  (`backbone.layers.<i>.blocks.<j>.{attn,mlp.fc1,mlp.fc2}`, `backbone.patch_embed.proj`) become
  mmseg's, with patch merging's channels reordered (`SwinOfficialKeyMap`); the semantic layers
  and the heads already have the official names; detectron2's `criterion.empty_weight` is
  dropped.

The OpenSeg maps take openseg's `bn_type` "torchbn" layout (BNReLU = Sequential(BN, ReLU), so
BN keys end in `.1.0.*`); checkpoints trained with "inplace_abn" name that BN `.1.*` and used a
leaky ReLU, which segops' OCNets do not have.

Loading is strict, except that BatchNorm `num_batches_tracked` counters a checkpoint lacks
keep their value (they do not affect eval or train outputs with a momentum set).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
from torch import nn


@dataclass(frozen=True)
class KeyMap:
    """Renames from an official repository's state_dict keys to segops': `rules` are
    (regex, replacement) pairs tried in order, the first match renames a key; keys no rule
    matches are kept as they are."""

    source: str
    rules: tuple[tuple[str, str], ...]

    def apply(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        compiled = [(re.compile(pattern), repl) for pattern, repl in self.rules]
        renamed = {}
        for key, value in state.items():
            for pattern, repl in compiled:
                new_key, hits = pattern.subn(repl, key, count=1)
                if hits:
                    key = new_key
                    break
            renamed[key] = value
        return renamed


def _conv_bn_relu(official: str, ours: str) -> tuple[tuple[str, str], ...]:
    """openseg's `Sequential(Conv2d, BNReLU)` (BNReLU = `Sequential(BatchNorm2d, ReLU)`) at
    `official` -> a segops ConvModule at `ours`."""
    return ((rf"^{official}\.0\.", f"{ours}.conv."), (rf"^{official}\.1\.0\.", f"{ours}.bn."))


_OPENSEG_DEEPBASE_STEM = tuple(
    (rf"^backbone\.resinit\.{layer}\.", f"backbone.stem.{index}.")
    for layer, index in (("conv1", 0), ("bn1", 1), ("conv2", 3), ("bn2", 4), ("conv3", 6),
                         ("bn3", 7)))


def _object_context_stages(official: str, ours: str) -> tuple[tuple[str, str], ...]:
    """openseg's `stages` of SelfAttentionBlock2D at `official` -> segops' at `ours`: each of
    f_key / f_query is Conv2d, BNReLU, Conv2d, BNReLU (two ConvModules); f_value and W keep
    their names."""
    pairs = ((r"0\.", "0.conv."), (r"1\.0\.", "0.bn."), (r"2\.", "1.conv."), (r"3\.0\.", "1.bn."))
    return tuple((rf"^{official}\.(\d+)\.(f_key|f_query)\.{index}", rf"{ours}.\1.\2.{module}")
                 for index, module in pairs) + ((rf"^{official}\.", f"{ours}."),)


def _openseg_classifiers(cls: str, dsn: str, dsn_classifier: int) -> tuple[tuple[str, str], ...]:
    """openseg's classifier `cls` and its auxiliary `dsn` head (Conv2d, BNReLU, [Dropout2d,]
    classifier at index `dsn_classifier`)."""
    return (((rf"^{cls}\.", "decode_head.conv_seg."),)
            + _conv_bn_relu(dsn, "auxiliary_head.convs.0")
            + ((rf"^{dsn}\.{dsn_classifier}\.", "auxiliary_head.conv_seg."),))


def _openseg_object_context(pre: str, module: str, heads: tuple,
                            branches: tuple = ()) -> tuple[tuple[str, str], ...]:
    """An openseg OCNet whose 3x3 conv `pre` feeds an object-context module at `module` (its
    `stages` and `conv_bn_dropout`; `branches` rename any other of its parts), with the
    classifiers `heads` = (cls, dsn, dsn classifier index)."""
    return (_OPENSEG_DEEPBASE_STEM
            + _conv_bn_relu(pre, "decode_head.oc_module_pre")
            + _object_context_stages(rf"{module}\.stages", "decode_head.oc_module.stages")
            + branches
            + _conv_bn_relu(rf"{module}\.conv_bn_dropout", "decode_head.oc_module.conv_bn")
            + _openseg_classifiers(*heads))


OCNET_OPENSEG = KeyMap(
    source="openseg.pytorch lib/models/nets/ocnet.py BaseOCNet (deepbase_resnet101_dilated8)",
    rules=_openseg_object_context(r"oc_module_pre", r"oc_module", ("cls", "dsn", 2)))

# AspOCNet.context = Sequential(Conv2d, BNReLU, ASP_OC_Module); the module's `context` branch is
# Sequential(Conv2d, BNReLU, BaseOC_Context_Module), whose BN sits in `conv_bn_dropout.0`.
OCNET_ASP_OPENSEG = KeyMap(
    source="openseg.pytorch lib/models/nets/ocnet.py AspOCNet, lib/models/modules/asp_oc_block.py",
    rules=_OPENSEG_DEEPBASE_STEM
    + _conv_bn_relu(r"context", "decode_head.oc_module_pre")
    + _conv_bn_relu(r"context\.2\.context", "decode_head.oc_module.context.0")
    + _object_context_stages(r"context\.2\.context\.2\.stages",
                             "decode_head.oc_module.context.1.stages")
    + ((r"^context\.2\.context\.2\.conv_bn_dropout\.0\.0\.", "decode_head.oc_module.context.1.bn."),)
    + _conv_bn_relu(r"context\.2\.conv2", "decode_head.oc_module.conv2")
    + sum((_conv_bn_relu(rf"context\.2\.conv{i + 3}", f"decode_head.oc_module.dilated.{i}")
           for i in range(3)), ())
    + _conv_bn_relu(r"context\.2\.conv_bn_dropout", "decode_head.oc_module.conv_bn_dropout")
    + _openseg_classifiers("cls", "dsn", 2))

# openseg removed PyramidOCNet after commit 5ec9f10; there its Pyramid_OC_Module concatenates the
# backbone's output where OCNet.pytorch (and segops) concatenate `up_dr` of the 3x3 conv's output,
# a branch openseg keeps commented out under that name.
OCNET_PYRAMID_OPENSEG = KeyMap(
    source="openseg.pytorch@5ec9f10 lib/models/nets/ocnet.py PyramidOCNet, "
           "lib/models/modules/pyramid_oc_block.py (with OCNet.pytorch's up_dr branch)",
    rules=_openseg_object_context(
        r"conv_3x3", r"context", ("cls_head", "dsn_head", 3),
        branches=_conv_bn_relu(r"context\.up_dr", "decode_head.oc_module.up_dr")))

STLNET_OFFICIAL = KeyMap(
    source="lanyunzhu99/Learning-Statistical-Texture-for-Semantic-Segmentation STLNet.py STL",
    rules=((r"^(conv_start|tem|ptfem)\.", r"decode_head.stl.\1."),))


def _conv_bn(official: str, ours: str) -> tuple[tuple[str, str], ...]:
    """A plain `Sequential(Conv2d, BatchNorm2d, ...)` at `official` -> a segops ConvModule
    at `ours` (both may hold regex groups / back-references)."""
    return ((rf"^{official}\.0\.", rf"{ours}.conv."), (rf"^{official}\.1\.", rf"{ours}.bn."))


def _deep_stem(official: str, ours: str) -> tuple[tuple[str, str], ...]:
    """The deep stem written as `conv1 = Sequential(conv, BN, ReLU, conv, BN, ReLU, conv)` plus
    a separate `bn1` (TorchSeg, GALD-DGCNet) -> ResNetV1c's `stem` Sequential."""
    return ((rf"^{official}conv1\.([0-6])\.", rf"{ours}stem.\1."),
            (rf"^{official}bn1\.", f"{ours}stem.7."))


GALD_DGCNET_OFFICIAL = KeyMap(
    source="lxtGH/GALD-DGCNet libs/models/GALDNet.py GALDNet (GALD_res101) and "
           "libs/models/DualGCNNet.py ResNet (DualSeg_res101)",
    rules=_deep_stem("", "backbone.")
    + ((r"^layer", "backbone.layer"), (r"^head\.bottleneck\.3\.", "decode_head.conv_seg."))
    + _conv_bn(r"head\.(conva|convb|bottleneck|a2block\.down|a2block\.local_attention\.dconv\d)",
               r"decode_head.\1")
    # the rest of the head (SpatialCGNL, LocalAttenModule's sigmoid side, DualGCN) keeps its names
    + ((r"^head\.", "decode_head."),)
    + _conv_bn(r"dsn", "auxiliary_head.convs.0")
    # GALD's dsn has a ReLU before its dropout (classifier at 4), DGCNet's does not (at 3)
    + ((r"^dsn\.[34]\.", "auxiliary_head.conv_seg."),))

DFN_TORCHSEG = KeyMap(
    source="ycszen/TorchSeg model/dfn/voc.dfn.R101_v1c/network.py DFN "
           "(furnace/base_model/resnet.py resnet101, deep_stem=True)",
    rules=_deep_stem(r"backbone\.", "backbone.")
    + ((r"^cabs\.(\d+)\.channel_attention\.", r"decode_head.cabs.\1."),
       (r"^(global_context|smooth_|border_)", r"decode_head.\1")))

ISNET_SSSEGMENTATION = KeyMap(
    source="SegmentationBLWX/sssegmentation ssseg/modules/models/segmentors/isnet/isnet.py ISNet "
           "(configs/isnet/isnet_resnet101os8_cityscapes.py)",
    rules=((r"^backbone_net\.", "backbone."),)
    + _conv_bn(r"(ilc_net|slc_net)\.correlate_net\.(key|query)_project\.(\d)",
               r"decode_head.\1.correlate_net.\2_project.\3")
    + _conv_bn(r"((?:ilc_net|slc_net)\.correlate_net\.(?:value|out)_project"
               r"|(?:ilc_net\.|slc_net\.)?bottleneck)", r"decode_head.\1")
    + _conv_bn(r"decoder_stage1", "decode_head.decoder_stage1.0")
    + ((r"^decoder_stage1\.4\.", "decode_head.decoder_stage1.2."),
       (r"^decoder_stage2\.1\.", "decode_head.conv_seg."))
    + _conv_bn(r"auxiliary_decoder", "auxiliary_head.convs.0")
    + ((r"^auxiliary_decoder\.4\.", "auxiliary_head.conv_seg."),))

_GATENET_DECODER = ((r"^(attention_feature|dem|output|out_res)", r"decode_head.\1"),)

GATENET_RESNET_OFFICIAL = KeyMap(
    source="Xiaoqi-Zhao-DLUT/GateNet-RGB-Saliency model_GateNet_ResNet.py GateNet",
    rules=((r"^(conv1|bn1|layer\d)\.", r"backbone.\1."),) + _GATENET_DECODER)

# model_GateNet_vgg16.py slices torchvision's vgg16_bn().features into conv1..conv5
_VGG16BN_SLICES = ((1, 0, 6), (2, 6, 13), (3, 13, 23), (4, 23, 33), (5, 33, 43))

GATENET_VGG16_OFFICIAL = KeyMap(
    source="Xiaoqi-Zhao-DLUT/GateNet-RGB-Saliency model_GateNet_vgg16.py GateNet",
    rules=tuple((rf"^conv{stage}\.{i - start}\.", f"backbone.features.{i}.")
                for stage, start, stop in _VGG16BN_SLICES for i in range(start, stop))
    + _GATENET_DECODER)

HYPERSEG_OFFICIAL = KeyMap(
    source="YuvalNirkin/hyperseg hyperseg/models/hyperseg_v1_0.py HyperGen (-m) and "
           "hyperseg_v1_0_unify.py (-s)",
    # a 1x1 level is MetaSequential(MetaSequential(hyper conv, BN, ReLU)) there, one level
    # less here; the inverted-residual levels and everything else keep their names
    rules=((r"^decoder\.(level_\d+|level_blocks\.\d+)\.0\.([01])\.", r"decoder.\1.\2."),))

# TorchSeg's module names are segops' (its checkpoints hold {"model": state_dict, "optimizer",
# "epoch", "iteration"}).
BISENET_X39_TORCHSEG = KeyMap(
    source="ycszen/TorchSeg model/bisenet/cityscapes.bisenet.X39/network.py BiSeNet",
    rules=())

# SFNet's DFSegnet and its dfnetv1 / dfnetv2 trunks carry segops' module names.
DFSEG_SFNET = KeyMap(
    source="lxtGH/SFSegNets network/dfnet.py DFSegnet (trunks dfnetv1 / dfnetv2; PSPModule, "
           "Aux_Module of network/nn/operators.py)",
    rules=())


_SWIN_OFFICIAL_RENAMES = (
    (r"^backbone\.patch_embed\.proj\.", "backbone.patch_embed.projection."),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.", r"backbone.stages.\1.blocks.\2.attn.w_msa."),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"backbone.stages.\1.blocks.\2.ffn.layers.0.0."),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"backbone.stages.\1.blocks.\2.ffn.layers.1."),
    (r"^backbone\.layers\.", "backbone.stages."))


@dataclass(frozen=True)
class SwinOfficialKeyMap(KeyMap):
    """The official Swin Transformer's backbone names (`layers.<i>`, `attn.*`, `mlp.fc1/fc2`,
    `patch_embed.proj`) -> mmseg's, which segops' Swin uses (the renames of mmseg's
    `swin2mmseg` conversion); patch merging's LayerNorm and reduction also get their input
    channels reordered, from the official concatenation of the 2x2 neighbours (C channels
    each) to nn.Unfold's order (`unfold_order`). Keys matching a `dropped` pattern (training
    buffers such as Mask2Former's `criterion.empty_weight`) are left out."""

    rules: tuple[tuple[str, str], ...] = _SWIN_OFFICIAL_RENAMES
    dropped: tuple[str, ...] = ()

    def apply(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kept = {}
        for key, value in state.items():
            if any(re.search(pattern, key) for pattern in self.dropped):
                continue
            if re.match(r"backbone\.layers\.\d+\.downsample\.(norm|reduction)\.", key):
                value = value[..., unfold_order(value.shape[-1])]
            kept[key] = value
        return super().apply(kept)


def unfold_order(channels: int) -> torch.Tensor:
    """For each of patch merging's `channels` input channels in nn.Unfold's layout (channel c
    of 2x2 offset k at 4c + k, offsets row-major), its index in the official Swin layout (four
    blocks of C channels, offsets (0, 0), (1, 0), (0, 1), (1, 1): row-major offset k is block
    [0, 2, 1, 3][k])."""
    c = channels // 4
    block = torch.tensor([0, 2, 1, 3])
    return (block.view(1, 4) * c + torch.arange(c).view(c, 1)).flatten()


SEMASK_FPN_OFFICIAL = SwinOfficialKeyMap(
    source="Picsart-AI-Research/SeMask-Segmentation SeMask-FPN (mmseg 0.x EncoderDecoder: "
    "mmseg/models/backbones/semask_swin_transformer.py, decode_heads/branch_fpn_head.py)")

SEMASK_MASK2FORMER_OFFICIAL = SwinOfficialKeyMap(
    source="Picsart-AI-Research/SeMask-Segmentation SeMask-FAPN/SeMask-Mask2Former (detectron2 "
    "SeMaskMaskFormer: D2SeMaskSwinTransformer, BranchMaskFormerHead, "
    "MSDeformAttnPixelFANDecoder, MultiScaleMaskedTransformerDecoder)",
    dropped=(r"^criterion\.",))

OFFICIAL_KEY_MAPS: dict[str, KeyMap] = {
    "ocnet_r101-d8": OCNET_OPENSEG,
    "stlnet_r101-d8": STLNET_OFFICIAL,
    "gald_r101-d8": GALD_DGCNET_OFFICIAL,
    "dgcnet_r101-d8": GALD_DGCNET_OFFICIAL,
    "dfn_r101": DFN_TORCHSEG,
    "isnet_r101-d8": ISNET_SSSEGMENTATION,
    "gatenet_r50": GATENET_RESNET_OFFICIAL,
    "gatenet_vgg16": GATENET_VGG16_OFFICIAL,
    "hyperseg-m": HYPERSEG_OFFICIAL,
    "hyperseg-s": HYPERSEG_OFFICIAL,
    "ocnet-asp_r101-d8": OCNET_ASP_OPENSEG,
    "ocnet-pyramid_r101-d8": OCNET_PYRAMID_OPENSEG,
    "bisenetv1_xception39": BISENET_X39_TORCHSEG,
    "dfnet-df1": DFSEG_SFNET,
    "dfnet-df2": DFSEG_SFNET,
    **{f"semask-fpn_swin-{v}": SEMASK_FPN_OFFICIAL for v in "tsbl"},
    "semask-mask2former-msfapn_swin-l": SEMASK_MASK2FORMER_OFFICIAL,
}


def official_key_map(name: str) -> Optional[KeyMap]:
    """The official-repository key map of model `name`, or None (mmseg's layout only)."""
    return OFFICIAL_KEY_MAPS.get(name)


def read_state_dict(checkpoint: Union[str, Mapping]) -> dict[str, torch.Tensor]:
    """The state_dict of a checkpoint path or dict (see the module docstring for the layouts)."""
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for entry in ("state_dict", "model"):
        if isinstance(checkpoint.get(entry), Mapping):
            checkpoint = checkpoint[entry]
            break
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint.items()}


def load_pretrained(model: nn.Module, checkpoint: Union[str, Mapping],
                    key_map: Optional[KeyMap] = None) -> nn.Module:
    """Load `checkpoint` (a path or a dict) into `model` strictly, renaming its keys with
    `key_map` first when they are not already segops' own. Returns the model."""
    state = read_state_dict(checkpoint)
    own = model.state_dict()
    if key_map is not None and not set(state) <= set(own):
        state = key_map.apply(state)
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    model.load_state_dict(state)
    return model
