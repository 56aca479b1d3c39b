"""The CUDA kernels (csrc/cuda) and their binding, run on the CPU by emulation, against fp64.

tests/cuda_emulation/build.py compiles the unchanged kernel and binding sources against stand-in
CUDA headers (blocks run one at a time, their threads as std::threads, real barriers and warp
shuffles), as the library `segops_cuda_emu`. Each test routes an op's fused "cpu" backend to
those kernels and runs the public op — validation, custom op, autograd — on every sample of the
op's description (segops/ops/<op>.py), like tests/test_contract.py does for the other tiers.
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
from segops.ops._spec import SPECS
from tests.utils import _required, check_against_reference, find_sample, rounded_inputs, sample_params

LIBRARY = "segops_cuda_emu"

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
def emulated_backend(lib, spec):
    """Route the op's "cpu" backend to the emulated CUDA kernels (the same segops_C kernel pair)."""
    backends = spec.backends.fused
    saved = backends["cpu"]
    backends["cpu"] = spec.compiled_backend(LIBRARY)
    try:
        yield
    finally:
        backends["cpu"] = saved


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


# Every thread of the emulation is a fiber on one CPU core: samples above this many input
# elements add minutes, not coverage (the channel-chunk and large-group paths also run at the
# smaller samples' tile boundaries).
EMULATION_MAX_ELEMENTS = 30_000


def _emulation_sized(sample) -> bool:
    return sum(t.numel() for t in sample.tensors.values()) <= EMULATION_MAX_ELEMENTS


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,sample", sample_params(where=_emulation_sized))
def test_emulated_kernels_match_fp64_reference(emulated, op, sample, dtype):
    spec = SPECS[op]
    s = find_sample(op, sample)
    with emulated_backend(emulated, spec):
        check_against_reference(lambda **kw: spec.function(**kw, backend="cpu"), spec.reference,
                                rounded_inputs(s, dtype), s.grads, dtype, "cpu", kwargs=s.kwargs)


def test_constant_input_gives_no_nan(emulated):
    x = torch.full((2, 3, 6, 6), 0.7, dtype=torch.float32)
    with emulated_backend(emulated, SPECS["qco_2d"]):
        x.requires_grad_(True)
        cooc, levels = segops.qco_2d(x, 4, 2, backend="cpu")
        (cooc.sum() + levels.sum()).backward()
    assert torch.isfinite(cooc).all() and torch.isfinite(levels).all() and torch.isfinite(x.grad).all()
