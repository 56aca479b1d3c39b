"""criss_cross_attention benchmark cases (docs/operators.md §4): N=2, Ck=64, Cv=512, 97x97; N=1, 128x256.

Cost (common.attention_cost): each of the N·H·W positions attends to the H+W-1 positions of its
row and column: forward 2·N·H·W·(H+W-1)·(Ck+Cv) FLOPs, backward twice that (four products
against the forward's two); the joint softmax is not counted. Bytes: forward reads query, key,
value and writes the output; backward reads the output's gradient, query, key and value and
writes their three gradients.
"""
import sys

import torch

import segops
from benchmarks.common import Case, attention_cost, case_shapes, sample_maker, standard_providers
from segops.ops.criss_cross_attention import SPEC
from segops.reference.criss_cross_attention import criss_cross_attention as reference

OP = "criss_cross_attention"
GPU_SHAPES = [(2, 64, 512, 97, 97), (1, 64, 512, 128, 256)]
# CPU: same channels, a quarter of the spatial size (half of each side).
CPU_SHAPES = [(2, 64, 512, 49, 49), (1, 64, 512, 64, 128)]
QUICK_SHAPES = [(1, 16, 32, 17, 23)]


def cost(kw):
    n, _, h, w = kw["query"].shape
    return attention_cost(kw, n * h * w, h + w - 1)


def cases(device: str, dtype: torch.dtype, quick: bool = False):
    out = []
    for n, ck, cv, h, w in case_shapes(sys.modules[__name__], device, quick):
        sample = SPEC.make(torch.Generator().manual_seed(0), "bench", n, ck, cv, h, w)
        out.append(Case(OP, f"N{n} Ck{ck} Cv{cv} {h}x{w}", sample_maker(sample), sample.grads,
                        standard_providers(OP, reference, segops.criss_cross_attention, device, dtype),
                        cost=cost, params=dict(N=n, Ck=ck, Cv=cv, H=h, W=w)))
    return out
