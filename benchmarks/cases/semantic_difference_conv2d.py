"""semantic_difference_conv2d benchmark cases (docs/operators.md §4): N=2, Cin=Cout=512, 3x3, 97x97 and 128x256,
both similarities (charbonnier with Cg = Cin; gaussian with Cg = Cin too, as in the SDN neck).

Providers: the fused backends, the unfold reference (eager and compiled), and `conv2d`, a plain
F.conv2d of the same shape: the speed-of-light anchor (same GEMM, no weighted differences).
Every row also reports its time against `conv2d`'s (`vs_anchor`): the fused cpu backend's
forward+backward sits at about 1.16x of it, and a regression shows there first.

Cost, with P = N·H·W output positions and T = k·k taps: forward 2·P·T·Cin·Cout for the product
with the weight, plus per (position, tap, input channel) the neighbour difference of the input
(1 FLOP) and the similarity weighting (charbonnier: guidance difference, square, scale, add,
rsqrt, multiply: 6; gaussian with Cg = Cin: guidance difference and squared accumulation 3,
multiply 1). Backward: two products of the forward's size (the weight's gradient, and the
gradient of the weighted differences), then per (position, tap, input channel) the differences
and similarity again, the scatter of the difference's gradient to the input (2) and the
similarity's gradient to the guidance (5). Bytes: forward reads input, guidance, weight and
writes the output; backward reads the output's gradient and the inputs and writes the gradients
of input, guidance and weight.
"""
import sys

import torch
import torch.nn.functional as F

import segops
from benchmarks.common import (Case, Cost, case_shapes, io_bytes, mode_costs, sample_maker,
                               standard_providers)
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


# FLOPs per (position, tap, input channel) besides the product with the weight.
ELEMENTWISE_FWD = {"charbonnier": 7.0, "gaussian": 5.0, "none": 1.0}
ELEMENTWISE_BWD_EXTRA = 7.0  # scatter to the input (2) and the similarity's gradient (5)


def cost(kw):
    n, cin, h, w = kw["input"].shape
    cout, _, k, _ = kw["weight"].shape
    taps = float(n * h * w * k * k * cin)
    elementwise = ELEMENTWISE_FWD[kw["similarity"]] * taps
    inputs = [t for t in kw.values() if isinstance(t, torch.Tensor)]
    fwd_bytes, bwd_bytes = io_bytes(inputs, n * cout * h * w * kw["input"].element_size())
    return mode_costs(Cost(2.0 * taps * cout + elementwise, fwd_bytes),
                      Cost(4.0 * taps * cout + elementwise + ELEMENTWISE_BWD_EXTRA * taps, bwd_bytes))


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
                            cost=cost, anchor="conv2d",
                            params=dict(N=n, Cin=cin, Cout=cout, k=K, H=h, W=w, similarity=sim)))
    return out
