"""criss_cross_attention benchmark cases (docs/operators.md §4): N=2, Ck=64, Cv=512, 97x97; N=1, 128x256."""
import sys

import torch

import segops
from benchmarks.common import Case, attention_bytes, case_shapes, sample_maker, standard_providers
from segops.ops.criss_cross_attention import SPEC
from segops.reference.criss_cross_attention import criss_cross_attention as reference

OP = "criss_cross_attention"
GPU_SHAPES = [(2, 64, 512, 97, 97), (1, 64, 512, 128, 256)]
# CPU: same channels, a quarter of the spatial size (half of each side).
CPU_SHAPES = [(2, 64, 512, 49, 49), (1, 64, 512, 64, 128)]
QUICK_SHAPES = [(1, 16, 32, 17, 23)]


def _flops(kw):
    n, ck, h, w = kw["query"].shape
    cv = kw["value"].shape[1]
    return 2.0 * n * h * w * (h + w - 1) * (ck + cv)


def cases(device: str, dtype: torch.dtype, quick: bool = False):
    out = []
    for n, ck, cv, h, w in case_shapes(sys.modules[__name__], device, quick):
        sample = SPEC.make(torch.Generator().manual_seed(0), "bench", n, ck, cv, h, w)
        out.append(Case(OP, f"N{n} Ck{ck} Cv{cv} {h}x{w}", sample_maker(sample), sample.grads,
                        standard_providers(OP, reference, segops.criss_cross_attention, device, dtype),
                        flops=_flops, bytes=attention_bytes,
                        params=dict(N=n, Ck=ck, Cv=cv, H=h, W=w)))
    return out
