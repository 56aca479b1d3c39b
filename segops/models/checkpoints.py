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

OCNET_OPENSEG = KeyMap(
    source="openseg.pytorch lib/models/nets/ocnet.py BaseOCNet (deepbase_resnet101_dilated8)",
    rules=_OPENSEG_DEEPBASE_STEM
    + _conv_bn_relu(r"oc_module_pre", "decode_head.oc_module_pre")
    # each of f_key / f_query: Conv2d, BNReLU, Conv2d, BNReLU -> two ConvModules
    + ((r"^oc_module\.stages\.(\d+)\.(f_key|f_query)\.0\.", r"decode_head.oc_module.stages.\1.\2.0.conv."),
       (r"^oc_module\.stages\.(\d+)\.(f_key|f_query)\.1\.0\.", r"decode_head.oc_module.stages.\1.\2.0.bn."),
       (r"^oc_module\.stages\.(\d+)\.(f_key|f_query)\.2\.", r"decode_head.oc_module.stages.\1.\2.1.conv."),
       (r"^oc_module\.stages\.(\d+)\.(f_key|f_query)\.3\.0\.", r"decode_head.oc_module.stages.\1.\2.1.bn."),
       (r"^oc_module\.stages\.", "decode_head.oc_module.stages."))
    + _conv_bn_relu(r"oc_module\.conv_bn_dropout", "decode_head.oc_module.conv_bn")
    + ((r"^cls\.", "decode_head.conv_seg."),)
    + _conv_bn_relu(r"dsn", "auxiliary_head.convs.0")
    + ((r"^dsn\.2\.", "auxiliary_head.conv_seg."),))

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
