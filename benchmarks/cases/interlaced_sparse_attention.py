"""interlaced_sparse_attention benchmark cases (docs/operators.md §4).

GPU: N=2, Ck=256, Cv=512, 104x104 and 128x256, block (8, 8), both modes.
CPU: same channels, half of each side: 52x52 and 64x128. 52 is not a multiple of 8, and the op
needs H % Ph == 0, so the 52x52 map runs at 56x56: the size the InterlacedSparseAttention module
pads a 52x52 map to before calling the op.
Providers: reference, reference+compile, sdpa (permute into groups, F.scaled_dot_product_attention,
permute back) and the fused backends.

Window attention (Swin-T stage 1: 3 heads of 32 channels, 56x56 tokens, 7x7 windows, shifted:
bias = a relative position bias per head, mask = the 0/-100 shift mask per window), "short" mode
with the heads folded into the batch. GPU: batch 8 (ImageNet-224 training); CPU: batch 1.
Providers: the op's reference (permute into windows, logits + bias + mask, softmax), sdpa (the
windows through F.scaled_dot_product_attention with attn_mask = bias + mask) and the fused
backends.

Cost (common.attention_cost): each of the N·H·W positions attends to the members of its group,
(H/Ph)·(W/Pw) of them in the long mode and Ph·Pw in the short mode: forward
2·N·H·W·members·(Ck+Cv) FLOPs, backward twice that; softmax and the permutations into groups
are not counted (a fused kernel needs no permutation). Bytes: forward reads query, key, value and
writes the output; backward reads the output's gradient and the inputs, writes their gradients.
Window cases add the bias and mask additions to the uncounted elementwise work; both passes read
the bias and the mask, the backward writes the bias's gradient (the mask gets none).
"""
import sys

import torch
import torch.nn.functional as F

import segops
from benchmarks.common import (Case, Cost, attention_cost, case_shapes, fused_providers,
                               mode_costs, sample_maker, standard_providers, tensor_bytes)
from segops.models.backbones.swin import shifted_window_mask
from segops.ops.interlaced_sparse_attention import SPEC
from segops.reference.interlaced_sparse_attention import from_groups, to_groups
from segops.reference.interlaced_sparse_attention import interlaced_sparse_attention as reference

OP = "interlaced_sparse_attention"
BLOCK = (8, 8)
GPU_SHAPES = [(2, 256, 512, 104, 104), (2, 256, 512, 128, 256)]
CPU_SHAPES = [(2, 256, 512, 56, 56), (2, 256, 512, 64, 128)]
QUICK_SHAPES = [(1, 16, 32, 16, 24)]
# Window attention: (batch, heads, head channels, H, W, window), shifted by window // 2.
WINDOW_GPU_SHAPES = [(8, 3, 32, 56, 56, 7)]
WINDOW_CPU_SHAPES = [(1, 3, 32, 56, 56, 7)]
WINDOW_QUICK_SHAPES = [(1, 2, 8, 8, 8, 4)]
DEFAULT_CPU_CASES = 3  # the first shape, both modes, and the window case


def sdpa(query, key, value, block_size=BLOCK, mode="long"):
    n, _, h, w = query.shape
    q, k, v = (to_groups(t, block_size, mode).unsqueeze(1) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v)  # default scale = Ck**-0.5
    return from_groups(out.squeeze(1), (n, value.shape[1], h, w), block_size, mode)


def sdpa_windows(query, key, value, bias, mask, block_size, mode):
    """Window attention as SDPA over the groups, attn_mask = bias[n % nb] + mask[g % nm]."""
    n, _, h, w = query.shape
    nb, nm, members = bias.shape[0], mask.shape[0], bias.shape[1]
    q, k, v = (to_groups(t, block_size, mode) for t in (query, key, value))
    groups = q.shape[0] // n
    q, k, v = (t.view(n // nb, nb * groups, members, t.shape[-1]) for t in (q, k, v))
    attn_mask = (bias[:, None] + mask.repeat(groups // nm, 1, 1)).view(nb * groups, members, members)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return from_groups(out.reshape(n * groups, members, -1), (n, value.shape[1], h, w),
                       block_size, mode)


def cost(kw):
    n, _, h, w = kw["query"].shape
    ph, pw = kw["block_size"]
    members = (h // ph) * (w // pw) if kw["mode"] == "long" else ph * pw
    if kw.get("mask") is None:
        return attention_cost(kw, n * h * w, members)
    costs = attention_cost({k: v for k, v in kw.items() if k != "mask"}, n * h * w, members)
    mask_read = Cost(0.0, tensor_bytes(kw["mask"]))
    return mode_costs(costs["fwd"] + mask_read, costs["bwd"] + mask_read)


def window_case(batch, heads, dims, h, w, window):
    shift = window // 2
    windows = (h // window) * (w // window)
    sample = SPEC.make(torch.Generator().manual_seed(0), "bench", (batch * heads, dims, dims, h, w),
                       (window, window), "short", bias_heads=heads, mask_windows=windows)
    sample.tensors["mask"] = shifted_window_mask(h, w, window, shift).double()
    return sample, dict(B=batch, heads=heads, head_dims=dims, H=h, W=w, window=window, shift=shift)


def window_cases(device: str, dtype: torch.dtype, quick: bool):
    shapes = WINDOW_QUICK_SHAPES if quick else (WINDOW_GPU_SHAPES if device == "cuda"
                                                else WINDOW_CPU_SHAPES)
    out = []
    for shape in shapes:
        sample, params = window_case(*shape)
        b, heads, dims, h, w, window = shape
        providers = {"reference": reference, "sdpa": sdpa_windows}
        providers.update(fused_providers(OP, segops.interlaced_sparse_attention, device, dtype))
        out.append(Case(OP, f"window B{b} heads{heads} d{dims} {h}x{w} w{window} shifted",
                        sample_maker(sample), sample.grads, providers, cost=cost, params=params))
    return out


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
    # After the first shape's two modes: the window case is one of the CPU run's defaults.
    return out[:2] + window_cases(device, dtype, quick) + out[2:]
