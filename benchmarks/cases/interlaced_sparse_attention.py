"""interlaced_sparse_attention benchmark cases (docs/operators.md §4).

GPU: N=2, Ck=256, Cv=512, 104x104 and 128x256, block (8, 8), both modes.
CPU: same channels, half of each side: 52x52 and 64x128. 52 is not a multiple of 8, and the op
needs H % Ph == 0, so the 52x52 map runs at 56x56: the size the InterlacedSparseAttention module
pads a 52x52 map to before calling the op.
Providers: reference, reference+compile, sdpa (permute into groups, F.scaled_dot_product_attention,
permute back) and the fused backends.

Cost (common.attention_cost): each of the N·H·W positions attends to the members of its group,
(H/Ph)·(W/Pw) of them in the long mode and Ph·Pw in the short mode: forward
2·N·H·W·members·(Ck+Cv) FLOPs, backward twice that; softmax and the permutations into groups
are not counted (a fused kernel needs no permutation). Bytes: forward reads query, key, value and
writes the output; backward reads the output's gradient and the inputs, writes their gradients.
"""
import sys

import torch
import torch.nn.functional as F

import segops
from benchmarks.common import Case, attention_cost, case_shapes, sample_maker, standard_providers
from segops.ops.interlaced_sparse_attention import SPEC
from segops.reference.interlaced_sparse_attention import from_groups, to_groups
from segops.reference.interlaced_sparse_attention import interlaced_sparse_attention as reference

OP = "interlaced_sparse_attention"
BLOCK = (8, 8)
GPU_SHAPES = [(2, 256, 512, 104, 104), (2, 256, 512, 128, 256)]
CPU_SHAPES = [(2, 256, 512, 56, 56), (2, 256, 512, 64, 128)]
QUICK_SHAPES = [(1, 16, 32, 16, 24)]
DEFAULT_CPU_CASES = 2  # the first shape, both modes


def sdpa(query, key, value, block_size=BLOCK, mode="long"):
    n, _, h, w = query.shape
    q, k, v = (to_groups(t, block_size, mode).unsqueeze(1) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v)  # default scale = Ck**-0.5
    return from_groups(out.squeeze(1), (n, value.shape[1], h, w), block_size, mode)


def cost(kw):
    n, _, h, w = kw["query"].shape
    members = (h // BLOCK[0]) * (w // BLOCK[1]) if kw["mode"] == "long" else BLOCK[0] * BLOCK[1]
    return attention_cost(kw, n * h * w, members)


def cases(device: str, dtype: torch.dtype, quick: bool = False):
    out = []
    for n, ck, cv, h, w in case_shapes(sys.modules[__name__], device, quick):
        for mode in ("long", "short"):
            sample = SPEC.make(torch.Generator().manual_seed(0), "bench", (n, ck, cv, h, w), BLOCK,
                               mode)
            out.append(Case(OP, f"N{n} Ck{ck} Cv{cv} {h}x{w} {mode}", sample_maker(sample),
                            sample.grads,
                            standard_providers(OP, reference, segops.interlaced_sparse_attention,
                                               device, dtype, extra={"sdpa": sdpa}),
                            cost=cost,
                            params=dict(N=n, Ck=ck, Cv=cv, H=h, W=w, block=BLOCK, mode=mode)))
    return out
