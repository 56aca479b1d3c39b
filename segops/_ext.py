"""Loading of the compiled extension `segops._C` and kernel availability queries."""
from __future__ import annotations

import functools
import warnings

import torch

_LOAD_ERROR: str | None = None


@functools.lru_cache(maxsize=None)
def load() -> bool:
    """Import segops._C once; on failure warn once and remember why."""
    global _LOAD_ERROR
    try:
        from segops import _C  # noqa: F401  (registers the segops_C library)
    except ImportError as exc:  # pragma: no cover - exercised only without a build
        _LOAD_ERROR = f"segops._C could not be imported ({exc})"
        warnings.warn(
            f"{_LOAD_ERROR}; the fused C++/CUDA backends are unavailable and segops falls back "
            "to the reference backend. Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning, stacklevel=3)
        return False
    return True


def load_error() -> str | None:
    load()
    return _LOAD_ERROR


def _has_kernel(kernel: str, dispatch_key: str) -> bool:
    qualname = f"segops_C::{kernel}"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)
    except RuntimeError:  # operator not defined at all
        return False


# A constant for torch.compile (the dispatcher query is not traceable), so backend selection
# inside a compiled region with fullgraph=True does not break the graph.
@torch.compiler.assume_constant_result
def has_kernel(kernel: str, dispatch_key: str) -> bool:
    """Whether `segops_C::<kernel>` has an implementation for `dispatch_key` ("CPU"/"CUDA")."""
    if not load():
        return False
    return _has_kernel(kernel, dispatch_key)


def cuda_built() -> bool:
    return load() and any(has_kernel(k, "CUDA") for k in registered_kernels())


def registered_kernels() -> list[str]:
    if not load():
        return []
    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("segops_C::"))
