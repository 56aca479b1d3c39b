"""Late lookup of segops layers and ops, so a model whose layer is missing fails at build time
with a clear message instead of breaking `import segops.models`."""
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
