"""Backbone registry: `build_backbone(name, **kw)` and `list_backbones()`.

Each entry names the module and factory that builds the backbone alone (no segmentation head),
with the preset options of that variant; the module is imported only when built.
"""
from __future__ import annotations

import importlib

from torch import nn

# name -> (module under segops.models.backbones, factory, preset kwargs)
_BACKBONES: dict[str, tuple[str, str, dict]] = {
    "resnet18": ("resnet", "ResNet", dict(depth=18)),
    "resnet50-v1c": ("resnet", "ResNetV1c", dict(depth=50)),
    "resnet101-v1c": ("resnet", "ResNetV1c", dict(depth=101)),
    "xception39": ("xception39", "Xception39", {}),
    "df1": ("dfnet", "DFNet", dict(variant="df1")),
    "df2": ("dfnet", "DFNet", dict(variant="df2")),
    "xception-a": ("xception_a", "XceptionA", dict(variant="a")),
    "xception-b": ("xception_a", "XceptionA", dict(variant="b")),
    "vgg16-bn": ("vgg", "VGG16BN", {}),
    "efficientnet-b1-hyperseg": ("efficientnet_hyperseg", "EfficientNetHyperSeg",
                                 dict(variant="b1")),
    "efficientnet-b3-hyperseg": ("efficientnet_hyperseg", "EfficientNetHyperSeg",
                                 dict(variant="b3")),
    "stdc1": ("stdc", "STDCNet", dict(stdc_type="STDCNet1")),
    "stdc2": ("stdc", "STDCNet", dict(stdc_type="STDCNet2")),
}


def register_backbone(name: str, module: str, factory: str, **preset) -> None:
    """`build_backbone(name, **kw)` returns `segops.models.backbones.<module>.<factory>(**preset,
    **kw)` (kw wins)."""
    if name in _BACKBONES:
        raise ValueError(f"backbone {name!r} is registered twice")
    _BACKBONES[name] = (module, factory, preset)


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def build_backbone(name: str, **kwargs) -> nn.Module:
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")
    module, factory, preset = _BACKBONES[name]
    fn = getattr(importlib.import_module(f"{__name__}.{module}"), factory)
    return fn(**{**preset, **kwargs})
