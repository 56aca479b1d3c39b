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


# ---------------------------------------------------------------------------------------------
# Fused backends beyond the parametrised comparisons: gradcheck, opcheck, compile, stats, module.

def _ops_module():
    import importlib
    return importlib.import_module("segops.ops.criss_cross_attention")


def _cpu_or_skip(dtype=torch.float64):
    require_backend(OP, "cpu", "cpu", dtype)


@pytest.mark.parametrize("shape", [(2, 3, 2, 4, 5), (1, 2, 3, 1, 4), (1, 2, 3, 4, 1)])
def test_cpu_backend_gradcheck(shape):
    _cpu_or_skip()
    x = {k: v.requires_grad_() for k, v in inputs(*shape, scale=0.5).items()}
    f = lambda q, k, v: segops.criss_cross_attention(q, k, v, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(x.values()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_opcheck_forward_and_backward(dtype):
    _cpu_or_skip(dtype)
    ops_mod = _ops_module()
    # The public function hands the op contiguous tensors (whatever the caller's layout), so
    # that is what the op is checked on.
    x = inputs(2, 3, 4, 5, 6, dtype=dtype, scale=0.5)
    q, k, v = (t.requires_grad_() for t in x.values())
    torch.library.opcheck(ops_mod._forward_op, (q, k, v, "cpu"))
    out, stats = ops_mod._forward_op(q.detach(), k.detach(), v.detach(), "cpu")
    assert stats.shape == (2, 2, 5, 6) and stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    go = torch.randn_like(out)
    torch.library.opcheck(ops_mod._backward_op, (go, q.detach(), k.detach(), v.detach(), out,
                                                 stats, "cpu"))


def test_public_function_feeds_the_op_contiguous_tensors(monkeypatch):
    _cpu_or_skip(torch.float32)
    ops_mod = _ops_module()
    seen = []
    fused = ops_mod.BACKENDS.fused["cpu"]
    orig = fused.fn("forward")
    monkeypatch.setitem(fused._resolved, "forward",
                        lambda *a: seen.append([t.is_contiguous() for t in a]) or orig(*a))
    x = {k: channels_last(v.float()) for k, v in inputs(1, 3, 2, 4, 5).items()}
    out = segops.criss_cross_attention(**x, backend="cpu")
    assert seen == [[True, True, True]]
    torch.testing.assert_close(out, reference(**x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases() if c.values[2] != torch.float16])
def test_stats_are_the_max_and_log_sum(backend, device, dtype):
    require_backend(OP, backend, device, dtype)
    ops_mod = _ops_module()
    x = {k: v.to(device, dtype) for k, v in inputs(2, 3, 2, 4, 5).items()}
    q, k = x["query"], x["key"]
    _, stats = ops_mod._forward_op(q, k, x["value"], backend)
    assert stats.shape == (2, 2, 4, 5) and stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    h = q.shape[2]
    q, k = q.double(), k.double()
    e_col = torch.einsum("ncyx,ncix->nyxi", q, k) + torch.full((h,), float("-inf"), dtype=q.dtype, device=device).diag().view(h, 1, h)
    e_row = torch.einsum("ncyx,ncyj->nyxj", q, k)
    e = torch.cat([e_col, e_row], -1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.float64 else {}
    torch.testing.assert_close(stats[:, 0].double(), e.amax(-1), **tol)
    torch.testing.assert_close(stats[:, 1].double(), torch.logsumexp(e, -1) - e.amax(-1), **tol)


def test_cpu_large_energies_do_not_overflow():
    # Energies of several hundred: a softmax without max-subtraction would give inf/NaN.
    _cpu_or_skip(torch.float32)
    x = inputs(1, 4, 3, 5, 6, scale=12.0)
    check_against_reference(lambda **kw: segops.criss_cross_attention(**kw, backend="cpu"),
                            reference, x, ["query", "key", "value"], torch.float32, "cpu")


def test_cpu_constant_input_gives_finite_uniform_attention():
    _cpu_or_skip(torch.float32)
    q = torch.ones(1, 2, 3, 4)
    v = torch.arange(3 * 4, dtype=torch.float32).view(1, 1, 3, 4)
    out = segops.criss_cross_attention(q, q, v, backend="cpu")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(q, q, v))


@pytest.mark.parametrize("dtype", [torch.float32])
def test_cpu_compiles_fullgraph_through_the_op(dtype):
    _cpu_or_skip(dtype)
    x = {k: v.to(dtype).requires_grad_() for k, v in inputs(2, 3, 4, 5, 6, scale=0.5).items()}
    f = torch.compile(lambda **kw: segops.criss_cross_attention(**kw, backend="cpu"),
                      fullgraph=True, backend="aot_eager")
    out = f(**x)
    grads = torch.autograd.grad(out, tuple(x.values()), torch.ones_like(out))
    ref = reference(**x)
    ref_grads = torch.autograd.grad(ref, tuple(x.values()), torch.ones_like(ref))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_cpu_compiles_with_inductor():
    _cpu_or_skip(torch.float32)
    x = {k: v.float() for k, v in inputs(1, 3, 4, 5, 6, scale=0.5).items()}
    f = torch.compile(lambda **kw: 2 * segops.criss_cross_attention(**kw, backend="cpu"),
                      fullgraph=True)
    torch.testing.assert_close(f(**x), 2 * reference(**x), rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases() if c.values[0] == "triton"])
def test_triton_large_energies_and_fully_masked_column(backend, device, dtype):
    # H = 1: the column branch of every pixel is empty (only the centre, counted in the row);
    # large energies exercise the running max of the online softmax.
    require_backend(OP, backend, device, dtype)
    for shape, scale in (((1, 4, 3, 1, 5), 0.5), ((1, 4, 3, 3, 17), 4.0)):
        check_against_reference(lambda **kw: segops.criss_cross_attention(**kw, backend=backend),
                                reference, inputs(*shape, scale=scale),
                                ["query", "key", "value"], dtype, device)


@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases() if c.values[2] == torch.float32])
def test_module_state_dict_keys_and_backend_switch(backend, device, dtype):
    from segops.nn import CrissCrossAttention
    require_backend(OP, backend, device, dtype)
    m = CrissCrossAttention(16)
    assert sorted(m.state_dict()) == sorted([
        "query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
        "value_conv.weight", "value_conv.bias", "gamma.scale"])
    assert m.query_conv.out_channels == 2 and m.value_conv.out_channels == 16
    with torch.no_grad():
        m.gamma.scale.fill_(0.7)  # 0 at init would hide the attention
    m = m.to(device)
    fused = CrissCrossAttention(16, backend=backend).to(device)
    fused.load_state_dict(m.state_dict())
    m.backend = "reference"
    x = torch.randn(2, 16, 5, 6, device=device)
    out, ref = fused(x), m(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
