"""Interlaced sparse self-attention (ISANet, Huang et al. 2019) — reference semantics, docs/operators.md §2.2.

Computed the way mmseg's ISAHead + SelfAttentionBlock do: permute the (N, C, H, W) map into
groups, a materialised (groups, L, L) similarity by batched matmul, scaled, softmax, a second
batched matmul with the values, and the permutation back. This is also the benchmark baseline,
so it keeps the peer's memory profile (permuted copies and the group attention matrices).

Groups for block size (Ph, Pw), with H = Gh·Ph and W = Gw·Pw and y = gy·Ph + ly, x = gx·Pw + lx:
- mode "long":  group (ly, lx) (Ph·Pw groups), members (gy, gx) in row-major order;
- mode "short": group (gy, gx) (Gh·Gw groups), members (ly, lx) in row-major order.

Optional additive logits (window attention, e.g. Swin with the heads folded into the batch):
sample n adds bias[n % nb] and group g adds mask[g % nm], both (·, L, L) over member indices.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

MODES = ("long", "short")


def to_groups(x: Tensor, block_size: Tuple[int, int], mode: str) -> Tensor:
    """(N, C, H, W) -> (N·G, L, C): each group's members as rows (a permuted copy)."""
    n, c, h, w = x.shape
    ph, pw = block_size
    x = x.reshape(n, c, h // ph, ph, w // pw, pw)
    if mode == "long":
        x = x.permute(0, 3, 5, 2, 4, 1)  # (n, ph, pw, gh, gw, c)
    else:
        x = x.permute(0, 2, 4, 3, 5, 1)  # (n, gh, gw, ph, pw, c)
    groups, members = (ph * pw, (h // ph) * (w // pw)) if mode == "long" else ((h // ph) * (w // pw), ph * pw)
    return x.reshape(n * groups, members, c)


def from_groups(x: Tensor, shape: Tuple[int, int, int, int], block_size: Tuple[int, int],
                mode: str) -> Tensor:
    """Inverse of `to_groups`: (N·G, L, C) -> (N, C, H, W)."""
    n, c, h, w = shape
    ph, pw = block_size
    gh, gw = h // ph, w // pw
    if mode == "long":
        x = x.reshape(n, ph, pw, gh, gw, c).permute(0, 5, 3, 1, 4, 2)
    else:
        x = x.reshape(n, gh, gw, ph, pw, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, c, h, w)


def interlaced_sparse_attention(query: Tensor, key: Tensor, value: Tensor,
                                block_size: Tuple[int, int] = (8, 8), mode: str = "long", *,
                                scale: Optional[float] = None, bias: Optional[Tensor] = None,
                                mask: Optional[Tensor] = None) -> Tensor:
    n, ck, h, w = query.shape
    cv = value.shape[1]
    if scale is None:
        scale = ck ** -0.5 if ck > 0 else 1.0
    q = to_groups(query, block_size, mode)
    k = to_groups(key, block_size, mode)
    v = to_groups(value, block_size, mode)
    sim = torch.matmul(q, k.transpose(1, 2))
    sim = scale * sim
    if bias is not None or mask is not None:
        members = sim.shape[1]
        groups = q.shape[0] // n if n else 0
        nb = bias.shape[0] if bias is not None else 1
        nm = mask.shape[0] if mask is not None else 1
        # (sample, group) -> (sample // nb, n % nb, group // nm, group % nm)
        sim = sim.reshape(n // nb, nb, groups // nm, nm, members, members)
        if bias is not None:
            sim = sim + bias.reshape(1, nb, 1, 1, members, members)
        if mask is not None:
            sim = sim + mask.reshape(1, 1, 1, nm, members, members)
        sim = sim.reshape(n * groups, members, members)
    attn = torch.softmax(sim, dim=-1)
    out = torch.matmul(attn, v)
    return from_groups(out, (n, cv, h, w), block_size, mode)
