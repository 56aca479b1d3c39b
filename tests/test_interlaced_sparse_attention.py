"""interlaced_sparse_attention beyond the contract (tests/test_contract.py): the loop form of the
semantics (with bias and mask), its identities, constant inputs, -inf masks and the int block
size."""
import pytest
import torch

import segops
from segops.reference.interlaced_sparse_attention import interlaced_sparse_attention as reference
from segops.ops.interlaced_sparse_attention import SPEC
from tests.utils import (assert_close_to_reference, backend_cases, check_against_reference,
                         find_sample, noncontiguous, qkv_inputs, require_backend, rounded_inputs)

OP = "interlaced_sparse_attention"


def naive(query, key, value, block_size, mode, scale=None, bias=None, mask=None):
    """Loop form of docs/operators.md §2.2: a softmax over the positions sharing the query's group
    label (members in row-major map order; groups numbered row-major by their label)."""
    n, ck, h, w = query.shape
    ph, pw = block_size
    scale = ck ** -0.5 if scale is None else scale
    label = (lambda y, x: (y % ph, x % pw)) if mode == "long" else (lambda y, x: (y // ph, x // pw))
    group = (lambda y, x: (y % ph) * pw + x % pw) if mode == "long" else \
        (lambda y, x: (y // ph) * (w // pw) + x // pw)
    out = torch.zeros(n, value.shape[1], h, w, dtype=torch.float64)
    for b in range(n):
        for y in range(h):
            for x in range(w):
                members = [(i, j) for i in range(h) for j in range(w) if label(i, j) == label(y, x)]
                e = torch.stack([scale * (query[b, :, y, x].double() @ key[b, :, i, j].double())
                                 for i, j in members])
                row = members.index((y, x))
                if bias is not None:
                    e = e + bias[b % bias.shape[0], row]
                if mask is not None:
                    e = e + mask[group(y, x) % mask.shape[0], row]
                a = torch.softmax(e, 0)
                out[b, :, y, x] = sum(a[t] * value[b, :, i, j].double() for t, (i, j) in enumerate(members))
    return out


@pytest.mark.parametrize("mode", ["long", "short"])
@pytest.mark.parametrize("shape,block", [((1, 3, 2, 4, 6), (2, 3)), ((2, 2, 3, 6, 4), (3, 2)),
                                         ((1, 2, 2, 4, 4), (1, 1)), ((1, 2, 2, 3, 5), (3, 5))])
def test_reference_matches_naive_loop(shape, block, mode):
    x = qkv_inputs(*shape)
    torch.testing.assert_close(reference(**x, block_size=block, mode=mode),
                               naive(**x, block_size=block, mode=mode), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(reference(**x, block_size=block, mode=mode, scale=0.3),
                               naive(**x, block_size=block, mode=mode, scale=0.3), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["long", "short"])
def test_reference_with_bias_and_mask_matches_naive_loop(mode):
    x = qkv_inputs(4, 3, 2, 4, 6)
    block = (2, 3)
    groups, members = (6, 4) if mode == "long" else (4, 6)
    bias = torch.randn(2, members, members, dtype=torch.float64)
    mask = torch.randn(groups // 2, members, members, dtype=torch.float64)
    torch.testing.assert_close(
        reference(**x, block_size=block, mode=mode, bias=bias, mask=mask),
        naive(**x, block_size=block, mode=mode, bias=bias, mask=mask), rtol=1e-10, atol=1e-10)


def _masked_call(x, bias, mask, backend):
    out = segops.interlaced_sparse_attention(**x, block_size=2, mode="short", bias=bias,
                                             mask=mask, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (*x.values(), bias))
    return [out.detach(), *grads]


@pytest.mark.parametrize("backend,device,dtype", backend_cases(include_reference=True))
def test_infinite_mask_entries(backend, device, dtype):
    """-inf mask entries drop their keys, and a row masked entirely attends as if unmasked:
    output and every gradient against the fp64 reference under the tolerance rule (a floor of
    finfo.min / 2 once made the backward see that row's probabilities as 1), and the semantics
    against the reference on the same mask with that row zeroed and the others' -inf written as
    exact exclusions."""
    require_backend(OP, backend, device, dtype)
    torch.manual_seed(0)
    x64 = qkv_inputs(2, 3, 2, 4, 4)
    bias64 = torch.randn(2, 4, 4, dtype=torch.float64)
    mask64 = torch.zeros(4, 4, 4, dtype=torch.float64)
    mask64[:, :, 3] = float("-inf")  # every query ignores member 3
    mask64[1, 2] = float("-inf")  # member 2 of group 1 (the block at y 0..1, x 2..3) sees nothing

    def run(dt, be, dev, mask=mask64):
        x = {k: v.to(dev, dt).requires_grad_() for k, v in x64.items()}
        return _masked_call(x, bias64.to(dev, dt).requires_grad_(), mask.to(dev, dt), be)

    got = run(dtype, backend, device)
    ref64 = run(torch.float64, "reference", "cpu")
    ref_same = run(dtype, "reference", "cpu")
    for name, g, r64, r in zip(("out", "grad query", "grad key", "grad value", "grad bias"),
                               got, ref64, ref_same):
        assert_close_to_reference(name, g.cpu(), r64, r, dtype)
    unmasked_row = mask64.clone()
    unmasked_row[:, :, 3] = -1e300  # exp underflows: the exact exclusion
    unmasked_row[1, 2] = 0.0  # all four members, member 3 included
    want = run(torch.float64, "reference", "cpu", unmasked_row)
    for g, w in zip(ref64, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("sample", ["bias_and_mask_long", "swin_windows_short"])
def test_strided_bias_mask_and_incoming_gradient(sample, backend, device, dtype):
    """Every tensor non-contiguous (query, key, value, bias as Swin's permuted table view, mask)
    and the incoming gradient too: forward and every gradient against the fp64 reference (the
    contract's strided test takes a sample without bias and mask)."""
    require_backend(OP, backend, device, dtype)
    s = find_sample(OP, sample)
    fn = lambda **kw: segops.interlaced_sparse_attention(**kw, backend=backend)  # noqa: E731
    check_against_reference(fn, SPEC.reference, rounded_inputs(s, dtype), s.grads, dtype, device,
                            kwargs=s.kwargs, make_input=noncontiguous, make_grad=noncontiguous)


def _global_attention(query, key, value, scale):
    n, ck, h, w = query.shape
    q, k, v = (t.flatten(2) for t in (query, key, value))
    a = torch.softmax(scale * q.transpose(1, 2) @ k, -1)
    return (v @ a.transpose(1, 2)).view(n, -1, h, w)


def test_reference_identities():
    x = qkv_inputs(2, 3, 4, 6, 10)
    h, w = 6, 10
    glob = _global_attention(**x, scale=3 ** -0.5)
    # One group of every position: long with (1, 1), short with (H, W).
    torch.testing.assert_close(reference(**x, block_size=(1, 1), mode="long"), glob)
    torch.testing.assert_close(reference(**x, block_size=(h, w), mode="short"), glob)
    # Groups of one position: the output is the value.
    torch.testing.assert_close(reference(**x, block_size=(1, 1), mode="short"), x["value"])
    torch.testing.assert_close(reference(**x, block_size=(h, w), mode="long"), x["value"])
    # long with (Ph, Pw) == short with (H/Ph, W/Pw) after a space-to-depth-style relabelling:
    # the long groups of a map are the short groups of its (ly, lx)-major rearrangement.
    ph, pw = 2, 5
    perm = lambda t: t.reshape(2, -1, h // ph, ph, w // pw, pw).permute(0, 1, 3, 2, 5, 4).reshape(2, -1, h, w)  # noqa: E731
    unperm = lambda t: t.reshape(2, -1, ph, h // ph, pw, w // pw).permute(0, 1, 3, 2, 5, 4).reshape(2, -1, h, w)  # noqa: E731
    short = reference(*(perm(t) for t in x.values()), block_size=(h // ph, w // pw), mode="short")
    torch.testing.assert_close(unperm(short), reference(**x, block_size=(ph, pw), mode="long"))


@pytest.mark.parametrize("backend,device,dtype", backend_cases(include_reference=True))
def test_constant_input_is_finite(backend, device, dtype):
    require_backend(OP, backend, device, dtype)
    q = torch.full((1, 4, 4, 4), 7.0, device=device, dtype=dtype)
    v = torch.full((1, 3, 4, 4), 2.0, device=device, dtype=dtype)
    out = segops.interlaced_sparse_attention(q, q, v, (2, 2), backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, v)


def test_int_block_size_is_square():
    x = qkv_inputs(1, 2, 3, 4, 6)
    torch.testing.assert_close(segops.interlaced_sparse_attention(**x, block_size=2, backend="reference"),
                               reference(**x, block_size=(2, 2)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck_with_bias_and_mask(monkeypatch, dtype):
    """The contract's opcheck runs a sample without bias and mask; this one has both (the
    optional inputs in the schemas, the fake of grad_bias, no gradient for the mask)."""
    from segops.ops.interlaced_sparse_attention import SPEC
    from tests.test_contract import _captured_op_args
    require_backend(OP, "cpu", "cpu", dtype)
    s = next(s for s in SPEC.samples() if s.name == "small_bias_mask_long")
    args = _captured_op_args(monkeypatch, SPEC, s, dtype)
    constant = SPEC.input_names.index("mask")
    grad_args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and i != constant
                      else a for i, a in enumerate(args))
    torch.library.opcheck(SPEC.forward_op, grad_args)
    out, lse = SPEC.forward_op(*args)
    saved = dict(zip(SPEC.input_names, args), out=out, lse=lse)
    torch.library.opcheck(SPEC.backward_op, (torch.randn_like(out),
                                             *(saved[n] for n in SPEC.saves), *args[5:]))
