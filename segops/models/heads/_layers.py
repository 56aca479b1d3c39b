"""Late lookup of segops layers and ops, so that a missing one fails with a clear message where
it is needed (layers: at build time; ops: at the first forward) instead of breaking
`import segops.models`."""
from __future__ import annotations

from typing import Callable


def nn_layer(name: str) -> type:
    import segops.nn as snn
    cls = getattr(snn, name, None)
    if cls is None:
        raise RuntimeError(f"segops.nn.{name} is not available in this build of segops; "
                           "the model that needs it cannot be built")
    return cls


def op(name: str) -> Callable:
    import segops.ops as sops
    fn = getattr(sops, name, None)
    if fn is None:
        raise RuntimeError(f"segops.{name} is not available in this build of segops; "
                           "the model that needs it cannot be built")
    return fn


def norm_kwargs(cls: type, norm) -> dict:
    """The norm argument for a segops.nn layer: `norm_cfg=dict(type=...)` for layers with mmcv's
    constructor, `norm=<name>` for layers using this package's names; nothing if it takes neither."""
    import inspect
    params = inspect.signature(cls).parameters
    if "norm_cfg" in params:
        if norm is None:
            return {"norm_cfg": None}
        kind = {"bn": "BN", "syncbn": "SyncBN", "gn": "GN"}[norm]
        cfg = dict(type=kind, requires_grad=True)
        if kind == "GN":
            cfg["num_groups"] = 32
        return {"norm_cfg": cfg}
    if "norm" in params:
        return {"norm": norm}
    return {}
