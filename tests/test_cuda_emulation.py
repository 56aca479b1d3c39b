"""The CUDA kernels (csrc/cuda) and their binding, run on the CPU by emulation, against fp64.

tests/cuda_emulation/build.py compiles the unchanged kernel and binding sources against stand-in
CUDA headers (blocks run one at a time, their threads as std::threads, real barriers and warp
shuffles), as the library `segops_cuda_emu`. Each test routes an op's fused "cpu" backend to
those kernels and runs the public op — validation, custom op, autograd — like the other tiers.
This checks the kernels' indexing, tiling, masking, reductions and fp16/bf16 handling on every
dtype without a GPU; it cannot check timing, GPU memory-model races or compilation for the GPU
(scripts/check_cuda_compile.sh, scripts/cuda_sanitizer_smoke.sh and the cuda tier do those).
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil

import pytest
import torch

import segops
from segops import reference as R
from segops._backend import REGISTRY, FusedBackend
from segops.ops._validate import CUDA_DTYPES
from tests import test_qco
from tests.utils import _required, check_against_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA_SOURCES = bool(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))

@pytest.fixture(scope="module")
def emulated():
    required = "cuda-emulation" in _required()
    if not HAS_CUDA_SOURCES:
        pytest.fail("no csrc/cuda/*.cu to emulate") if required else pytest.skip("no CUDA sources")
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        pytest.fail("no C++ compiler") if required else pytest.skip("no C++ compiler")
    from tests.cuda_emulation import build
    build.build()  # a compile error fails every test here
    return torch.ops.segops_cuda_emu


@contextlib.contextmanager
def emulated_backend(lib, op):
    """Route `op`'s "cpu" backend to the emulated CUDA kernels (the same segops_C kernel pair)."""
    backends = REGISTRY[op].fused
    saved = backends["cpu"]
    fwd_name, bwd_name = saved.kernels
    fwd, bwd = getattr(lib, fwd_name), getattr(lib, bwd_name)
    backends["cpu"] = FusedBackend("cpu", lambda *a: fwd(*a), lambda *a: bwd(*a), dtypes=CUDA_DTYPES)
    try:
        yield
    finally:
        backends["cpu"] = saved


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _randn(*shape, scale=1.0, shift=0.0):
    return scale * torch.randn(*shape, dtype=torch.float64) + shift


def run_case(lib, op, inputs64, grad_names, dtype, kwargs, round_inputs=False):
    if round_inputs:
        # For the banded QCO ops, rounding x to fp16/bf16 can move a pixel into another band,
        # a discontinuity no kernel can undo: compare with fp64 on the rounded input instead.
        inputs64 = {k: v.to(dtype).double() if v.is_floating_point() else v for k, v in inputs64.items()}
    with emulated_backend(lib, op):
        check_against_reference(lambda **kw: getattr(segops, op)(**kw, backend="cpu"),
                                getattr(R, op), inputs64, grad_names, dtype, "cpu", kwargs=kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 4, 3, 5, 7), (1, 3, 5, 1, 6), (1, 2, 4, 7, 1),
                                   (1, 20, 70, 3, 70), (1, 17, 33, 67, 2)])
def test_criss_cross_attention(emulated, dtype, shape):
    torch.manual_seed(0)
    n, ck, cv, h, w = shape
    x = dict(query=_randn(n, ck, h, w, scale=0.5), key=_randn(n, ck, h, w, scale=0.5),
             value=_randn(n, cv, h, w))
    run_case(emulated, "criss_cross_attention", x, ["query", "key", "value"], dtype, {})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block,mode", [
    ((2, 5, 6, 8, 12), (4, 6), "long"), ((2, 5, 6, 8, 12), (4, 6), "short"),
    ((1, 3, 4, 6, 6), (1, 1), "long"), ((1, 3, 4, 6, 6), (6, 6), "short"),
    ((1, 20, 36, 16, 16), (8, 8), "long"), ((1, 8, 5, 18, 16), (2, 8), "short")])
def test_interlaced_sparse_attention(emulated, dtype, shape, block, mode):
    torch.manual_seed(0)
    n, ck, cv, h, w = shape
    x = dict(query=_randn(n, ck, h, w), key=_randn(n, ck, h, w), value=_randn(n, cv, h, w))
    run_case(emulated, "interlaced_sparse_attention", x, ["query", "key", "value"], dtype,
             dict(block_size=block, mode=mode))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [
    dict(n=2, ck=4, cv=3, sq=(5, 7), sk=(5, 7), unary=True, whiten=True, temperature=0.05),
    dict(n=1, ck=3, cv=5, sq=(11,), sk=(19,), unary=False, whiten=False, temperature=1.0),
    dict(n=2, ck=24, cv=40, sq=(9, 13), sk=(110,), unary=True, whiten=True, temperature=0.3),
    dict(n=1, ck=5, cv=6, sq=(70,), sk=(3,), unary=True, whiten=False, temperature=1.0)])
def test_disentangled_non_local(emulated, dtype, case):
    torch.manual_seed(0)
    x = dict(query=_randn(case["n"], case["ck"], *case["sq"], scale=0.5, shift=0.3),
             key=_randn(case["n"], case["ck"], *case["sk"], scale=0.5, shift=-0.2),
             value=_randn(case["n"], case["cv"], *case["sk"]))
    names = ["query", "key", "value"]
    if case["unary"]:
        x["unary"] = _randn(case["n"], 1, *case["sk"])
        names.append("unary")
    run_case(emulated, "disentangled_non_local", x, names, dtype,
             dict(whiten=case["whiten"], temperature=case["temperature"]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("similarity,cin,cg,cout,k,dilation", [
    ("charbonnier", 3, 3, 4, 3, 1), ("charbonnier", 5, 5, 7, 3, 2), ("gaussian", 4, 2, 3, 5, 1),
    ("gaussian", 6, 3, 20, 3, 1), ("none", 3, 2, 5, 1, 1), ("charbonnier", 18, 18, 33, 3, 1)])
def test_semantic_difference_conv2d(emulated, dtype, similarity, cin, cg, cout, k, dilation):
    torch.manual_seed(0)
    x = dict(input=_randn(2, cin, 7, 9), guidance=_randn(2, cg, 7, 9),
             weight=_randn(cout, cin, k, k, scale=(cin * k * k) ** -0.5), bias=_randn(cout))
    run_case(emulated, "semantic_difference_conv2d", x, ["input", "guidance", "weight", "bias"],
             dtype, dict(similarity=similarity, dilation=dilation, sigma=0.8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((2, 3, 5, 7), 8), ((1, 4, 1, 6), 8), ((2, 5, 3, 3), 1),
                                     ((1, 6, 9, 11), 128)])
def test_qco_1d(emulated, dtype, shape, k):
    x = test_qco.smooth_input(shape, k, seed=1)
    run_case(emulated, "qco_1d", dict(x=x), ["x"], dtype, dict(num_levels=k), round_inputs=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k,grid", [((2, 3, 6, 6), 4, 1), ((1, 4, 6, 9), 3, 3),
                                          ((2, 2, 8, 8), 8, 2)])
def test_qco_2d(emulated, dtype, shape, k, grid):
    x = test_qco.smooth_input(shape, k, grid=grid, seed=2)
    run_case(emulated, "qco_2d", dict(x=x), ["x"], dtype, dict(num_levels=k, grid=grid),
             round_inputs=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,h,w,cf,k", [(2, 3, 5, 7, 6, 8), (1, 4, 9, 6, 40, 128), (2, 2, 3, 3, 5, 1)])
def test_texture_reconstruct(emulated, dtype, n, c, h, w, cf, k):
    x = test_qco.recon_inputs(n, c, h, w, cf, k, seed=4)
    run_case(emulated, "texture_reconstruct", x, ["sim", "levels", "features"], dtype, {},
             round_inputs=True)


def test_constant_input_gives_no_nan(emulated):
    x = torch.full((2, 3, 6, 6), 0.7, dtype=torch.float32)
    with emulated_backend(emulated, "qco_2d"):
        x.requires_grad_(True)
        cooc, levels = segops.qco_2d(x, 4, 2, backend="cpu")
        (cooc.sum() + levels.sum()).backward()
    assert torch.isfinite(cooc).all() and torch.isfinite(levels).all() and torch.isfinite(x.grad).all()
