"""What a benchmark case is, and the standard providers (docs/operators.md §4)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from segops._backend import REGISTRY

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Case:
    """One operator at one shape.

    make(device, dtype) -> dict of keyword arguments (tensors and options) for every provider.
    grad: names of the tensor arguments that get gradients.
    providers: name -> fn(**kwargs) returning a tensor or a tuple (first floating tensors are
    differentiated). flops/bytes(kwargs) -> forward FLOPs and ideal forward bytes moved
    (backward is counted as 2x the forward's FLOPs and bytes for throughput numbers).
    """

    op: str
    label: str
    make: Callable[[str, torch.dtype], dict]
    grad: tuple
    providers: dict
    flops: Optional[Callable[[dict], float]] = None
    bytes: Optional[Callable[[dict], float]] = None
    params: dict = field(default_factory=dict)


def sample_maker(sample) -> Callable[[str, torch.dtype], dict]:
    """A Case's `make` from an OpSpec sample: its tensors on (device, dtype), then its options."""
    def make(device: str, dtype: torch.dtype) -> dict:
        kwargs = {k: v.to(device, dtype) for k, v in sample.tensors.items()}
        kwargs.update(sample.kwargs)
        return kwargs
    return make


def fused_providers(op: str, public_fn: Callable, device: str, dtype: torch.dtype) -> dict:
    """Every fused backend of `op` usable on (device, dtype), as providers named by backend."""
    status = REGISTRY[op].status(torch.device(device), dtype)
    out = {}
    for name in ("triton", "cuda", "cpu"):
        if status.get(name) is None:
            out[name] = (lambda b: (lambda **kw: public_fn(**kw, backend=b)))(name)
    return out


def standard_providers(op: str, reference: Callable, public_fn: Callable, device: str,
                       dtype: torch.dtype, extra: Optional[dict] = None) -> dict:
    """reference, reference+compile, any extra (e.g. an SDPA composition), fused backends."""
    providers = {"reference": reference,
                 "reference+compile": _compiled(reference)}
    providers.update(extra or {})
    providers.update(fused_providers(op, public_fn, device, dtype))
    return providers


def _compiled(fn: Callable) -> Callable:
    cache = {}

    def run(**kw):
        if "fn" not in cache:
            cache["fn"] = torch.compile(fn, dynamic=False)
        return cache["fn"](**kw)
    return run


def case_shapes(module, device: str, quick: bool) -> list:
    """A case module's QUICK_SHAPES, GPU_SHAPES or CPU_SHAPES for this run."""
    return module.QUICK_SHAPES if quick else (module.GPU_SHAPES if device == "cuda"
                                              else module.CPU_SHAPES)


def attention_bytes(kw) -> float:
    """Ideal bytes moved by a (query, key, value) attention: read the three, write the output."""
    return tensor_bytes(kw["query"], kw["key"], kw["value"]) + tensor_bytes(kw["value"])


def tensor_bytes(*tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))
