"""`InterlacedSparseAttention`: the inner part of mmseg's ISAHead (docs/operators.md §2.2)."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from segops.nn.common import ConvModule, Norm
from segops.nn.self_attention_block import SelfAttentionBlock
from segops.ops.interlaced_sparse_attention import _block_size, interlaced_sparse_attention


class ISASelfAttentionBlock(SelfAttentionBlock):
    """mmseg ISAHead's `SelfAttentionBlock`: the shared block with two-conv query/key
    projections to `channels` (`query_project.0/1`, `key_project.0/1`, ConvModules), a plain 1x1
    value conv to `in_channels`, no `out_project` but an `output_project` ConvModule (not
    zero-initialised), scale channels**-0.5, and interlaced attention inside the groups of
    `mode` ("long" or "short") instead of dense attention.
    """

    def __init__(self, in_channels: int, channels: int, block_size, mode: str, *,
                 norm: Norm = "bn", act: Optional[str] = "relu", backend: str = "auto") -> None:
        super().__init__(in_channels, in_channels, channels, in_channels, key_query_num_convs=2,
                         with_out=False, norm=norm, act=act, backend=backend)
        self.output_project = ConvModule(in_channels, in_channels, 1, norm=norm, act=act)
        self.block_size = _block_size(block_size)
        self.mode = mode

    def attend(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        # The projections are pointwise, so applying them to the whole (padded) map equals
        # mmseg's application to the permuted per-group maps.
        return interlaced_sparse_attention(query, key, value, self.block_size, self.mode,
                                           scale=self.channels ** -0.5, backend=self.backend)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_project(super().forward(x, x))


def interlaced_relations(x: Tensor, *relations: ISASelfAttentionBlock) -> Tensor:
    """Zero-pad `x` to a multiple of the first relation's block size (floor(pad/2) before, the
    rest after; padded positions are not masked), apply the relations in order (ISA: the
    global then the local one), crop back."""
    h, w = x.shape[2:]
    ph, pw = relations[0].block_size
    pad_h, pad_w = -h % ph, -w % pw
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    for relation in relations:
        x = relation(x)
    if pad_h or pad_w:
        x = x[:, :, pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w]
    return x


class InterlacedSparseAttention(nn.Module):
    """Interlaced sparse self-attention: a long-range then a short-range attention block.

    Drop-in for the part of mmseg's `ISAHead` between `in_conv` and `out_conv`: zero-pad the
    map to a multiple of `block_size` (floor(pad/2) before, the rest after; padded positions
    are not masked), `global_relation` inside groups of equal (y mod Ph, x mod Pw), then
    `local_relation` inside the contiguous Ph x Pw blocks, then crop. The state_dict keys
    (`global_relation.*`, `local_relation.*`) are those of ISAHead, so its checkpoints load
    (with the ISAHead prefix stripped). `backend` (keyword-only) selects the segops backend.
    """

    def __init__(self, in_channels: int, channels: int, block_size=(8, 8), *,
                 norm: Norm = "bn", act: Optional[str] = "relu", backend: str = "auto") -> None:
        super().__init__()
        self.in_channels = in_channels
        self.channels = channels
        self.block_size = _block_size(block_size)
        self.global_relation = ISASelfAttentionBlock(in_channels, channels, self.block_size,
                                                     "long", norm=norm, act=act, backend=backend)
        self.local_relation = ISASelfAttentionBlock(in_channels, channels, self.block_size,
                                                    "short", norm=norm, act=act, backend=backend)

    @property
    def backend(self) -> str:
        return self.global_relation.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.global_relation.backend = self.local_relation.backend = name

    def forward(self, x: Tensor) -> Tensor:
        return interlaced_relations(x, self.global_relation, self.local_relation)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channels={self.channels}, block_size={self.block_size}"


def pyramid_region_attention(query: Tensor, key: Tensor, value: Tensor, regions: int, *,
                             scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Dense attention inside each cell of a `regions` x `regions` partition of the map, as
    OCNet's Pyramid-OC splits it: cells of floor(H / regions) x floor(W / regions), the last
    row and column of cells taking the remainder.

    Runs on `segops.interlaced_sparse_attention` in "short" mode: the map splits into at most
    four rectangles (inner cells, last column, last row, corner), each tiled by equal
    contiguous blocks, so each is one call with that block size.
    """
    h, w = query.shape[2:]
    step_h, step_w = h // regions, w // regions
    split_h, split_w = step_h * (regions - 1), step_w * (regions - 1)
    out = value.new_empty(value.shape[:2] + (h, w))
    for rows, block_h in ((slice(0, split_h), step_h), (slice(split_h, h), h - split_h)):
        for cols, block_w in ((slice(0, split_w), step_w), (slice(split_w, w), w - split_w)):
            if block_h == 0 or block_w == 0 or rows.start == rows.stop or cols.start == cols.stop:
                continue
            out[:, :, rows, cols] = interlaced_sparse_attention(
                query[:, :, rows, cols], key[:, :, rows, cols], value[:, :, rows, cols],
                (block_h, block_w), "short", scale=scale, backend=backend)
    return out
