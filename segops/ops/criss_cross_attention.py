"""`segops.criss_cross_attention` (docs/operators.md §2.1): description, validation, public function.

The fused forward returns (out, stats): stats (N, 2, H, W) holds, per position, the maximum
energy m and log l with l = sum over the H+W-1 positions of exp(e - m) (so the log-sum-exp is
m + log l), in the accumulation dtype (fp64 for fp64 inputs, else fp32). That is all the
backward needs besides the inputs and the output: P = exp((e - m) - log l). Keeping m apart
from log l keeps P accurate when the energies are large (one fp32 log-sum-exp of ~1000 would
be off by ~3e-5 and so would every P).
"""
from __future__ import annotations

import torch
from torch import Tensor

from segops.ops import _spec
from segops.ops import _validate as V
from segops.ops._spec import OpSpec, Sample
from segops.reference.criss_cross_attention import criss_cross_attention as _reference


def _fake(query, key, value):
    n, _, h, w = query.shape
    return (value.new_empty((n, value.shape[1], h, w)),
            query.new_empty((n, 2, h, w), dtype=V.accumulation_dtype(query.dtype)))


def _qkv(g, name, n, ck, cv, h, w, scale=0.5, gradcheck=False):
    return Sample(name, dict(query=_spec.randn(g, n, ck, h, w, scale=scale),
                             key=_spec.randn(g, n, ck, h, w, scale=scale),
                             value=_spec.randn(g, n, cv, h, w)),
                  grads=("query", "key", "value"), gradcheck=gradcheck)


def _samples():
    g = torch.Generator().manual_seed(0)

    def qkv(*args, **kwargs):
        return _qkv(g, *args, **kwargs)
    return [qkv("batch2_prime_hw", 2, 4, 3, 5, 7), qkv("small", 2, 3, 2, 4, 5, gradcheck=True),
            qkv("one_row", 1, 3, 5, 1, 6, gradcheck=True),
            qkv("one_column", 1, 2, 4, 7, 1, gradcheck=True),
            qkv("wide", 1, 5, 6, 6, 37), qkv("wide_tall", 1, 3, 4, 20, 17),  # vector column paths
            # two lanes past whole vectors (run lane by lane on CPU), columns over 64 long
            qkv("lane_tail_tall", 1, 3, 5, 70, 18),
            # one and four vectors per row in the CPU short-row kernels, with whole row blocks
            qkv("row_one_vector", 1, 7, 8, 2, 16), qkv("row_four_vectors", 1, 7, 13, 3, 50),
            qkv("one_pixel", 1, 3, 2, 1, 1),
            # the CPU backward splits the column dP over channel chunks when threads > batch
            qkv("channel_chunks", 1, 3, 130, 3, 5),
            qkv("full_tile", 1, 16, 16, 9, 9), qkv("large_energies", 1, 4, 3, 3, 17, scale=4.0),
            qkv("empty_batch", 0, 4, 3, 5, 6), qkv("empty_map", 1, 4, 3, 0, 6),
            qkv("no_key_channels", 1, 0, 3, 4, 5)]


SPEC = _spec.define(OpSpec(
    name="criss_cross_attention", public=1,
    inputs=("query", "key", "value"), params=(),
    results=("out", "stats"), saves=("query", "key", "value", "out", "stats"),
    differentiable=("query", "key", "value"), fake=_fake,
    large_samples=lambda: [_qkv(torch.Generator().manual_seed(1), "large", 2, 64, 96, 33, 47,
                                scale=0.3)],
    make=_qkv, samples=_samples, error_samples=lambda: _spec.qkv_error_samples(2, 4, 3, 5, 7),
    reference=_reference))


def criss_cross_attention(query: Tensor, key: Tensor, value: Tensor, *,
                          backend: str = "auto") -> Tensor:
    """Criss-cross attention: each position attends to its row and column (centre once).

    query, key: (N, Ck, H, W); value: (N, Cv, H, W) -> (N, Cv, H, W). One joint softmax over the
    H + W - 1 positions, no scaling (mmcv/CCNet semantics).
    """
    V.check_qkv(SPEC.name, query, key, value)
    name = SPEC.select(backend, query)
    if name == "reference":
        return _reference(query, key, value)
    return SPEC.fused(name, *_spec.logits_need_a_channel(query, key), value)


SPEC.function = criss_cross_attention
