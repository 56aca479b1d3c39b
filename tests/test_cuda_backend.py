"""The CUDA C++ backend against the Triton backend at GPU-sized shapes (cuda tier: needs a GPU).

The per-op test files already run `backend="cuda"` against the fp64 reference on their small
cases (tests/utils.backend_cases). Here both GPU backends run the same larger inputs, big enough
to span several tiles, channel chunks and thread blocks, and must agree with each other within
the tolerance rule of tests/utils.py (with the Triton result standing in for the reference side),
after each was checked against the fp64 reference.
"""
import pytest
import torch

import segops
from segops import reference as R
from tests import test_qco
from tests.utils import assert_close_to_reference, require_backend, run_with_grads, tolerance

pytestmark = pytest.mark.cuda


def _randn(*shape, scale=1.0, shift=0.0):
    return scale * torch.randn(*shape, dtype=torch.float64) + shift


def _cca():
    return dict(query=_randn(2, 64, 33, 47, scale=0.3), key=_randn(2, 64, 33, 47, scale=0.3),
                value=_randn(2, 96, 33, 47))


def _isa():
    return dict(query=_randn(2, 64, 40, 48), key=_randn(2, 64, 40, 48), value=_randn(2, 80, 40, 48))


def _dnl(lk):
    return dict(query=_randn(2, 64, 37, 29, scale=0.3, shift=0.3),
                key=_randn(2, 64, *lk, scale=0.3, shift=-0.2),
                value=_randn(2, 96, *lk), unary=_randn(2, 1, *lk))


def _sdc(cg):
    return dict(input=_randn(2, 24, 41, 37), guidance=_randn(2, cg, 41, 37),
                weight=_randn(40, 24, 3, 3, scale=(24 * 9) ** -0.5), bias=_randn(40))


def _recon():
    return test_qco.recon_inputs(2, 16, 29, 31, 64, 128, seed=3)


# (op, inputs factory, differentiable inputs, keyword arguments)
CASES = [
    ("criss_cross_attention", _cca, ["query", "key", "value"], {}),
    ("interlaced_sparse_attention", _isa, ["query", "key", "value"],
     dict(block_size=(8, 8), mode="long")),
    ("interlaced_sparse_attention", _isa, ["query", "key", "value"],
     dict(block_size=(4, 6), mode="short")),
    ("disentangled_non_local", lambda: _dnl((37, 29)), ["query", "key", "value", "unary"],
     dict(whiten=True, temperature=0.05)),
    ("disentangled_non_local", lambda: _dnl((110,)), ["query", "key", "value", "unary"],
     dict(whiten=False)),
    ("semantic_difference_conv2d", lambda: _sdc(24), ["input", "guidance", "weight", "bias"],
     dict(similarity="charbonnier", dilation=2)),
    ("semantic_difference_conv2d", lambda: _sdc(8), ["input", "guidance", "weight", "bias"],
     dict(similarity="gaussian", sigma=1.3)),
    ("texture_reconstruct", _recon, ["sim", "levels", "features"], {}),
    ("qco_1d", lambda: dict(x=test_qco.smooth_input((2, 16, 24, 20), 32, seed=4)), ["x"],
     dict(num_levels=32)),
    ("qco_2d", lambda: dict(x=test_qco.smooth_input((2, 8, 24, 18), 8, grid=3, seed=5)), ["x"],
     dict(num_levels=8, grid=3)),
]
IDS = [f"{op}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for op, _, _, kw in CASES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op,make,grad_names,kwargs", CASES, ids=IDS)
def test_cuda_matches_triton_and_fp64_reference(op, make, grad_names, kwargs, dtype):
    for backend in ("cuda", "triton"):
        require_backend(op, backend, "cuda", dtype)
    torch.manual_seed(0)
    inputs64 = make()
    reference = getattr(R, op)
    fn = getattr(segops, op)
    out64, _ = run_with_grads(reference, inputs64, grad_names, None, kwargs)
    grads_out64 = tuple(torch.randn_like(o) if o.is_floating_point() else None for o in out64)
    out64, grads64 = run_with_grads(reference, inputs64, grad_names, grads_out64, kwargs)

    def cast(t):
        return t.to("cuda", dtype) if t.is_floating_point() else t.to("cuda")

    low = {k: cast(v) for k, v in inputs64.items()}
    gos = tuple(None if g is None else cast(g) for g in grads_out64)
    ref_out, ref_grads = run_with_grads(reference, low, grad_names, gos, kwargs)
    results = {b: run_with_grads(lambda **kw: fn(**kw, backend=b), low, grad_names, gos, kwargs)
               for b in ("cuda", "triton")}
    named = [(f"output {i}", i, None) for i, o in enumerate(out64) if o.is_floating_point()]
    named += [(f"grad of {k}", None, k) for k in grad_names]
    for name, i, k in named:
        want64 = out64[i] if k is None else grads64[k]
        same = ref_out[i] if k is None else ref_grads[k]
        cuda, triton = ((r[0][i] if k is None else r[1][k]) for r in (results["cuda"], results["triton"]))
        assert_close_to_reference(f"cuda {name}", cuda, want64, same, dtype)
        # Against Triton: each is within the rule of fp64, so their distance is within twice it.
        diff = (cuda.double() - triton.double()).abs().max().item() if want64.numel() else 0.0
        tol = 2 * tolerance(want64, same, dtype)
        assert diff <= tol, f"{op} {name} ({dtype}): |cuda - triton| = {diff:.3e} > {tol:.3e}"
