"""Argument checks shared by the operators: clear errors naming the argument (docs/operators.md §1)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {str(t.dtype).replace('torch.', '')}, device {t.device}"


def check_tensor(op: str, name: str, t, ndim: int | None = None, min_ndim: int | None = None) -> None:
    """`t` is a floating tensor of the given rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"segops.{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"segops.{op}: `{name}` must be a floating tensor (float16, bfloat16, "
                         f"float32 or float64), got {_desc(t)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"segops.{op}: `{name}` must be {ndim}-D, got {_desc(t)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"segops.{op}: `{name}` must have at least {min_ndim} dims, got {_desc(t)}")


def check_same_device_dtype(op: str, **tensors: torch.Tensor) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"segops.{op}: `{name}` is on {t.device} but `{first_name}` is on "
                             f"{first.device}; all inputs must be on one device")
        if t.dtype != first.dtype:
            raise ValueError(f"segops.{op}: `{name}` has dtype {t.dtype} but `{first_name}` has "
                             f"{first.dtype}; all inputs must share one dtype")


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"segops.{op}: `{name}` must have {what} = {expected} (dim {dim}), "
                         f"got {_desc(t)}")


def check_dims(op: str, name: str, t: torch.Tensor, dims: Sequence[int], expected: Sequence[int],
               what: str) -> None:
    got = tuple(t.shape[d] for d in dims)
    if got != tuple(expected):
        raise ValueError(f"segops.{op}: `{name}` must have {what} = {tuple(expected)}, got {_desc(t)}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate and save statistics in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_finite_number(op: str, name: str, value, positive: bool = False) -> None:
    """`value` is a real number (not a bool), finite, and > 0 if `positive`."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > 0 or not positive))
    if not ok:
        raise ValueError(f"segops.{op}: `{name}` must be a finite number{' > 0' if positive else ''}, "
                         f"got {value!r}")


def check_int(op: str, name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"segops.{op}: `{name}` must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"segops.{op}: `{name}` must be >= {minimum}, got {value}")


def check_qkv(op: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """query, key: (N, Ck, H, W) of one shape; value: (N, Cv, H, W); one device and dtype."""
    for arg, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(op, arg, t, ndim=4)
    check_same_device_dtype(op, query=query, key=key, value=value)
    check_dims(op, "key", key, (0, 1, 2, 3), query.shape, "the shape of `query` (N, Ck, H, W)")
    check_dims(op, "value", value, (0, 2, 3), (query.shape[0],) + tuple(query.shape[2:]),
               "(N, H, W) of `query`")
