"""semantic_difference_conv2d benchmark cases (docs/operators.md §4): N=2, Cin=Cout=512, 3x3, 97x97 and 128x256,
both similarities (charbonnier with Cg = Cin; gaussian with Cg = Cin too, as in the SDN neck).

Providers: the fused backends, the unfold reference (eager and compiled), and `conv2d`, a plain
F.conv2d of the same shape: the speed-of-light anchor (same GEMM, no weighted differences).
"""
import sys

import torch
import torch.nn.functional as F

import segops
from benchmarks.common import Case, case_shapes, sample_maker, standard_providers, tensor_bytes
from segops.ops.semantic_difference_conv2d import SPEC
from segops.reference.semantic_difference_conv2d import semantic_difference_conv2d as reference

OP = "semantic_difference_conv2d"
SIMILARITIES = ("charbonnier", "gaussian")
GPU_SHAPES = [(2, 512, 512, 97, 97), (2, 512, 512, 128, 256)]
# CPU: same channels, a quarter of the spatial size (half of each side).
CPU_SHAPES = [(2, 512, 512, 49, 49), (2, 512, 512, 64, 128)]
QUICK_SHAPES = [(1, 16, 24, 13, 17)]
DEFAULT_CPU_CASES = 2  # the default CPU run: the first shape with both similarities
K = 3


def _conv2d(input, guidance, weight, similarity, dilation, sigma):
    return F.conv2d(input, weight, padding=(weight.shape[-1] - 1) // 2)


def _flops(kw):
    n, cin, h, w = kw["input"].shape
    cout, _, k, _ = kw["weight"].shape
    return 2.0 * n * h * w * cout * cin * k * k


def _bytes(kw):
    out = kw["input"].new_empty(0)
    n, _, h, w = kw["input"].shape
    return (tensor_bytes(kw["input"], kw["guidance"], kw["weight"])
            + n * kw["weight"].shape[0] * h * w * out.element_size())


def cases(device: str, dtype: torch.dtype, quick: bool = False):
    out = []
    for n, cin, cout, h, w in case_shapes(sys.modules[__name__], device, quick):
        for sim in SIMILARITIES:
            sample = SPEC.make(torch.Generator().manual_seed(0), "bench", sim, K, 1, n, cin, cin,
                               cout, h, w, False, sigma=1.0)
            providers = standard_providers(OP, reference, segops.semantic_difference_conv2d,
                                           device, dtype, extra={"conv2d": _conv2d})
            out.append(Case(OP, f"N{n} C{cin}->{cout} {K}x{K} {h}x{w} {sim}", sample_maker(sample),
                            sample.grads, providers,
                            flops=_flops, bytes=_bytes,
                            params=dict(N=n, Cin=cin, Cout=cout, k=K, H=h, W=w, similarity=sim)))
    return out
