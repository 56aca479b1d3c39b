"""disentangled_non_local beyond the contract (tests/test_contract.py): the loop form of the
semantics, whitening's shift invariance, the plain non-local and unary identities, constant
inputs."""
import pytest
import torch

import segops
from segops.reference.disentangled_non_local import disentangled_non_local as reference
from tests.utils import require_backend

OP = "disentangled_non_local"


def naive(query, key, value, unary=None, whiten=True, scale=None, temperature=1.0):
    """Loop form of docs/operators.md §2.3."""
    n, ck = query.shape[:2]
    cv = value.shape[1]
    q = query.double().reshape(n, ck, -1)
    k = key.double().reshape(n, ck, -1)
    v = value.double().reshape(n, cv, -1)
    s = (ck ** -0.5 if scale is None else scale) / temperature
    out = torch.zeros(n, cv, q.shape[2], dtype=torch.float64)
    for b in range(n):
        qb, kb = q[b], k[b]
        if whiten:
            qb = qb - sum(qb[:, i] for i in range(qb.shape[1]))[:, None] / qb.shape[1]
            kb = kb - sum(kb[:, j] for j in range(kb.shape[1]))[:, None] / kb.shape[1]
        uvec = 0
        if unary is not None:
            ub = unary[b].double().reshape(-1)
            e = [torch.exp(ub[j]) for j in range(len(ub))]
            uvec = sum(e[j] / sum(e) * v[b, :, j] for j in range(len(ub)))
        for i in range(qb.shape[1]):
            logits = [s * torch.dot(qb[:, i], kb[:, j]) for j in range(kb.shape[1])]
            mx = max(logits)
            e = [torch.exp(x - mx) for x in logits]
            out[b, :, i] = sum(e[j] / sum(e) * v[b, :, j] for j in range(len(e))) + uvec
    return out.reshape(n, cv, *query.shape[2:])


def inputs(n, ck, cv, sq, sk, unary=True, dtype=torch.float64, qscale=1.0):
    x = dict(query=qscale * torch.randn(n, ck, *sq, dtype=dtype) + 0.3,
             key=qscale * torch.randn(n, ck, *sk, dtype=dtype) - 0.2,
             value=torch.randn(n, cv, *sk, dtype=dtype))
    if unary:
        x["unary"] = torch.randn(n, 1, *sk, dtype=dtype)
    return x


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("case", [
    dict(n=1, ck=3, cv=2, sq=(2, 3), sk=(2, 3), unary=True, scale=None, temperature=0.05),
    dict(n=2, ck=4, cv=3, sq=(5,), sk=(7,), unary=False, scale=1.0, temperature=1.0),
    dict(n=2, ck=2, cv=3, sq=(3, 2), sk=(4,), unary=True, scale=0.7, temperature=0.3),
])
def test_reference_matches_naive_loop(case, whiten):
    x = inputs(case["n"], case["ck"], case["cv"], case["sq"], case["sk"], case["unary"], qscale=0.3)
    kw = dict(whiten=whiten, scale=case["scale"], temperature=case["temperature"])
    torch.testing.assert_close(reference(**x, **kw), naive(**x, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_key_shift_leaves_whitened_output_unchanged(backend):
    require_backend(OP, backend, "cpu", torch.float64)
    x = inputs(2, 4, 3, (3, 4), (5, 2))
    shift = torch.randn(1, 4, 1, 1, dtype=torch.float64) * 5
    a = segops.disentangled_non_local(**x, temperature=0.05, backend=backend)
    y = dict(x, key=x["key"] + shift)
    torch.testing.assert_close(segops.disentangled_non_local(**y, temperature=0.05, backend=backend), a)
    # Whitening also makes the result invariant to a query shift (plain non-local is not).
    y = dict(x, query=x["query"] + shift)
    torch.testing.assert_close(segops.disentangled_non_local(**y, temperature=0.05, backend=backend), a)
    assert not torch.allclose(segops.disentangled_non_local(**y, whiten=False, backend=backend),
                              segops.disentangled_non_local(**x, whiten=False, backend=backend))


def test_plain_non_local_identity():
    # whiten=False, unary=None: softmax(s q^T k) v, i.e. embedded-Gaussian non-local.
    x = inputs(2, 4, 3, (3, 5), (3, 5), unary=False)
    q, k, v = (x[n].reshape(2, x[n].shape[1], -1) for n in ("query", "key", "value"))
    a = torch.softmax(q.transpose(1, 2) @ k * 0.7, -1)
    expect = (v @ a.transpose(1, 2)).reshape(2, 3, 3, 5)
    torch.testing.assert_close(reference(q.reshape(2, 4, 3, 5), x["key"], x["value"], whiten=False,
                                         scale=0.7), expect)
    # The unary term adds one vector, the softmax-weighted value mean, to every position.
    u = torch.randn(2, 1, 3, 5, dtype=torch.float64)
    diff = reference(**dict(x, unary=u)) - reference(**x)
    uvec = (v @ u.reshape(2, -1, 1).softmax(1)).reshape(2, 3, 1, 1)
    torch.testing.assert_close(diff, uvec.expand_as(diff))


def test_constant_input_gives_finite_output():
    q = torch.ones(1, 4, 3, 3)
    out = segops.disentangled_non_local(q, q, q, q[:, :1], temperature=0.05, backend="auto")
    assert torch.isfinite(out).all()
