"""criss_cross_attention beyond the contract (tests/test_contract.py): the loop form of the
semantics, the two centre conventions, the saved statistics, constant inputs."""
import os
import subprocess
import sys

import pytest
import torch

import segops
from segops.ops.criss_cross_attention import SPEC
from segops.reference.criss_cross_attention import criss_cross_attention as reference
from tests.utils import backend_cases, qkv_inputs, require_backend

OP = "criss_cross_attention"


def naive(query, key, value):
    """Loop form of docs/operators.md §2.1: a softmax over row y and column x with the centre counted once."""
    n, _, h, w = query.shape
    out = torch.zeros(n, value.shape[1], h, w, dtype=torch.float64)
    for b in range(n):
        for y in range(h):
            for x in range(w):
                omega = [(y, j) for j in range(w)] + [(i, x) for i in range(h) if i != y]
                e = torch.stack([query[b, :, y, x].double() @ key[b, :, i, j].double() for i, j in omega])
                a = torch.softmax(e, 0)
                out[b, :, y, x] = sum(a[t] * value[b, :, i, j].double() for t, (i, j) in enumerate(omega))
    return out


@pytest.mark.parametrize("shape", [(1, 3, 2, 4, 5), (2, 4, 3, 1, 6), (1, 2, 2, 5, 1), (2, 3, 1, 3, 3)])
def test_reference_matches_naive_loop(shape):
    x = qkv_inputs(*shape)
    torch.testing.assert_close(reference(**x), naive(**x), rtol=1e-10, atol=1e-10)


def test_reference_centre_in_either_branch_is_identical():
    # mmcv masks the centre in the column branch; the original CCNet layout keeps it there and
    # masks it in the row branch instead. Both give one joint softmax over H+W-1 positions.
    x = qkv_inputs(2, 4, 3, 5, 6)
    q, k, v = x["query"], x["key"], x["value"]
    h, w = q.shape[2:]
    e_col = torch.einsum("ncyx,ncix->nyxi", q, k)
    e_row = torch.einsum("ncyx,ncyj->nyxj", q, k) + torch.full((w,), float("-inf"), dtype=q.dtype).diag().view(1, w, w)
    a = torch.softmax(torch.cat([e_col, e_row], -1), -1)
    out = torch.einsum("ncix,nyxi->ncyx", v, a[..., :h]) + torch.einsum("ncyj,nyxj->ncyx", v, a[..., h:])
    torch.testing.assert_close(reference(q, k, v), out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases() if c.values[2] != torch.float16])
def test_stats_are_the_max_and_log_sum(backend, device, dtype):
    require_backend(OP, backend, device, dtype)
    x = {k: v.to(device, dtype) for k, v in qkv_inputs(2, 3, 2, 4, 5).items()}
    q, k = x["query"], x["key"]
    _, stats = SPEC.forward_op(q, k, x["value"], backend)
    assert stats.shape == (2, 2, 4, 5) and stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    h = q.shape[2]
    q, k = q.double(), k.double()
    e_col = torch.einsum("ncyx,ncix->nyxi", q, k) + torch.full((h,), float("-inf"), dtype=q.dtype, device=device).diag().view(h, 1, h)
    e_row = torch.einsum("ncyx,ncyj->nyxj", q, k)
    e = torch.cat([e_col, e_row], -1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.float64 else {}
    torch.testing.assert_close(stats[:, 0].double(), e.amax(-1), **tol)
    torch.testing.assert_close(stats[:, 1].double(), torch.logsumexp(e, -1) - e.amax(-1), **tol)



def test_cpu_constant_input_gives_finite_uniform_attention():
    require_backend(OP, "cpu", "cpu", torch.float32)
    q = torch.ones(1, 2, 3, 4)
    v = torch.arange(3 * 4, dtype=torch.float32).view(1, 1, 3, 4)
    out = segops.criss_cross_attention(q, q, v, backend="cpu")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(q, q, v))


_ISA_CHECK = """
import torch, segops
from segops.reference.criss_cross_attention import criss_cross_attention as reference
from tests.utils import check_against_reference, qkv_inputs
fn = lambda **x: segops.criss_cross_attention(**x, backend="cpu")
torch.manual_seed(0)
# W = 49: three lane vectors and a lane tail, the short-row kernels' last column chunk;
# W = 18 and 70: two lanes past a vector, a map wider than the short-row kernels; W = 7: scalar lanes;
# Cv = 130: the backward's channel reductions in several K tiles (and two chunks on two threads).
for shape in [(1, 4, 20, 9, 49), (2, 3, 24, 17, 18), (1, 3, 13, 5, 70), (1, 2, 5, 6, 7),
              (1, 2, 130, 4, 18)]:
    check_against_reference(fn, reference, qkv_inputs(*shape, scale=0.5), ["query", "key", "value"],
                            torch.float32, "cpu")
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_cpu_kernels_of_each_instruction_set(isa):
    # The CPU kernels pick their code path by instruction set at run time; SEGOPS_CPU_ISA caps it,
    # so that this machine runs every path up to its own (a cap above it runs its widest).
    require_backend(OP, "cpu", "cpu", torch.float32)
    env = dict(os.environ, SEGOPS_CPU_ISA=isa)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def test_cpu_isa_cap_rejects_unknown_names():
    require_backend(OP, "cpu", "cpu", torch.float32)
    code = "import torch, segops; x = torch.ones(1, 2, 3, 4); segops.criss_cross_attention(x, x, x, backend='cpu')"
    env = dict(os.environ, SEGOPS_CPU_ISA="sse9")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "SEGOPS_CPU_ISA must be one of baseline, avx2, avx512; got 'sse9'" in run.stderr
