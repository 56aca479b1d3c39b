"""STLNet's texture modules (Zhu et al., CVPR 2021), docs/operators.md §2.5, built on segops's QCO ops.

Same structure, channel widths and state_dict keys as the official `STLNet.py`
(`QCO_1d`, `QCO_2d`, `TEM`, `PTFEM`, `STL`), so official checkpoints load unchanged:

- `QCO1d(level_num)`          ~ QCO_1d   (conv1 256->256 3x3, conv2 256->128, f1, f2, out)
- `QCO2d(scale, level_num)`   ~ QCO_2d   (f1 3->64, f2 64->128, out 384->128->128)
- `TextureEnhance(level_num)` ~ TEM      (qco, k, q, v 128->128, out 128->256); 128 levels in STL
- `PyramidTextureExtraction`  ~ PTFEM    (conv 512->256, qco_1/2/3/6 with 8 levels, out 512->256)
- `STL(in_channel)`           ~ STL      (conv_start in->256, tem, ptfem); output 768 channels

Deviations: QCO1d returns (sta, sim, levels) instead of (sta, dense encoding) — TEM rebuilds
the encoding per pixel with `texture_reconstruct`; PTFEM (and a standalone QCO2d) accept any
input size: the official code pools to a multiple of the level count and crashes unless it is
also a multiple of every scale; here the input is average-pooled to the nearest valid size
(the official size whenever that one is valid).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.nn.common import ConvModule
from segops.ops.qco import qco_1d, qco_2d, texture_reconstruct


def _conv(c_in: int, c_out: int, kernel_size: int = 1, padding: int = 0, has_bn: bool = True,
          has_relu: bool = True, dim: int = 2) -> ConvModule:
    """STLNet's ConvBNReLU (conv without bias, optional BN, optional ReLU; keys `conv`, `bn`)."""
    return ConvModule(c_in, c_out, kernel_size, padding=padding, bias=False,
                      norm="bn" if has_bn else None, act="relu" if has_relu else None, dim=dim)


def valid_size(size: int, multiple: int, official: int) -> int:
    """The official pooled size when it is a positive multiple of `multiple`, else the nearest
    positive multiple of `multiple` to `size`."""
    if official > 0 and official % multiple == 0:
        return official
    return max(multiple, int(math.floor(size / multiple + 0.5)) * multiple)


def _pool_to(x: Tensor, hw: tuple[int, int]) -> Tensor:
    return x if tuple(x.shape[2:]) == hw else F.adaptive_avg_pool2d(x, hw)


class QCO1d(nn.Module):
    """1-D quantisation and counting operator: (N, 256, H, W) -> (sta (N, 128, K), sim, levels)."""

    def __init__(self, level_num: int, *, backend: str = "auto"):
        super().__init__()
        self.conv1 = nn.Sequential(_conv(256, 256, 3, 1, has_relu=False),
                                   nn.LeakyReLU(inplace=True))
        self.conv2 = _conv(256, 128, has_bn=False, has_relu=False)
        self.f1 = nn.Sequential(_conv(2, 64, has_bn=False, has_relu=False, dim=1),
                                nn.LeakyReLU(inplace=True))
        self.f2 = _conv(64, 128, has_bn=False, dim=1)
        self.out = _conv(256, 128, has_bn=True, dim=1)
        self.level_num = level_num
        self.backend = backend

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.conv2(self.conv1(x))
        n, c = x.shape[:2]
        counts, levels, sim = qco_1d(x, self.level_num, backend=self.backend)
        sta = torch.stack([levels, counts], dim=1)                      # (N, 2, K)
        sta = self.f2(self.f1(sta))                                     # (N, 128, K)
        x_ave = x.mean((2, 3)).unsqueeze(-1).expand(n, c, self.level_num)
        sta = self.out(torch.cat([sta, x_ave], dim=1))                  # (N, 128, K)
        return sta, sim, levels

    def extra_repr(self) -> str:
        return f"level_num={self.level_num}"


class QCO2d(nn.Module):
    """2-D quantisation and counting operator: (N, 256, H, W) -> (N, 128, scale, scale)."""

    def __init__(self, scale: int, level_num: int, *, backend: str = "auto"):
        super().__init__()
        self.f1 = nn.Sequential(_conv(3, 64, has_bn=False, has_relu=False),
                                nn.LeakyReLU(inplace=True))
        self.f2 = _conv(64, 128, has_bn=False)
        self.out = nn.Sequential(_conv(256 + 128, 128, has_bn=True, has_relu=True),
                                 _conv(128, 128, has_bn=True, has_relu=False))
        self.scale = scale
        self.level_num = level_num
        self.backend = backend

    def pooled_size(self, h: int, w: int) -> tuple[int, int]:
        """Official: floor to a multiple of level_num; here also a multiple of scale."""
        m = self.level_num * self.scale // math.gcd(self.level_num, self.scale)
        k = self.level_num
        return valid_size(h, m, h // k * k), valid_size(w, m, w // k * k)

    def forward(self, x: Tensor) -> Tensor:
        x = _pool_to(x, self.pooled_size(*x.shape[2:]))
        n, c, h, w = x.shape
        s, k = self.scale, self.level_num
        cooc, levels = qco_2d(x, k, s, backend=self.backend)           # (N,s,s,K,K), (N,s,s,K)
        levels = levels.reshape(n, s * s, k)
        lev_h = levels.unsqueeze(2).expand(n, s * s, k, k)              # [.., a, b] = L_b
        lev_w = levels.unsqueeze(3).expand(n, s * s, k, k)              # [.., a, b] = L_a
        sta = torch.stack([lev_h, lev_w, cooc.reshape(n, s * s, k, k)], dim=1)
        sta = sta.reshape(n, 3, s * s, k * k)
        sta = self.f2(self.f1(sta))                                     # (N, 128, s*s, K*K)
        x_ave = x.view(n, c, s, h // s, s, w // s).mean((3, 5)).reshape(n, c, s * s, 1)
        sta = torch.cat([x_ave.expand(n, c, s * s, k * k), sta], dim=1)
        sta = self.out(sta).mean(-1)                                    # (N, 128, s*s)
        return sta.view(n, -1, s, s)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, level_num={self.level_num}"


class TextureEnhance(nn.Module):
    """TEM: (N, 256, H, W) -> (N, 256, H, W), level-wise attention then per-pixel reconstruction."""

    def __init__(self, level_num: int = 128, *, backend: str = "auto"):
        super().__init__()
        self.level_num = level_num
        self.qco = QCO1d(level_num, backend=backend)
        self.k = _conv(128, 128, has_bn=False, has_relu=False, dim=1)
        self.q = _conv(128, 128, has_bn=False, has_relu=False, dim=1)
        self.v = _conv(128, 128, has_bn=False, has_relu=False, dim=1)
        self.out = _conv(128, 256, dim=1)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        sta, sim, levels = self.qco(x)                                  # (N, 128, K)
        k, q, v = self.k(sta), self.q(sta), self.v(sta)
        attn = F.softmax(torch.bmm(k.permute(0, 2, 1), q), dim=-1)      # (N, K, K)
        f = torch.bmm(attn, v.permute(0, 2, 1)).permute(0, 2, 1)        # (N, 128, K)
        f = self.out(f)                                                 # (N, 256, K)
        return texture_reconstruct(sim, levels, f, backend=self.backend)


class PyramidTextureExtraction(nn.Module):
    """PTFEM: (N, 512, H, W) -> (N, 256, H, W), 2-D QCO at scales 1, 2, 3, 6 with 8 levels."""

    SCALES = (1, 2, 3, 6)

    def __init__(self, level_num: int = 8, *, backend: str = "auto"):
        super().__init__()
        self.conv = _conv(512, 256, has_bn=False, has_relu=False)
        self.qco_1 = QCO2d(1, level_num, backend=backend)
        self.qco_2 = QCO2d(2, level_num, backend=backend)
        self.qco_3 = QCO2d(3, level_num, backend=backend)
        self.qco_6 = QCO2d(6, level_num, backend=backend)
        self.out = _conv(512, 256)
        self.level_num = level_num

    def pooled_size(self, h: int, w: int) -> tuple[int, int]:
        m = self.level_num
        for s in self.SCALES:
            m = m * s // math.gcd(m, s)
        k = self.level_num
        return valid_size(h, m, h // k * k), valid_size(w, m, w // k * k)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[2:]
        x = self.conv(x)
        x = _pool_to(x, self.pooled_size(h, w))  # once, for every scale
        stas = [F.interpolate(m(x), size=(h, w), mode="bilinear", align_corners=True)
                for m in (self.qco_1, self.qco_2, self.qco_3, self.qco_6)]
        return self.out(torch.cat(stas, dim=1))


class STL(nn.Module):
    """The STL block: (N, in_channel, H, W) -> (N, 768, H, W) = [PTFEM, TEM, x] after conv_start."""

    out_channels = 768

    def __init__(self, in_channel: int, *, backend: str = "auto"):
        super().__init__()
        self.conv_start = _conv(in_channel, 256)
        self.tem = TextureEnhance(128, backend=backend)
        self.ptfem = PyramidTextureExtraction(8, backend=backend)
        self.in_channel = in_channel

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_start(x)
        x = torch.cat([self.tem(x), x], dim=1)                          # 512
        return torch.cat([self.ptfem(x), x], dim=1)                     # 768

    def extra_repr(self) -> str:
        return f"in_channel={self.in_channel}"
