"""criss_cross_attention: reference semantics, every backend against fp64, registration, errors."""
import pytest
import torch

import segops
from segops.reference.criss_cross_attention import criss_cross_attention as reference
from tests.utils import (backend_cases, channels_last, check_against_reference, noncontiguous,
                         require_backend)

OP = "criss_cross_attention"


def naive(query, key, value):
    """Loop form of SPEC §2.1: a softmax over row y and column x with the centre counted once."""
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


def inputs(n, ck, cv, h, w, dtype=torch.float64, scale=1.0):
    return dict(query=scale * torch.randn(n, ck, h, w, dtype=dtype),
                key=scale * torch.randn(n, ck, h, w, dtype=dtype),
                value=torch.randn(n, cv, h, w, dtype=dtype))


@pytest.mark.parametrize("shape", [(1, 3, 2, 4, 5), (2, 4, 3, 1, 6), (1, 2, 2, 5, 1), (2, 3, 1, 3, 3)])
def test_reference_matches_naive_loop(shape):
    x = inputs(*shape)
    torch.testing.assert_close(reference(**x), naive(**x), rtol=1e-10, atol=1e-10)


def test_reference_centre_in_either_branch_is_identical():
    # mmcv masks the centre in the column branch; the original CCNet layout keeps it there and
    # masks it in the row branch instead. Both give one joint softmax over H+W-1 positions.
    x = inputs(2, 4, 3, 5, 6)
    q, k, v = x["query"], x["key"], x["value"]
    h, w = q.shape[2:]
    e_col = torch.einsum("ncyx,ncix->nyxi", q, k)
    e_row = torch.einsum("ncyx,ncyj->nyxj", q, k) + torch.full((w,), float("-inf"), dtype=q.dtype).diag().view(1, w, w)
    a = torch.softmax(torch.cat([e_col, e_row], -1), -1)
    out = torch.einsum("ncix,nyxi->ncyx", v, a[..., :h]) + torch.einsum("ncyj,nyxj->ncyx", v, a[..., h:])
    torch.testing.assert_close(reference(q, k, v), out, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck():
    x = {k: v.requires_grad_() for k, v in inputs(2, 3, 2, 3, 4, scale=0.5).items()}
    assert torch.autograd.gradcheck(reference, tuple(x.values()))


SHAPES = [
    (2, 4, 3, 5, 7),    # batch > 1, H != W, primes
    (1, 3, 5, 1, 6),    # H = 1
    (1, 2, 4, 7, 1),    # W = 1
    (1, 16, 16, 9, 9),  # channels that fill a 16-wide tile
]


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_fp64_reference(backend, device, dtype, shape):
    require_backend(OP, backend, device, dtype)
    x = inputs(*shape, scale=0.5)
    check_against_reference(lambda **kw: segops.criss_cross_attention(**kw, backend=backend),
                            reference, x, ["query", "key", "value"], dtype, device)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last"])
def test_backend_non_contiguous_inputs_and_grads(backend, device, dtype, layout):
    require_backend(OP, backend, device, dtype)
    make = noncontiguous if layout == "noncontiguous" else channels_last
    check_against_reference(lambda **kw: segops.criss_cross_attention(**kw, backend=backend),
                            reference, inputs(2, 4, 3, 5, 6, scale=0.5), ["query", "key", "value"],
                            dtype, device, make_input=make, make_grad=make)


@pytest.mark.parametrize("backend,device,dtype", backend_cases(include_reference=True))
def test_empty_inputs_give_empty_outputs(backend, device, dtype):
    require_backend(OP, backend, device, dtype)
    q = torch.randn(0, 4, 5, 6, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(0, 3, 5, 6, device=device, dtype=dtype)
    out = segops.criss_cross_attention(q, q, v, backend=backend)
    assert out.shape == (0, 3, 5, 6)
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("bad,match", [
    (dict(query=torch.randn(1, 2, 3)), "`query` must be 4-D"),
    (dict(key=torch.randn(1, 3, 4, 5)), "`key` must have"),
    (dict(value=torch.randn(1, 3, 4, 6)), "`value` must have"),
    (dict(value=torch.randn(1, 3, 4, 5, dtype=torch.float64)), "dtype"),
    (dict(query=torch.ones(1, 2, 4, 5, dtype=torch.int64)), "floating"),
])
def test_bad_input_errors(bad, match):
    x = dict(query=torch.randn(1, 2, 4, 5), key=torch.randn(1, 2, 4, 5), value=torch.randn(1, 3, 4, 5))
    x.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        segops.criss_cross_attention(**x)


def test_unknown_backend_name_errors():
    x = inputs(1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        segops.criss_cross_attention(**x, backend="fastest")


def test_reference_compiles_fullgraph():
    x = {k: v.float().requires_grad_() for k, v in inputs(1, 4, 3, 5, 6).items()}
    f = torch.compile(lambda **kw: segops.criss_cross_attention(**kw, backend="reference"),
                      fullgraph=True, backend="aot_eager")
    out = f(**x)
    out.sum().backward()
    torch.testing.assert_close(out, reference(**x))
