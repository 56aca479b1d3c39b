"""Backend selection shared by every operator (docs/operators.md §1).

Precedence: an explicit `backend=` argument, then the innermost `use_backend(...)` context,
then the SEGOPS_BACKEND environment variable (read at each call), then the `auto` rule:
the fused backend for the tensor's device (triton on CUDA, cpu on CPU), falling back to
`reference` with one warning per (op, device type, reason). A backend that is named
explicitly (argument, context or environment) and cannot run raises instead of falling back.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from segops import _ext

BACKENDS = ("reference", "triton", "cpu", "cuda")
_VALID = BACKENDS + ("auto",)
_local = threading.local()
_warned: set = set()


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in _VALID:
        raise ValueError(f"{what} must be one of {', '.join(_VALID)}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed segops ops on backend `name` unless a call names its own."""
    _check_name(name, "use_backend(name)")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def requested_backend(backend: str = "auto") -> str:
    """The backend a call asks for after applying context and environment overrides."""
    _check_name(backend, "backend")
    if backend != "auto":
        return backend
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("SEGOPS_BACKEND", "").strip()
    if env:
        return _check_name(env, "SEGOPS_BACKEND")
    return "auto"


def triton_status(device: torch.device) -> str | None:
    """None when Triton kernels can run on `device`, else the reason they cannot."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return f"Triton does not run on {device.type} tensors"


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


@dataclass
class FusedBackend:
    """One fused implementation of an operator.

    `forward`/`backward` are callables (segops.ops._spec builds them so that no Triton code is
    imported, and no device is queried, at `import segops`). `module` is the Python module the
    implementation lives in, if any (its absence makes the backend unavailable); `kernels` are
    the segops_C kernel names a C++/CUDA backend needs.
    """

    name: str
    forward: Callable
    backward: Callable
    dtypes: tuple = (torch.float32, torch.float64)
    kernels: tuple = ()
    module: str | None = None

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype | None) -> str | None:
        if self.module is not None and not _module_exists(self.module):
            reason = f"{self.module} is not implemented"
        elif self.name == "triton":
            reason = triton_status(device)
        elif self.name in ("cpu", "cuda"):
            key = "CPU" if self.name == "cpu" else "CUDA"
            if device.type != self.name:
                reason = f"the {self.name} backend runs on {self.name} tensors, got {device.type}"
            elif not _ext.load():
                reason = _ext.load_error()
            else:
                missing = [k for k in self.kernels if not _ext.has_kernel(k, key)]
                reason = (f"segops._C was built without {key} kernels {missing}" if missing
                          else None)
        else:
            reason = f"unknown backend {self.name}"
        if reason is None and dtype is not None and dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reason = f"the {self.name} backend supports {names}, got {str(dtype).replace('torch.', '')}"
        return reason


class OpBackends:
    """The backends of one operator: `reference` plus the fused ones registered so far."""

    def __init__(self, op: str):
        self.op = op
        self.fused: dict[str, FusedBackend] = {}

    def register(self, backend: FusedBackend) -> FusedBackend:
        if backend.name not in BACKENDS or backend.name == "reference":
            raise ValueError(f"cannot register fused backend {backend.name!r}")
        self.fused[backend.name] = backend
        return backend

    def status(self, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, str | None]:
        """backend -> None if usable for (device, dtype), else the reason why not."""
        out: dict[str, str | None] = {"reference": None}
        for name in BACKENDS[1:]:
            b = self.fused.get(name)
            out[name] = (f"{self.op} has no {name} backend yet" if b is None
                         else b.unavailable_reason(device, dtype))
        return out

    def select(self, backend: str, device: torch.device, dtype: torch.dtype) -> str:
        """Resolve `backend` (possibly "auto") to a concrete, usable backend name."""
        requested = requested_backend(backend)
        if requested == "reference":
            return requested
        if requested != "auto":
            b = self.fused.get(requested)
            reason = (f"{self.op} has no {requested} backend" if b is None
                      else b.unavailable_reason(device, dtype))
            if reason is not None:
                raise RuntimeError(f"segops.{self.op}: backend={requested!r} cannot run here: {reason}")
            return requested
        preferred = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}.get(device.type, ())
        reasons = []
        for name in preferred:
            b = self.fused.get(name)
            reason = (f"no {name} backend" if b is None else b.unavailable_reason(device, dtype))
            if reason is None:
                return name
            reasons.append(f"{name}: {reason}")
        key = (self.op, device.type, dtype, tuple(reasons))
        load_error = _ext.load_error() if device.type == "cpu" else None
        if load_error and all(load_error in r for r in reasons):
            _warned.add(key)  # the missing extension was already reported, once
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"segops.{self.op}: no fused backend for {device.type} "
                          f"{str(dtype).replace('torch.', '')} tensors ({'; '.join(reasons) or 'none'}); "
                          "using the reference backend", RuntimeWarning, stacklevel=4)
        return "reference"


REGISTRY: dict[str, OpBackends] = {}


def op_backends(op: str) -> OpBackends:
    if op not in REGISTRY:
        REGISTRY[op] = OpBackends(op)
    return REGISTRY[op]
