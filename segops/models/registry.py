"""Model registry: `build(name, ...)` and `list_models()`.

Config names follow mmsegmentation's where it has the model (e.g. "ccnet_r50-d8",
"ocrnet_hr48"), so users can find the reference config. Each segmentor module registers its
models with `register_model(name, factory, **preset)` at its end.
"""
from __future__ import annotations

import threading
from typing import Callable

from torch import nn

from segops import BACKENDS, use_backend

_MODELS: dict[str, tuple[Callable[..., nn.Module], dict]] = {}


def register_model(name: str, factory: Callable[..., nn.Module], **preset) -> None:
    """Register `name`: `build(name, **kw)` returns `factory(**preset, **kw)` (kw wins), where
    the factory takes `num_classes` and its own options (no backend: see `build`)."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = (factory, preset)


def list_models() -> list[str]:
    _import_all()
    return sorted(_MODELS)


def build(name: str, num_classes: int | None = None, backend: str = "auto",
          pretrained: str | None = None, **kwargs) -> nn.Module:
    """Build model `name`. `num_classes=None` keeps the reference config's class count.

    `backend` other than "auto" makes the model's forward run under
    `segops.use_backend(backend)` (see `run_on_backend`); with "auto" the segops layers follow
    the caller's `segops.use_backend` / SEGOPS_BACKEND. `pretrained` is a checkpoint path (or
    dict), loaded strictly by `segops.models.checkpoints.load_pretrained`: mmseg's checkpoints
    (a "state_dict" entry) for the models with an mmseg config, and for the models that follow
    another official repository also that repository's key layout (see `OFFICIAL_KEY_MAPS`).
    """
    _import_all()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; segops.models.list_models() lists the "
                         f"{len(_MODELS)} known ones")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    factory, preset = _MODELS[name]
    model = factory(**{**preset, **kwargs})
    if backend != "auto":
        run_on_backend(model, backend)
    if pretrained is not None:
        from segops.models.checkpoints import load_pretrained, official_key_map
        load_pretrained(model, pretrained, official_key_map(name))
    return model


class _BackendScope:
    """A forward pre-hook / post-hook pair entering and leaving `use_backend(name)`. The hooks
    hold no parameters or buffers, so the model's state_dict is unchanged."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._local = threading.local()  # the open contexts of each thread (nested calls)

    def enter(self, module, args) -> None:
        scope = use_backend(self.name)
        scope.__enter__()
        self._open().append(scope)

    def exit(self, module, args, output) -> None:
        self._open().pop().__exit__(None, None, None)

    def _open(self) -> list:
        if not hasattr(self._local, "scopes"):
            self._local.scopes = []
        return self._local.scopes

    def __getstate__(self):  # thread-local state does not pickle (or deep-copy)
        return {"name": self.name}

    def __setstate__(self, state) -> None:
        self.__init__(state["name"])


def run_on_backend(model: nn.Module, backend: str) -> nn.Module:
    """Make every `model(...)` call run its segops operators on `backend` (an explicit
    `backend=` of a segops layer inside still wins). Returns the model. Calls to submodules on
    their own are not covered."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    scope = _BackendScope(backend)
    model.register_forward_pre_hook(scope.enter)
    model.register_forward_hook(scope.exit, always_call=True)
    return model


def _import_all() -> None:
    # Importing the segmentor modules runs their register_model calls.
    from segops.models import segmentors  # noqa: F401
