"""disentangled_non_local benchmark cases (docs/operators.md §4).

GPU: N=2, Ck=256, Cv=512, 97x97 (whiten, unary, temperature 0.05); N=1, 128x256.
CPU: same channels, half of each spatial side (49x49, 64x128). Providers: reference,
reference+compile, the SDPA composition (centre q and k, F.scaled_dot_product_attention, add the
unary term) and every fused backend.
"""
import sys

import torch
import torch.nn.functional as F

import segops
from benchmarks.common import Case, case_shapes, sample_maker, standard_providers, tensor_bytes
from segops.ops.disentangled_non_local import SPEC
from segops.reference.disentangled_non_local import disentangled_non_local as reference

OP = "disentangled_non_local"
GPU_SHAPES = [(2, 256, 512, 97, 97), (1, 256, 512, 128, 256)]
CPU_SHAPES = [(2, 256, 512, 49, 49), (1, 256, 512, 64, 128)]
QUICK_SHAPES = [(1, 32, 48, 17, 23)]
TEMPERATURE = 0.05


def sdpa(query, key, value, unary=None, *, whiten=True, scale=None, temperature=1.0):
    """The same operator composed from F.scaled_dot_product_attention."""
    n, ck = query.shape[:2]
    cv = value.shape[1]
    q = query.reshape(n, ck, -1)
    k = key.reshape(n, ck, -1)
    v = value.reshape(n, cv, -1)
    if whiten:
        q = q - q.mean(dim=-1, keepdim=True)
        k = k - k.mean(dim=-1, keepdim=True)
    s = (ck ** -0.5 if scale is None else scale) / temperature
    y = F.scaled_dot_product_attention(q.transpose(1, 2).unsqueeze(1), k.transpose(1, 2).unsqueeze(1),
                                       v.transpose(1, 2).unsqueeze(1), scale=s)  # (N, 1, Lq, Cv)
    y = y.squeeze(1).transpose(1, 2)
    if unary is not None:
        w = unary.reshape(n, -1, 1).softmax(dim=1)
        y = y + torch.bmm(v, w)
    return y.reshape(n, cv, *query.shape[2:])


def _flops(kw):
    n, ck = kw["query"].shape[:2]
    lq = kw["query"][0, 0].numel()
    lk = kw["key"][0, 0].numel()
    cv = kw["value"].shape[1]
    return 2.0 * n * lq * lk * (ck + cv)


def _bytes(kw):
    return (tensor_bytes(kw["query"], kw["key"], kw["value"], kw["unary"])
            + kw["value"].element_size() * kw["value"].shape[1] * kw["query"][:, 0].numel())


def cases(device: str, dtype: torch.dtype, quick: bool = False):
    out = []
    for n, ck, cv, h, w in case_shapes(sys.modules[__name__], device, quick):
        sample = SPEC.make(torch.Generator().manual_seed(0), "bench", n, ck, cv, (h, w), (h, w),
                           qk_scale=1.0, temperature=TEMPERATURE)
        providers = standard_providers(OP, reference, segops.disentangled_non_local, device, dtype,
                                       extra={"sdpa": sdpa})
        out.append(Case(OP, f"N{n} Ck{ck} Cv{cv} {h}x{w} whiten+unary T{TEMPERATURE}",
                        sample_maker(sample), sample.grads, providers, flops=_flops, bytes=_bytes,
                        params=dict(N=n, Ck=ck, Cv=cv, H=h, W=w, whiten=True, unary=True,
                                    temperature=TEMPERATURE)))
    return out
