"""semantic_difference_conv2d beyond the contract (tests/test_contract.py): the loop form of the
semantics, the central-difference identity, constant guidance, Triton's split-K path, and
gaussian similarity with any number of guidance channels."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import segops
from segops.reference.semantic_difference_conv2d import semantic_difference_conv2d as reference
from tests.utils import TRITON_DEVICE, check_against_reference, require_backend

OP = "semantic_difference_conv2d"


def naive(input, guidance, weight, bias=None, *, dilation=1, similarity="charbonnier", sigma=1.0):
    """Loop form of docs/operators.md §2.4, U and V zero outside the image."""
    n, cin, h, w = input.shape
    cout, _, k, _ = weight.shape
    cg = guidance.shape[1]
    half = (k - 1) // 2
    U, Vg, Wt = input.double(), guidance.double(), weight.double()

    def at(x, b, y, xx):  # x[b, :, y, xx] or zeros outside
        return x[b, :, y, xx] if 0 <= y < h and 0 <= xx < w else torch.zeros(x.shape[1], dtype=torch.float64)

    out = torch.zeros(n, cout, h, w, dtype=torch.float64)
    for b in range(n):
        for y in range(h):
            for x in range(w):
                acc = torch.zeros(cout, dtype=torch.float64)
                for ky in range(k):
                    for kx in range(k):
                        yy, xx = y + (ky - half) * dilation, x + (kx - half) * dilation
                        d = at(U, b, yy, xx) - U[b, :, y, x]
                        e = at(Vg, b, yy, xx) - Vg[b, :, y, x]
                        if similarity == "charbonnier":
                            s = (1 + e * e / sigma ** 2) ** -0.5
                        elif similarity == "gaussian":
                            s = torch.exp(-(e * e).sum() / (2 * sigma ** 2 * cg))
                        else:
                            s = 1.0
                        acc += Wt[:, :, ky, kx] @ (s * d)
                out[b, :, y, x] = acc + (0 if bias is None else bias.double())
    return out


def inputs(n, cin, cg, cout, h, w, k, bias=True, dtype=torch.float64):
    x = dict(input=torch.randn(n, cin, h, w, dtype=dtype),
             guidance=torch.randn(n, cg, h, w, dtype=dtype),
             weight=torch.randn(cout, cin, k, k, dtype=dtype) / (cin * k * k) ** 0.5)
    if bias:
        x["bias"] = torch.randn(cout, dtype=dtype)
    return x


@pytest.mark.parametrize("similarity,k,dilation,cg,sigma", [
    ("charbonnier", 3, 1, 3, 1.0), ("charbonnier", 3, 2, 3, 0.7), ("gaussian", 3, 1, 5, 1.0),
    ("gaussian", 5, 1, 2, 1.5), ("none", 3, 2, 4, 1.0), ("charbonnier", 1, 1, 3, 1.0)])
def test_reference_matches_naive_loop(similarity, k, dilation, cg, sigma):
    x = inputs(2, 3, cg, 4, 4, 5, k)
    kw = dict(dilation=dilation, similarity=similarity, sigma=sigma)
    torch.testing.assert_close(reference(**x, **kw), naive(**x, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k,dilation", [(1, 1), (3, 1), (3, 2), (5, 1)])
def test_reference_none_is_central_difference_conv(k, dilation):
    x = inputs(2, 3, 3, 4, 6, 7, k, bias=False)
    u, wt = x["input"], x["weight"]
    cdc = (F.conv2d(u, wt, padding=dilation * (k - 1) // 2, dilation=dilation)
           - F.conv2d(u, wt.sum((2, 3), keepdim=True)))
    torch.testing.assert_close(reference(**x, dilation=dilation, similarity="none"), cdc,
                               rtol=1e-10, atol=1e-10)


def test_reference_constant_guidance_inside_is_none():
    # With V constant, S = 1 wherever the neighbour is inside the image: away from the border
    # every similarity gives the central difference convolution.
    x = inputs(1, 3, 3, 2, 7, 8, 3, bias=False)
    x["guidance"] = torch.full_like(x["guidance"], 0.3)
    none = reference(**x, similarity="none")
    for sim in ("charbonnier", "gaussian"):
        torch.testing.assert_close(reference(**x, similarity=sim)[..., 1:-1, 1:-1],
                                   none[..., 1:-1, 1:-1], rtol=1e-12, atol=1e-12)


@pytest.mark.triton
@pytest.mark.parametrize("similarity", ["charbonnier", "gaussian"])
def test_triton_several_channel_blocks_and_split_k(monkeypatch, similarity):
    # Several Cin / Cout / Cg blocks per program grid and the split-K grad_weight path (used on
    # GPUs to fill the machine; forced here because the interpreter path uses one split).
    require_backend(OP, "triton", TRITON_DEVICE, torch.float32)
    import segops.triton.semantic_difference_conv2d as tri
    monkeypatch.setattr(tri, "_DW_SPLITS", 3)
    cg = 20 if similarity == "charbonnier" else 33
    check_against_reference(lambda **kw: segops.semantic_difference_conv2d(**kw, backend="triton"),
                            reference, inputs(2, 20, cg, 40, 5, 13, 3),
                            ["input", "guidance", "weight", "bias"], torch.float32, TRITON_DEVICE,
                            kwargs=dict(similarity=similarity, dilation=2))


def _bad(**over):
    x = dict(input=torch.randn(1, 3, 4, 5), guidance=torch.randn(1, 3, 4, 5),
             weight=torch.randn(2, 3, 3, 3))
    x.update(over)
    return x


def test_gaussian_accepts_any_guidance_channels():
    x = _bad(guidance=torch.randn(1, 7, 4, 5))
    assert segops.semantic_difference_conv2d(**x, similarity="gaussian", backend="reference").shape == (1, 2, 4, 5)


@pytest.mark.parametrize("similarity", ["charbonnier", "gaussian"])
def test_cpu_fp32_spans_several_gemm_blocks(similarity):
    """Shapes past every block edge of the CPU GEMM (segops/cpu/gemm.h: 64 rows, 64-column blocks
    in 256-column panels, 512-deep K blocks): Cin*k^2 = 720 (two K blocks of the forward), Cout =
    72 (two row blocks), 323 pixels (two column panels of dD), and the backward's per-thread weight
    columns (up to 720) several panels of dW."""
    require_backend("semantic_difference_conv2d", "cpu", "cpu", torch.float32)
    torch.manual_seed(7)
    x = inputs(1, 80, 80, 72, 19, 17, 3)

    def fused(**kw):
        with segops.use_backend("cpu"):
            return segops.semantic_difference_conv2d(**kw)

    check_against_reference(fused, reference, x, ["input", "guidance", "weight", "bias"],
                            torch.float32, "cpu",
                            kwargs=dict(dilation=1, similarity=similarity, sigma=1.0))


_ISA_CHECK = """
import torch, segops
from segops.reference.semantic_difference_conv2d import semantic_difference_conv2d as reference
from tests.test_semantic_difference_conv2d import inputs
from tests.utils import check_against_reference

def fused(**kw):
    with segops.use_backend("cpu"):
        return segops.semantic_difference_conv2d(**kw)

torch.manual_seed(0)
# W = 21 and 13: row segments longer and shorter than a vector, with tails; dilation 2 and k = 5
# put whole neighbour rows outside the image.
for dtype in (torch.float32, torch.float64):
    for similarity in ("charbonnier", "gaussian", "none"):
        for shape, dilation in (((2, 5, 5, 6, 9, 21, 3), 1), ((1, 4, 4, 3, 7, 13, 5), 2)):
            check_against_reference(fused, reference, inputs(*shape), ["input", "guidance", "weight", "bias"],
                                    dtype, "cpu", kwargs=dict(dilation=dilation, similarity=similarity, sigma=0.8))
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_cpu_kernels_of_each_instruction_set(isa):
    """The elementwise passes of the CPU kernel (panel, scatter, gaussian similarity) are compiled
    per instruction set and picked at run time; SEGOPS_CPU_ISA caps the pick, so this machine runs
    every path up to its own."""
    require_backend(OP, "cpu", "cpu", torch.float32)
    env = dict(os.environ, SEGOPS_CPU_ISA=isa)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
