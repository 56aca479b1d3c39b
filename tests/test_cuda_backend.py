"""The CUDA C++ backend against the Triton backend at GPU-sized shapes (cuda tier: needs a GPU).

tests/test_contract.py already runs `backend="cuda"` against the fp64 reference on every op's
small samples. Here both GPU backends run each OpSpec's large samples, big enough to span several
tiles, channel chunks and thread blocks; each must meet the tolerance rule against fp64, so the
two may differ by at most twice the rule's allowance.
"""
import pytest
import torch

from segops.ops._spec import SPECS
from tests.utils import (assert_close_to_reference, require_backend, rounded_inputs,
                         run_with_grads, tolerance)

pytestmark = pytest.mark.cuda


def _large_params():
    return [pytest.param(op, s.name, id=f"{op}-{s.name}") for op in sorted(SPECS)
            for s in SPECS[op].large_samples()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op,sample", _large_params())
def test_cuda_matches_triton_and_fp64_reference(op, sample, dtype):
    for backend in ("cuda", "triton"):
        require_backend(op, backend, "cuda", dtype)
    torch.manual_seed(0)
    spec = SPECS[op]
    s = next(s for s in spec.large_samples() if s.name == sample)
    inputs64, grad_names, kwargs = rounded_inputs(s, dtype), list(s.grads), s.kwargs
    reference, fn = spec.reference, spec.function
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
