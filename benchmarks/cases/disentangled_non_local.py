"""disentangled_non_local benchmark cases (docs/operators.md §4).

GPU: N=2, Ck=256, Cv=512, 97x97 (whiten, unary, temperature 0.05); N=1, 128x256.
CPU: same channels, half of each spatial side (49x49, 64x128). Providers: reference,
reference+compile, the SDPA composition (centre q and k, F.scaled_dot_product_attention, add the
unary term) and every fused backend.

Cost, with L = H·W query and key positions (common.attention_cost for the attention):
forward 2·N·L·L·(Ck+Cv) for QKᵀ and PV, plus 2·N·Ck·2L for whitening (means and subtraction of
query and key), 2·N·Cv·L for the unary term V·softmax(unary) and N·Cv·L for adding it to every
query; backward twice the attention, the whitening again (the gradients' means), and for the
unary term Σ_q dO (N·Cv·L), dV += w·(Σ_q dO) (2·N·Cv·L) and d(softmax(unary)) = Vᵀ·Σ_q dO
(2·N·Cv·L). Softmax exponentials are not counted. Bytes: forward reads query, key, value, unary
and writes the output; backward reads the output's gradient and the four inputs and writes their
four gradients.
"""
import sys

import torch
import torch.nn.functional as F

import segops
from benchmarks.common import Case, attention_cost, case_shapes, sample_maker, standard_providers
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


def cost(kw):
    n, ck = kw["query"].shape[:2]
    cv = kw["value"].shape[1]
    lq, lk = kw["query"][0, 0].numel(), kw["key"][0, 0].numel()
    whiten = 2.0 * n * ck * (lq + lk) if kw["whiten"] else 0.0
    unary_fwd = 2.0 * n * cv * lk + n * cv * lq if kw.get("unary") is not None else 0.0
    unary_bwd = n * cv * lq + 4.0 * n * cv * lk if kw.get("unary") is not None else 0.0
    return attention_cost(kw, n * lq, lk, extra_fwd=whiten + unary_fwd,
                          extra_bwd=whiten + unary_bwd)


def cases(device: str, dtype: torch.dtype, quick: bool = False):
    out = []
    for n, ck, cv, h, w in case_shapes(sys.modules[__name__], device, quick):
        sample = SPEC.make(torch.Generator().manual_seed(0), "bench", n, ck, cv, (h, w), (h, w),
                           qk_scale=1.0, temperature=TEMPERATURE)
        providers = standard_providers(OP, reference, segops.disentangled_non_local, device, dtype,
                                       extra={"sdpa": sdpa})
        out.append(Case(OP, f"N{n} Ck{ck} Cv{cv} {h}x{w} whiten+unary T{TEMPERATURE}",
                        sample_maker(sample), sample.grads, providers, cost=cost,
                        params=dict(N=n, Ck=ck, Cv=cv, H=h, W=w, whiten=True, unary=True,
                                    temperature=TEMPERATURE)))
    return out
