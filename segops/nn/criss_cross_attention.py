"""`CrissCrossAttention`: drop-in for mmcv's module of the same name (docs/operators.md §2.1)."""
from __future__ import annotations

from torch import Tensor, nn

from segops.nn.common import Scale
from segops.ops.criss_cross_attention import criss_cross_attention


class CrissCrossAttention(nn.Module):
    """Criss-cross attention block: `x + gamma * CCA(q(x), k(x), v(x))`.

    Same constructor, submodules and state_dict keys as `mmcv.ops.CrissCrossAttention`
    (`query_conv`/`key_conv` C->C//8, `value_conv` C->C, 1x1 with bias; `gamma.scale` = 0 at init),
    so mmcv checkpoints load unchanged. `backend` (keyword-only, not part of the state) selects
    the segops backend; "auto" follows `segops.use_backend` / SEGOPS_BACKEND.
    """

    def __init__(self, in_channels: int, *, backend: str = "auto") -> None:
        super().__init__()
        self.query_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.key_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = Scale(0.0)
        self.in_channels = in_channels
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        out = criss_cross_attention(self.query_conv(x), self.key_conv(x), self.value_conv(x),
                                    backend=self.backend)
        return self.gamma(out) + x

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}"
