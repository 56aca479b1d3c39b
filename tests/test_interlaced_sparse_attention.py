"""interlaced_sparse_attention beyond the contract (tests/test_contract.py): the loop form of the
semantics, its identities, constant inputs and the int block size."""
import pytest
import torch

import segops
from segops.reference.interlaced_sparse_attention import interlaced_sparse_attention as reference
from tests.utils import backend_cases, qkv_inputs, require_backend

OP = "interlaced_sparse_attention"


def naive(query, key, value, block_size, mode, scale=None):
    """Loop form of docs/operators.md §2.2: a softmax over the positions sharing the query's group label."""
    n, ck, h, w = query.shape
    ph, pw = block_size
    scale = ck ** -0.5 if scale is None else scale
    label = (lambda y, x: (y % ph, x % pw)) if mode == "long" else (lambda y, x: (y // ph, x // pw))
    out = torch.zeros(n, value.shape[1], h, w, dtype=torch.float64)
    for b in range(n):
        for y in range(h):
            for x in range(w):
                members = [(i, j) for i in range(h) for j in range(w) if label(i, j) == label(y, x)]
                e = torch.stack([scale * (query[b, :, y, x].double() @ key[b, :, i, j].double())
                                 for i, j in members])
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
