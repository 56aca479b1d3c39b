"""Disentangled non-local attention (DNLNet, Yin et al. ECCV 2020) — reference semantics, docs/operators.md §2.3.

Computed the way mmseg's `DisentangledNonLocal2d` does: flatten the spatial dims, subtract the
per-sample per-channel mean over positions from query (`theta_x`) and key (`phi_x`) when
whitening, materialise the (N, Lq, Lk) pairwise matrix with `torch.matmul`, scale, divide by the
temperature, softmax over keys, multiply with the values; the unary term is a softmax over the
key positions of `unary` times the values, one vector broadcast to every query position. This is
also the benchmark baseline, so it keeps the peer's memory profile (the Lq x Lk matrix).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def disentangled_non_local(query: Tensor, key: Tensor, value: Tensor, unary: Optional[Tensor] = None,
                           *, whiten: bool = True, scale: Optional[float] = None,
                           temperature: float = 1.0) -> Tensor:
    n, ck = query.shape[:2]
    cv = value.shape[1]
    sq = query.shape[2:]
    theta_x = query.flatten(2).permute(0, 2, 1)   # (N, Lq, Ck)
    phi_x = key.flatten(2)                         # (N, Ck, Lk)
    g_x = value.flatten(2).permute(0, 2, 1)       # (N, Lk, Cv)
    if whiten:
        theta_x = theta_x - theta_x.mean(dim=-2, keepdim=True)
        phi_x = phi_x - phi_x.mean(dim=-1, keepdim=True)
    pairwise = torch.matmul(theta_x, phi_x)                # (N, Lq, Lk)
    if scale is None:
        pairwise = pairwise / (ck ** 0.5 if ck else 1.0)  # no channels: every logit is 0
    else:
        pairwise = pairwise * scale
    pairwise = pairwise / temperature
    pairwise = pairwise.softmax(dim=-1)
    y = torch.matmul(pairwise, g_x)                        # (N, Lq, Cv)
    if unary is not None:
        unary_mask = unary.flatten(2).softmax(dim=-1)
        y = y + torch.matmul(unary_mask, g_x)              # (N, 1, Cv) broadcast over queries
    return y.permute(0, 2, 1).reshape(n, cv, *sq)
