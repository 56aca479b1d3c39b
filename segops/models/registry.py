"""Model registry: `build(name, ...)` and `list_models()`.

Config names follow mmsegmentation's where it has the model (e.g. "ccnet_r50-d8",
"ocrnet_hr48"), so users can find the reference config.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a factory `fn(num_classes=..., backend=..., **kw) -> nn.Module` under `name`."""
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    _import_all()
    return sorted(_MODELS)


def build(name: str, num_classes: int | None = None, backend: str = "auto",
          pretrained: str | None = None, **kwargs) -> nn.Module:
    """Build model `name`. `num_classes=None` keeps the reference config's class count.

    `backend` is passed to every segops layer in the model. `pretrained` is a path to a
    state_dict (or an mmseg checkpoint with a "state_dict" entry) to load.
    """
    _import_all()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; segops.models.list_models() lists the "
                         f"{len(_MODELS)} known ones")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = _MODELS[name](backend=backend, **kwargs)
    if pretrained is not None:
        import torch
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        model.load_state_dict(state)
    return model


def _import_all() -> None:
    # Importing the segmentor modules runs their @register_model decorators.
    from segops.models import segmentors  # noqa: F401
