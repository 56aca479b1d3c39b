"""`PSAMask`: the point-wise spatial attention mask shuffle of PSANet (Zhao et al., ECCV 2018),
with the semantics of mmcv's compiled `mmcv.ops.PSAMask` (`psa_mask` "collect" / "distribute"),
in plain PyTorch (a gather, so autograd gives the backward).

PSANet predicts, at every position i of an H x W map, an attention window of `mask_size`
(Hm x Wm) centred on i. The shuffle lays those windows out as a dense (H*W) x (H*W) map, with
zeros where a window does not reach (or where it would fall outside the map):

- "collect":    out[n, j, i] = x[n, m(j - i), i]   (channel j: the position i gathers from)
- "distribute": out[n, i, j] = x[n, m(j - i), i]   (channel i: the position i sends to)

with j, i flattened positions (row-major), m(d) = (dy + (Hm-1)//2) * Wm + (dx + (Wm-1)//2) the
window entry at offset d = (dy, dx), valid when 0 <= dy + (Hm-1)//2 < Hm (and so for dx).
The attention the predicted map then applies is a plain matrix product (not a softmax of
query-key products), so no segops operator computes it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

PSA_TYPES = ("collect", "distribute")


def _window_index(h: int, w: int, h_mask: int, w_mask: int, device) -> tuple[Tensor, Tensor]:
    """(L, L) window entry m(j - i) for target j (rows) and source i (columns), and where it
    is inside the window."""
    def offsets(size: int, mask: int):
        pos = torch.arange(size, device=device)
        d = pos[:, None] - pos[None, :] + (mask - 1) // 2  # (target, source)
        return d, (d >= 0) & (d < mask)
    dy, valid_y = offsets(h, h_mask)
    dx, valid_x = offsets(w, w_mask)
    index = dy[:, None, :, None] * w_mask + dx[None, :, None, :]  # (Ht, Wt, Hs, Ws)
    valid = valid_y[:, None, :, None] & valid_x[None, :, None, :]
    length = h * w
    return index.reshape(length, length), valid.reshape(length, length)


def psa_mask(x: Tensor, psa_type: str, mask_size) -> Tensor:
    """(N, Hm*Wm, H, W) windows -> (N, H*W, H, W) dense attention map (see the module docstring)."""
    if psa_type not in PSA_TYPES:
        raise ValueError(f"psa_type must be one of {PSA_TYPES}, got {psa_type!r}")
    h_mask, w_mask = _pair(mask_size)
    if x.dim() != 4 or x.shape[1] != h_mask * w_mask:
        raise ValueError(f"psa_mask: expected (N, {h_mask * w_mask}, H, W) for mask size "
                         f"{(h_mask, w_mask)}, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    length = h * w
    index, valid = _window_index(h, w, h_mask, w_mask, x.device)
    index = index.clamp(0, h_mask * w_mask - 1)
    gathered = x.reshape(n, h_mask * w_mask, length).gather(1, index.expand(n, length, length))
    dense = torch.where(valid, gathered, gathered.new_zeros(()))  # (N, target j, source i)
    if psa_type == "distribute":
        dense = dense.transpose(1, 2)
    return dense.reshape(n, length, h, w).contiguous()


class PSAMask(nn.Module):
    """Drop-in for `mmcv.ops.PSAMask(psa_type, mask_size)` (no parameters)."""

    def __init__(self, psa_type: str, mask_size=None) -> None:
        super().__init__()
        if psa_type not in PSA_TYPES:
            raise ValueError(f"psa_type must be one of {PSA_TYPES}, got {psa_type!r}")
        self.psa_type = psa_type
        self.mask_size = _pair(mask_size)

    def forward(self, x: Tensor) -> Tensor:
        return psa_mask(x, self.psa_type, self.mask_size)

    def extra_repr(self) -> str:
        return f"psa_type={self.psa_type!r}, mask_size={self.mask_size}"
