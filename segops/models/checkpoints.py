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

OFFICIAL_KEY_MAPS: dict[str, KeyMap] = {
    "ocnet_r101-d8": OCNET_OPENSEG,
    "stlnet_r101-d8": STLNET_OFFICIAL,
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
