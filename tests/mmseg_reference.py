"""mmsegmentation itself, as a reference for the zoo's tests.

mmseg 1.2.2 is installed with mmcv-lite (pinned in requirements.txt), which has no compiled
operators: `mmcv._ext` is replaced by a stand-in before mmseg is imported, so building a model
works and only a call into a compiled mmcv operator fails (with NotImplementedError). Every
model the zoo compares against has a pure-PyTorch path.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import types


class _MissingMmcvOps(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name}: compiled mmcv operators are not installed")
        return missing


@functools.lru_cache(maxsize=None)
def _registry():
    sys.modules.setdefault("mmcv._ext", _MissingMmcvOps("mmcv._ext"))
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules()
    return MODELS


def config_path(relpath: str) -> str:
    """Path of one of mmseg's bundled configs, e.g. "pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py"."""
    import mmseg
    return os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", relpath)


def _sync_bn_to_bn(cfg) -> None:
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            if key == "norm_cfg" and isinstance(value, dict) and value.get("type") == "SyncBN":
                value["type"] = "BN"
            else:
                _sync_bn_to_bn(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            _sync_bn_to_bn(value)


def model_config(relpath: str, **overrides):
    """The `model` entry of an mmseg config, SyncBN replaced by BN, without a data
    preprocessor; `overrides` are merged into it (mmengine's dict merge)."""
    from mmengine.config import Config
    cfg = Config.fromfile(config_path(relpath))
    model = cfg.model
    model.data_preprocessor = None
    _sync_bn_to_bn(model)
    if overrides:
        model.merge_from_dict(overrides) if hasattr(model, "merge_from_dict") else model.update(overrides)
    return model


def build_mmseg(relpath: str, **overrides):
    """mmseg's model for config `relpath`, on CPU (weights as mmseg initialises them)."""
    return _registry().build(model_config(relpath, **overrides))


@contextlib.contextmanager
def on_meta():
    """Every parameter and buffer registered inside lives on the meta device: builds a model's
    state_dict layout (keys and shapes) without allocating or initialising its weights. Unlike
    `with torch.device("meta")`, constructors that read values (mmseg's `linspace(...).item()`
    drop-path schedules) still run on CPU."""
    from torch import nn
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer_on_meta(module, name, tensor, persistent=True):
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_on_meta, buffer_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
