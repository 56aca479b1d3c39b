"""mmsegmentation itself, as a reference for the zoo's tests.

mmseg 1.2.2 is installed with mmcv-lite (pinned in requirements.txt), which has no compiled
operators: `mmcv._ext` is replaced by a stand-in before mmseg is imported, so building a model
works and only a call into a compiled mmcv operator fails (with NotImplementedError). Every
model the zoo compares against has a pure-PyTorch path, except PSANet's point-wise spatial
attention mask, which the stand-in computes in PyTorch (`psamask_forward`, forward only).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import types


def psamask_forward(input, output, *, psa_type, num_, h_feature, w_feature, h_mask, w_mask,
                    half_h_mask, half_w_mask):
    """mmcv's PSAMask (psa_type 0: collect, 1: distribute) into the zeroed `output`
    (N, H*W, H, W): the mask entry (i, j) of the (h_mask, w_mask) window centred on feature
    pixel (h, w) belongs to pixel (h + i - half_h_mask, w + j - half_w_mask) when that lies in
    the feature map; "collect" stores it at [that pixel, (h, w)], "distribute" at [(h, w), that
    pixel]."""
    out = output.view(num_, h_feature, w_feature, h_feature, w_feature)
    masks = input.view(num_, h_mask, w_mask, h_feature, w_feature)
    for h in range(h_feature):
        i0, i1 = max(0, half_h_mask - h), min(h_mask, h_feature + half_h_mask - h)
        for w in range(w_feature):
            j0, j1 = max(0, half_w_mask - w), min(w_mask, w_feature + half_w_mask - w)
            window = masks[:, i0:i1, j0:j1, h, w]
            rows = slice(i0 + h - half_h_mask, i1 + h - half_h_mask)
            cols = slice(j0 + w - half_w_mask, j1 + w - half_w_mask)
            if psa_type == 0:
                out[:, rows, cols, h, w] = window
            else:
                out[:, h, w, rows, cols] = window


class _MissingMmcvOps(types.ModuleType):
    psamask_forward = staticmethod(psamask_forward)

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
