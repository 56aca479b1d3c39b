"""`summary(name, input_size)`: a model's parameter count, the parameters an eval forward
uses, and the multiply-accumulates of that forward.

MACs are counted by `torch.utils.flop_counter.FlopCounterMode` (convolutions, matrix
products, attention; not element-wise ops, norms or pooling), which counts 2 FLOPs per
multiply-accumulate: MACs = FLOPs / 2. This is the convention of torchvision's "GFLOPS" and of
most segmentation papers' "FLOPs". The forward runs on the meta device when the model allows
it (nothing is computed), else on the CPU.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelSummary:
    name: str
    input_size: tuple
    params: int
    params_used: int
    macs: int

    def __str__(self) -> str:
        h, w = self.input_size
        return (f"{self.name} at {h}x{w}: {self.params:,} parameters "
                f"({self.params_used:,} used by an eval forward), "
                f"{self.macs / 1e9:.3f} GMACs ({2 * self.macs / 1e9:.3f} GFLOPs)")


class _ParameterUse(TorchFunctionMode):
    """Records every parameter passed to a torch function."""

    def __init__(self, params) -> None:
        super().__init__()
        self.params = {id(p): p for p in params}
        self.used: dict[int, nn.Parameter] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor) and id(a) in self.params:
                self.used[id(a)] = a
        return func(*args, **kwargs)


def count(model: nn.Module, input_size, name: str = "model", device="cpu") -> ModelSummary:
    """Summary of an eval forward of `model` on a (1, 3, H, W) input on `device`."""
    h, w = input_size
    model.eval()
    params = list(model.parameters())
    img = torch.zeros(1, 3, h, w, device=device)
    use = _ParameterUse(params)
    flops = FlopCounterMode(display=False)
    with torch.no_grad(), warnings.catch_warnings(), flops, use:
        # segops layers warn that meta tensors have no fused backend (the reference one runs)
        warnings.simplefilter("ignore", RuntimeWarning)
        model(img)
    return ModelSummary(name, (h, w), sum(p.numel() for p in params),
                        sum(p.numel() for p in use.used.values()), flops.get_total_flops() // 2)


def _build(name: str, num_classes, device):
    from segops.models import backbones, build, list_models
    with torch.device(device):
        if name in list_models():
            return build(name, num_classes=num_classes)
        if name in backbones.list_backbones():
            return backbones.build_backbone(name)
    raise ValueError(f"unknown model or backbone {name!r}")


def summary(name: str, input_size=(512, 1024), num_classes=None) -> ModelSummary:
    """Parameters (all, and those an eval forward uses) and MACs of an eval forward of model
    (or backbone) `name` at `input_size` (H, W), batch 1."""
    try:
        return count(_build(name, num_classes, "meta"), input_size, name, "meta")
    except (NotImplementedError, RuntimeError):  # a data-dependent op: run it for real
        return count(_build(name, num_classes, "cpu"), input_size, name, "cpu")
