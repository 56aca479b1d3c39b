"""`InterlacedSparseAttention`: the inner part of mmseg's ISAHead (SPEC §2.2)."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from segops.nn.common import ConvModule
from segops.ops.interlaced_sparse_attention import _block_size, interlaced_sparse_attention


class ISASelfAttentionBlock(nn.Module):
    """mmseg ISAHead's `SelfAttentionBlock`, with its submodule names.

    query/key projections: two 1x1 (conv, norm, act) to `channels` (`query_project.0/1`,
    `key_project.0/1`); value: one plain 1x1 conv with bias to `in_channels`; output projection:
    one 1x1 (conv, norm, act) (`output_project`), not zero-initialised. Attention is scaled by
    channels**-0.5 (mmseg's matmul_norm=True).
    """

    def __init__(self, in_channels: int, channels: int, *, norm: Optional[str] = "bn",
                 act: Optional[str] = "relu") -> None:
        super().__init__()
        self.in_channels = in_channels
        self.channels = channels

        def qk():
            return nn.Sequential(ConvModule(in_channels, channels, 1, norm=norm, act=act),
                                 ConvModule(channels, channels, 1, norm=norm, act=act))
        self.key_project = qk()
        self.query_project = qk()
        self.value_project = nn.Conv2d(in_channels, in_channels, 1)
        self.output_project = ConvModule(in_channels, in_channels, 1, norm=norm, act=act)

    def forward(self, x: Tensor, block_size, mode: str, backend: str = "auto") -> Tensor:
        # The projections are pointwise, so applying them to the whole (padded) map equals
        # mmseg's application to the permuted per-group maps.
        context = interlaced_sparse_attention(self.query_project(x), self.key_project(x),
                                              self.value_project(x), block_size, mode,
                                              scale=self.channels ** -0.5, backend=backend)
        return self.output_project(context)


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
                 norm: Optional[str] = "bn", act: Optional[str] = "relu",
                 backend: str = "auto") -> None:
        super().__init__()
        self.in_channels = in_channels
        self.channels = channels
        self.block_size = _block_size(block_size)
        self.backend = backend
        self.global_relation = ISASelfAttentionBlock(in_channels, channels, norm=norm, act=act)
        self.local_relation = ISASelfAttentionBlock(in_channels, channels, norm=norm, act=act)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[2:]
        ph, pw = self.block_size
        pad_h, pad_w = -h % ph, -w % pw
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        x = self.global_relation(x, self.block_size, "long", self.backend)
        x = self.local_relation(x, self.block_size, "short", self.backend)
        if pad_h or pad_w:
            x = x[:, :, pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w]
        return x

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channels={self.channels}, block_size={self.block_size}"
