"""`segops.disentangled_non_local` (docs/operators.md §2.3): description, validation, public
function.

The custom ops work on flattened, contiguous tensors: query (N, Ck, Lq), key (N, Ck, Lk),
value (N, Cv, Lk), unary (N, Lk) or None, and one combined logit factor
`s = (Ck**-0.5 if scale is None else scale) / temperature`. The public function reshapes.

The fused forward returns (out, lse, g, lse_u):
  lse   (N, Lq)  per-query log-sum-exp of the pairwise logits s*<q~_i, k~_j>,
  g     (N, Cv)  the unary vector sum_j softmax(unary)_j v_j (zeros without unary),
  lse_u (N,)     log-sum-exp of the unary logits (zeros without unary),
all fp32 (fp64 for fp64 inputs): O(Lq + Lk) statistics, enough for a recomputing backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from segops.ops import _spec
from segops.ops import _validate as V
from segops.ops._spec import ErrorSample, OpSpec, Sample
from segops.reference.disentangled_non_local import disentangled_non_local as _reference

OP = "disentangled_non_local"


def _fake(query, key, value, unary, whiten, s):
    n, _, lq = query.shape
    cv = value.shape[1]
    acc = V.accumulation_dtype(query.dtype)
    return (value.new_empty((n, cv, lq)), query.new_empty((n, lq), dtype=acc),
            query.new_empty((n, cv), dtype=acc), query.new_empty((n,), dtype=acc))


def _case(g, name, n, ck, cv, sq, sk, whiten=True, unary=True, gradcheck=False, qk_scale=0.5,
          **kwargs):
    t = dict(query=_spec.randn(g, n, ck, *sq, scale=qk_scale, shift=0.3),
             key=_spec.randn(g, n, ck, *sk, scale=qk_scale, shift=-0.2),
             value=_spec.randn(g, n, cv, *sk))
    if unary:
        t["unary"] = _spec.randn(g, n, 1, *sk)
    kwargs = dict(dict(temperature=0.05), whiten=whiten, **kwargs)
    return Sample(name, t, kwargs, grads=tuple(t), gradcheck=gradcheck)


def _large_samples():
    g = torch.Generator().manual_seed(1)
    return [_case(g, "large_same_map", 2, 64, 96, (37, 29), (37, 29), qk_scale=0.3),
            _case(g, "large_pooled_keys", 2, 64, 96, (37, 29), (110,), whiten=False,
                  qk_scale=0.3, temperature=1.0)]


def _samples():
    g = torch.Generator().manual_seed(0)

    def case(*args, **kwargs):
        return _case(g, *args, **kwargs)
    out = []
    for whiten, unary in ((True, True), (False, False), (True, False), (False, True)):
        tag = ("whiten" if whiten else "plain") + ("_unary" if unary else "")
        out += [case(f"same_map_{tag}", 2, 5, 3, (7, 5), (7, 5), whiten, unary),
                case(f"pooled_keys_{tag}", 1, 16, 16, (9, 11), (110,), whiten, unary)]
    out += [case("small", 2, 3, 2, (2, 3), (5,), gradcheck=True),
            case("small_plain", 1, 2, 3, (4,), (2, 2), False, False, gradcheck=True),
            case("region_keys", 2, 3, 4, (5, 7), (19,)),
            case("1d_query_2d_keys", 1, 4, 6, (37,), (3, 3)),
            case("channel_chunks", 1, 130, 140, (4, 5), (19,)),
            case("scale_3d_keys", 2, 6, 5, (4, 3), (2, 3, 2), scale=1.0, temperature=2.0),
            case("one_key", 1, 3, 2, (1, 1), (1,)),
            case("empty_batch", 0, 4, 3, (5, 6), (7,)),
            case("empty_queries", 2, 4, 3, (0,), (7,)),
            case("no_key_channels", 1, 0, 3, (4, 5), (6,))]
    return out


def _error_samples():
    # Valid call: query (2, 5, 7, 5), key (2, 5, 7, 5), value (2, 3, 7, 5), unary (2, 1, 7, 5).
    return [
        ErrorSample("query_rank", dict(query=torch.randn(2, 5)), "`query` must have at least 3 dims"),
        ErrorSample("key_channels", dict(key=torch.randn(2, 4, 7, 5)), "`key` must have"),
        ErrorSample("value_positions", dict(value=torch.randn(2, 3, 7, 6)), "`value` must have"),
        ErrorSample("unary_channels", dict(unary=torch.randn(2, 2, 7, 5)), "`unary` must have"),
        ErrorSample("mixed_dtype", dict(value=torch.randn(2, 3, 7, 5, dtype=torch.float64)), "dtype"),
        ErrorSample("integer", dict(query=torch.ones(2, 5, 7, 5, dtype=torch.int64)), "floating"),
        ErrorSample("whiten_not_bool", dict(whiten=1), "`whiten` must be a bool", TypeError),
        ErrorSample("temperature_zero", dict(temperature=0.0), "`temperature`"),
        ErrorSample("scale_nan", dict(scale=float("nan")), "`scale`"),
    ]


SPEC = _spec.define(OpSpec(
    name=OP, public=1,
    inputs=("query", "key", "value", "unary?"), params=(("whiten", bool), ("s", float)),
    results=("out", "lse", "g", "lse_u"),
    saves=("query", "key", "value", "unary", "out", "lse", "g", "lse_u"),
    differentiable=("query", "key", "value", "unary"), fake=_fake,
    make=_case, samples=_samples, error_samples=_error_samples, large_samples=_large_samples,
    reference=_reference))


def _validate(query, key, value, unary, whiten, scale, temperature) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        V.check_tensor(OP, name, t, min_ndim=3)
    if unary is not None:
        V.check_tensor(OP, "unary", unary, min_ndim=3)
    V.check_same_device_dtype(OP, query=query, key=key, value=value, unary=unary)
    if key.dim() < 3 or key.shape[:2] != query.shape[:2]:
        raise ValueError(f"segops.{OP}: `key` must have (N, Ck) = {tuple(query.shape[:2])} of "
                         f"`query`, got {V._desc(key)}")
    if value.dim() != key.dim() or value.shape[0] != key.shape[0] or value.shape[2:] != key.shape[2:]:
        raise ValueError(f"segops.{OP}: `value` must have shape (N, Cv, *Sk) with N = {key.shape[0]} "
                         f"and Sk = {tuple(key.shape[2:])} of `key`, got {V._desc(value)}")
    if unary is not None and (unary.dim() != key.dim() or unary.shape[:2] != (key.shape[0], 1)
                              or unary.shape[2:] != key.shape[2:]):
        raise ValueError(f"segops.{OP}: `unary` must have shape (N, 1, *Sk) = "
                         f"{(key.shape[0], 1) + tuple(key.shape[2:])}, got {V._desc(unary)}")
    if not isinstance(whiten, bool):
        raise TypeError(f"segops.{OP}: `whiten` must be a bool, got {type(whiten).__name__}")
    if scale is not None:
        V.check_finite_number(OP, "scale", scale)
    V.check_finite_number(OP, "temperature", temperature, positive=True)


def disentangled_non_local(query: Tensor, key: Tensor, value: Tensor, unary: Optional[Tensor] = None,
                           *, whiten: bool = True, scale: Optional[float] = None,
                           temperature: float = 1.0, backend: str = "auto") -> Tensor:
    """(Disentangled) non-local attention: `out_i = sum_j softmax_j(s <q~_i, k~_j>) v_j [+ unary]`.

    query: (N, Ck, *Sq); key: (N, Ck, *Sk); value: (N, Cv, *Sk); unary: (N, 1, *Sk) or None;
    output (N, Cv, *Sq). Sq and Sk are any spatial shapes of rank >= 1 and may differ.
    whiten: subtract the per-sample per-channel mean over positions from query and key.
    s = (Ck**-0.5 if scale is None else scale) / temperature. With unary, adds
    `sum_j softmax_j(unary_j) v_j` to every query position. `whiten=False, unary=None` is
    embedded-Gaussian non-local (scale=1.0: DANet's position attention).
    """
    _validate(query, key, value, unary, whiten, scale, temperature)
    name = SPEC.select(backend, query)
    if name == "reference":
        return _reference(query, key, value, unary, whiten=whiten, scale=scale,
                          temperature=temperature)
    n, ck = query.shape[:2]
    cv = value.shape[1]
    s = float(((ck ** -0.5 if ck else 1.0) if scale is None else scale) / temperature)
    query, key = _spec.logits_need_a_channel(query, key)
    out = SPEC.fused(name, query.flatten(2), key.flatten(2), value.flatten(2),
                     None if unary is None else unary.flatten(1), whiten, s)
    return out.reshape(n, cv, *query.shape[2:])


SPEC.function = disentangled_non_local
