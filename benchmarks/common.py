"""What a benchmark case is, its cost model, and the standard providers (docs/operators.md §4)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from segops._backend import REGISTRY

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Cost:
    """The work one call must do at least: FLOPs (a multiply-add is 2) and bytes of memory
    traffic (every input read once, every result written once)."""

    flops: float
    bytes: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


def mode_costs(fwd: Cost, bwd: Cost) -> dict:
    """The cost of each mode; a forward+backward step does both (nothing is shared for free)."""
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


@dataclass
class Case:
    """One operator at one shape.

    make(device, dtype) -> dict of keyword arguments (tensors and options) for every provider.
    grad: names of the tensor arguments that get gradients.
    providers: name -> fn(**kwargs) returning a tensor or a tuple (first floating tensors are
    differentiated).
    cost(kwargs) -> {mode: Cost}: the analytic FLOPs and minimum bytes of each mode, from the
    shapes only (it is called with meta tensors). Every provider of the case is judged against
    the same cost. None: FLOPs are counted on the reference provider instead (whole modules).
    anchor: a provider every other one's time is also reported against (a speed-of-light
    composition such as a plain convolution of the same shape).
    modes / step: the modes a case runs in and the step builder, for cases (whole models) whose
    modes are not those of an operator.
    """

    op: str
    label: str
    make: Callable[[str, torch.dtype], dict]
    grad: tuple
    providers: dict
    cost: Optional[Callable[[dict], dict]] = None
    params: dict = field(default_factory=dict)
    anchor: Optional[str] = None
    modes: tuple = MODES
    step: Optional[Callable] = None


def sample_maker(sample) -> Callable[[str, torch.dtype], dict]:
    """A Case's `make` from an OpSpec sample: its tensors on (device, dtype), then its options."""
    def make(device: str, dtype: torch.dtype) -> dict:
        kwargs = {k: v.to(device, dtype) for k, v in sample.tensors.items()}
        kwargs.update(sample.kwargs)
        return kwargs
    return make


def fused_providers(op: str, public_fn: Callable, device: str, dtype: torch.dtype) -> dict:
    """Every fused backend of `op` usable on (device, dtype), as providers named by backend."""
    out = {}
    for name in fused_backends(op, device, dtype):
        out[name] = (lambda b: (lambda **kw: public_fn(**kw, backend=b)))(name)
    return out


def fused_backends(op: str, device: str, dtype: torch.dtype) -> list[str]:
    status = REGISTRY[op].status(torch.device(device), dtype)
    return [name for name in ("triton", "cuda", "cpu") if status.get(name) is None]


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


def tensor_bytes(*tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


def io_bytes(inputs: list, outputs: float, grads: Optional[list] = None) -> tuple[float, float]:
    """(forward, backward) minimum traffic of an op reading `inputs` and writing `outputs`
    bytes. Forward: read the inputs, write the outputs. Backward: read the incoming gradients
    (as large as the outputs) and the inputs, write the gradients of `grads` (default: all)."""
    read = tensor_bytes(*inputs)
    written = tensor_bytes(*(inputs if grads is None else grads))
    return read + outputs, outputs + read + written


def attention_cost(kw, positions: float, attended: float, extra_fwd: float = 0.0,
                   extra_bwd: float = 0.0) -> dict:
    """Cost of a (query, key, value) attention where each of `positions` queries attends to
    `attended` keys: forward QKᵀ and PV (2·(Ck+Cv) FLOPs per query-key pair), backward dP = dO·Vᵀ,
    dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q (twice the forward). Softmax exponentials and other
    elementwise work are not counted (`extra_*` adds an op's own terms). Bytes: io_bytes of
    query, key, value (and any other tensor input) with an output of Cv channels per query."""
    ck, cv = kw["query"].shape[1], kw["value"].shape[1]
    pairs = float(positions) * attended
    inputs = [t for t in kw.values() if isinstance(t, torch.Tensor)]
    fwd_bytes, bwd_bytes = io_bytes(inputs, float(positions) * cv * kw["value"].element_size())
    return mode_costs(Cost(2.0 * pairs * (ck + cv) + extra_fwd, fwd_bytes),
                      Cost(4.0 * pairs * (ck + cv) + extra_bwd, bwd_bytes))
