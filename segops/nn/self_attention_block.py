"""`SelfAttentionBlock`: mmseg's `_SelfAttentionBlock` (mmseg/models/utils/self_attention_block.py)
with its attention running through `segops.disentangled_non_local`.

One block serves DANet's PAM, ANN's AFNB/APNB stages, OCRNet's object attention, OCNet's
object context and ISANet's relations (which swap in interlaced attention, see
`segops.nn.interlaced_sparse_attention`): each is this block with another configuration.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from segops.nn.common import ConvModule, Norm
from segops.ops.disentangled_non_local import disentangled_non_local


def _projection(in_channels: int, channels: int, num_convs: int, use_conv_module: bool,
                bias, norm: Norm, act: Optional[str]) -> nn.Module:
    """mmseg's build_project: `num_convs` 1x1 convs (ConvModules with norm and activation, or
    plain convs with bias), a Sequential when there are several."""
    def layer(cin):
        if use_conv_module:
            return ConvModule(cin, channels, 1, bias=bias, norm=norm, act=act)
        return nn.Conv2d(cin, channels, 1)
    convs = [layer(in_channels if i == 0 else channels) for i in range(num_convs)]
    return convs[0] if num_convs == 1 else nn.Sequential(*convs)


class SelfAttentionBlock(nn.Module):
    """`context_i = sum_j softmax_j(s <q_i, k_j>) v_j`, q from `query_feats`, k and v from
    `key_feats`, then the optional output projection.

    Projections (mmseg's names by default): `key_project` / `query_project` of
    `key_query_num_convs` 1x1 convs to `channels` (ConvModules with norm and activation when
    `key_query_norm`, else plain convs with bias; shared when `share_key_query`),
    `value_project` (`value_out_num_convs` convs, ConvModules when `value_out_norm`) to
    `value_channels` (default: `channels` with an output projection, else `out_channels`), and
    with `with_out` an `out_project` to `out_channels`, zero-initialised when it is a plain
    conv (as mmseg's init_weights). `s` = channels**-0.5 when `matmul_norm`, else 1.
    `query_downsample` / `key_downsample` (modules without parameters) act after the
    projections; a downsampled query's context is resized back to the query grid (bilinear)
    before the output projection. The key grid may be any shape, e.g. (K, 1) object regions or
    a flat (L,) pooled key set.

    A subclass following another code base's names sets `names` (role -> submodule name).
    `backend` (keyword-only, not part of the state) selects the segops backend.
    """

    names = {"key": "key_project", "query": "query_project", "value": "value_project",
             "out": "out_project"}

    def __init__(self, key_in_channels: int, query_in_channels: int, channels: int,
                 out_channels: int, *, share_key_query: bool = False,
                 query_downsample: Optional[nn.Module] = None,
                 key_downsample: Optional[nn.Module] = None, key_query_num_convs: int = 1,
                 value_out_num_convs: int = 1, key_query_norm: bool = True,
                 value_out_norm: bool = False, matmul_norm: bool = True, with_out: bool = True,
                 value_channels: Optional[int] = None, conv_bias="auto", norm: Norm = "bn",
                 act: Optional[str] = "relu", backend: str = "auto") -> None:
        super().__init__()
        if share_key_query and key_in_channels != query_in_channels:
            raise ValueError("share_key_query needs key_in_channels == query_in_channels, got "
                             f"{key_in_channels} and {query_in_channels}")
        if value_channels is None:
            value_channels = channels if with_out else out_channels
        self.channels = channels
        self.out_channels = out_channels
        self.matmul_norm = matmul_norm
        self.backend = backend
        key = _projection(key_in_channels, channels, key_query_num_convs, key_query_norm,
                          conv_bias, norm, act)
        query = key if share_key_query else _projection(
            query_in_channels, channels, key_query_num_convs, key_query_norm, conv_bias, norm, act)
        value = _projection(key_in_channels, value_channels, value_out_num_convs, value_out_norm,
                            conv_bias, norm, act)
        out = (_projection(value_channels, out_channels, value_out_num_convs, value_out_norm,
                           conv_bias, norm, act) if with_out else None)
        for role, module in (("key", key), ("query", query), ("value", value), ("out", out)):
            setattr(self, self.names[role], module)
        self.query_downsample = query_downsample
        self.key_downsample = key_downsample
        if isinstance(out, nn.Conv2d):
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)

    def projection(self, role: str) -> Optional[nn.Module]:
        return getattr(self, self.names[role])

    def attend(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        scale = self.channels ** -0.5 if self.matmul_norm else 1.0
        return disentangled_non_local(query, key, value, whiten=False, scale=scale,
                                      backend=self.backend)

    def forward(self, query_feats: Tensor, key_feats: Tensor) -> Tensor:
        query = self.projection("query")(query_feats)
        if self.query_downsample is not None:
            query = self.query_downsample(query)
        key = self.projection("key")(key_feats)
        value = self.projection("value")(key_feats)
        if self.key_downsample is not None:
            key = self.key_downsample(key)
            value = self.key_downsample(value)
        context = self.attend(query, key, value)
        if self.query_downsample is not None:
            context = F.interpolate(context, size=query_feats.shape[2:], mode="bilinear",
                                    align_corners=False)
        out = self.projection("out")
        return out(context) if out is not None else context

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, out_channels={self.out_channels}, "
                f"matmul_norm={self.matmul_norm}")
