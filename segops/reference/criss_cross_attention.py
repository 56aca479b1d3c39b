"""Criss-cross attention (CCNet, Huang et al. ICCV 2019) — reference semantics, docs/operators.md §2.1.

Computed the way mmcv's `CrissCrossAttention` does (two einsums for the column and row
energies, -inf on the column branch's diagonal so the centre is counted once, one joint
softmax over the H+W positions, two einsums for the output). This is also the benchmark
baseline, so it keeps the peer's memory profile: the (N, H, W, H+W) attention is materialised.
"""
from __future__ import annotations

import torch
from torch import Tensor


def criss_cross_attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    n, _, h, w = query.shape
    # Column branch: e_col[n, y, x, i] = <q[:, y, x], k[:, i, x]>, with i == y masked out
    # (the centre is counted in the row branch).
    centre_mask = torch.full((h,), float("-inf"), device=query.device, dtype=query.dtype).diag()
    e_col = torch.einsum("ncyx,ncix->nyxi", query, key) + centre_mask.view(h, 1, h)
    # Row branch: e_row[n, y, x, j] = <q[:, y, x], k[:, y, j]>.
    e_row = torch.einsum("ncyx,ncyj->nyxj", query, key)
    attn = torch.softmax(torch.cat([e_col, e_row], dim=-1), dim=-1)
    out = torch.einsum("ncix,nyxi->ncyx", value, attn[..., :h])
    out = out + torch.einsum("ncyj,nyxj->ncyx", value, attn[..., h:])
    return out
