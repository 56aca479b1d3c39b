"""`NonLocal2d` and `DisentangledNonLocal2d`: drop-ins for mmcv's and mmseg's blocks (docs/operators.md §2.3).

Same constructor arguments, submodule names and state_dict keys as
`mmcv.cnn.NonLocal2d` (`g`, `theta`, `phi`, `conv_out` ConvModules: `<name>.conv.weight/bias`,
`conv_out.bn.*` with a norm; `concat_project` in concatenation mode; `g.0`/`phi.0` when
`sub_sample`) and mmseg 1.x `DisentangledNonLocal2d` (adds `conv_mask` C->1 with bias), so
their checkpoints load unchanged. The softmax attention runs on `segops.disentangled_non_local`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from segops.nn.common import ConvModule, Norm
from segops.ops.disentangled_non_local import disentangled_non_local

_MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")


class NonLocal2d(nn.Module):
    """Non-local block (Wang et al. 2018): `x + conv_out(y)`, mmcv's `NonLocal2d`.

    Modes: 'embedded_gaussian' (softmax of <theta, phi>, scaled by inter_channels**-0.5 when
    `use_scale`), 'gaussian' (softmax of <x_i, x_j>), 'dot_product' (<theta, phi> / Lk, no
    softmax), 'concatenation' (ReLU(w . [theta; phi]) / Lk). The softmax modes run on the fused
    segops op; the linear modes are computed without materialising the Lq x Lk matrix where
    possible. `norm_cfg` (of `conv_out`) is an mmcv norm_cfg dict or one of this package's norm
    names ("bn", "syncbn", "gn"). `backend` is keyword-only and not part of the state.
    """

    _whiten = False

    def __init__(self, in_channels: int, reduction: int = 2, use_scale: bool = True,
                 conv_cfg: Optional[dict] = None, norm_cfg: Norm = None,
                 mode: str = "embedded_gaussian", sub_sample: bool = False, *,
                 std: float = 0.01, zeros_init: bool = True, backend: str = "auto") -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"Mode should be in 'gaussian', 'concatenation', 'embedded_gaussian' "
                             f"or 'dot_product', but got {mode} instead.")
        self.in_channels = in_channels
        self.reduction = reduction
        self.use_scale = use_scale
        self.inter_channels = in_channels // reduction
        if self.in_channels == 0:
            self.in_channels = 1
        self.mode = mode
        self.sub_sample = sub_sample
        self.backend = backend
        if conv_cfg is not None and conv_cfg.get("type") not in ("Conv2d", "Conv"):
            raise ValueError(f"conv_cfg must be None or dict(type='Conv2d'), got {conv_cfg!r}")

        def conv1x1(cin, cout, norm=None):
            return ConvModule(cin, cout, 1, norm=norm, act=None)
        self.g = conv1x1(self.in_channels, self.inter_channels)
        self.conv_out = conv1x1(self.inter_channels, self.in_channels, norm_cfg)
        if mode != "gaussian":
            self.theta = conv1x1(self.in_channels, self.inter_channels)
            self.phi = conv1x1(self.in_channels, self.inter_channels)
        if mode == "concatenation":
            self.concat_project = ConvModule(self.inter_channels * 2, 1, 1, bias=False, norm=None)
        if sub_sample:
            pool = nn.MaxPool2d(kernel_size=(2, 2))
            self.g = nn.Sequential(self.g, pool)
            self.phi = nn.Sequential(self.phi, pool) if mode != "gaussian" else pool
        self.init_weights(std, zeros_init)

    def init_weights(self, std: float = 0.01, zeros_init: bool = True) -> None:
        convs = [self.g, self.theta, self.phi] if self.mode != "gaussian" else [self.g]
        for m in convs:
            conv = m[0].conv if isinstance(m, nn.Sequential) else m.conv
            nn.init.normal_(conv.weight, 0, std)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        norm = self.conv_out.norm_layer
        target = norm if norm is not None else self.conv_out.conv
        if zeros_init:
            nn.init.zeros_(target.weight)
        else:
            nn.init.normal_(target.weight, 0, std)
        if target.bias is not None:
            nn.init.zeros_(target.bias)

    def _embed(self, x: Tensor):
        if self.mode == "gaussian":
            theta = x
            phi = self.phi(x) if self.sub_sample else x
        else:
            theta, phi = self.theta(x), self.phi(x)
        return theta, phi

    def _unary(self, x: Tensor) -> Optional[Tensor]:
        return None

    def _temperature(self) -> float:
        return 1.0

    def _attend(self, x: Tensor) -> Tensor:
        """y (with the unary term, if any) in (N, inter_channels, H, W)."""
        n, _, h, w = x.shape
        theta, phi = self._embed(x)
        g = self.g(x)
        if self.mode in ("gaussian", "embedded_gaussian"):
            scale = None if (self.mode == "embedded_gaussian" and self.use_scale) else 1.0
            return disentangled_non_local(theta, phi, g, self._unary(x), whiten=self._whiten,
                                          scale=scale, temperature=self._temperature(),
                                          backend=self.backend)
        ci, cv = theta.shape[1], g.shape[1]
        t = theta.reshape(n, ci, -1)
        p = phi.reshape(n, ci, -1)
        gv = g.reshape(n, cv, -1)
        if self._whiten:
            t = t - t.mean(dim=-1, keepdim=True)
            p = p - p.mean(dim=-1, keepdim=True)
        lk = p.shape[-1]
        if self.mode == "dot_product":
            # (theta^T phi / Lk) g^T, associated as theta^T (phi g^T) / Lk: no Lq x Lk matrix.
            y = torch.matmul(torch.matmul(gv, p.transpose(1, 2)), t) / lk
        else:  # concatenation: ReLU(w_t . theta_i + w_p . phi_j) / Lk
            wgt = self.concat_project.conv.weight.view(2 * ci)
            a = torch.einsum("c,ncl->nl", wgt[:ci], t)
            b = torch.einsum("c,ncl->nl", wgt[ci:], p)
            pairwise = torch.relu(a[:, :, None] + b[:, None, :]) / lk
            y = torch.matmul(gv, pairwise.transpose(1, 2))
        u = self._unary(x)
        if u is not None:
            y = y + torch.matmul(gv, u.reshape(n, -1, 1).softmax(dim=1))
        return y.reshape(n, cv, h, w)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_out(self._attend(x))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, "
                f"mode={self.mode!r}, use_scale={self.use_scale}, sub_sample={self.sub_sample}")


class DisentangledNonLocal2d(NonLocal2d):
    """Disentangled non-local block (DNLNet), mmseg 1.x's `DisentangledNonLocal2d`.

    `x + conv_out(y + u)` where y is the whitened pairwise term (query and key mean-subtracted,
    logits divided by `temperature`) and u the unary term `sum_j softmax_j(conv_mask(x)_j) g_j`,
    with `conv_mask` a 1x1 conv C->1 (with bias). With `sub_sample`, the unary mask is pooled
    like the keys (mmseg's code does not support that combination).
    """

    _whiten = True

    def __init__(self, in_channels: int, reduction: int = 2, use_scale: bool = True,
                 conv_cfg: Optional[dict] = None, norm_cfg: Norm = None,
                 mode: str = "embedded_gaussian", sub_sample: bool = False, *,
                 temperature: float = 0.05, std: float = 0.01, zeros_init: bool = True,
                 backend: str = "auto") -> None:
        super().__init__(in_channels, reduction, use_scale, conv_cfg, norm_cfg, mode, sub_sample,
                         std=std, zeros_init=zeros_init, backend=backend)
        self.temperature = temperature
        self.conv_mask = nn.Conv2d(self.in_channels, 1, kernel_size=1)
        self._pool = nn.MaxPool2d(kernel_size=(2, 2)) if self.sub_sample else None

    def _unary(self, x: Tensor) -> Tensor:
        u = self.conv_mask(x)
        return self._pool(u) if self._pool is not None else u

    def _temperature(self) -> float:
        return self.temperature if self.mode == "embedded_gaussian" else 1.0

    def extra_repr(self) -> str:
        return super().extra_repr() + f", temperature={self.temperature}"
