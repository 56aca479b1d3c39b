"""disentangled_non_local: reference semantics, SPEC identities, every backend against fp64,
registration (opcheck, compile), errors, and the NonLocal2d / DisentangledNonLocal2d modules."""
import pytest
import torch

import segops
from segops.nn import DisentangledNonLocal2d, NonLocal2d
from segops.reference.disentangled_non_local import disentangled_non_local as reference
from tests.utils import backend_cases, check_against_reference, noncontiguous, require_backend

OP = "disentangled_non_local"


def naive(query, key, value, unary=None, whiten=True, scale=None, temperature=1.0):
    """Loop form of SPEC §2.3."""
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


def test_reference_gradcheck():
    x = {k: v.requires_grad_() for k, v in inputs(2, 3, 2, (2, 3), (5,), qscale=0.5).items()}
    assert torch.autograd.gradcheck(lambda q, k, v, u: reference(q, k, v, u, temperature=0.5),
                                   tuple(x.values()))


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


# (n, ck, cv, sq, sk): Lq != Lk (pooled 110 keys, 19 region keys), odd sizes, 1-D and 2-D.
SHAPES = [
    (2, 5, 3, (7, 5), (7, 5)),
    (1, 16, 16, (9, 11), (110,)),
    (2, 3, 4, (5, 7), (19,)),
    (1, 4, 6, (37,), (3, 3)),
    (1, 130, 140, (4, 5), (19,)),  # several channel chunks/blocks in every kernel
]


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("whiten,unary", [(True, True), (False, False), (True, False), (False, True)])
def test_backend_matches_fp64_reference(backend, device, dtype, shape, whiten, unary):
    require_backend(OP, backend, device, dtype)
    x = inputs(*shape, unary=unary, qscale=0.5)
    names = ["query", "key", "value"] + (["unary"] if unary else [])
    check_against_reference(
        lambda **kw: segops.disentangled_non_local(**kw, whiten=whiten, temperature=0.05,
                                                   backend=backend),
        lambda **kw: reference(**kw, whiten=whiten, temperature=0.05), x, names, dtype, device)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_backend_scale_and_dims(backend, device, dtype):
    require_backend(OP, backend, device, dtype)
    x = inputs(2, 6, 5, (4, 3), (2, 3, 2), qscale=0.5)
    check_against_reference(
        lambda **kw: segops.disentangled_non_local(**kw, scale=1.0, temperature=2.0, backend=backend),
        lambda **kw: reference(**kw, scale=1.0, temperature=2.0), x,
        ["query", "key", "value", "unary"], dtype, device)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_backend_non_contiguous_inputs_and_grads(backend, device, dtype):
    require_backend(OP, backend, device, dtype)
    x = inputs(2, 4, 3, (5, 6), (19,), qscale=0.5)
    fn = lambda **kw: segops.disentangled_non_local(**kw, temperature=0.05, backend=backend)  # noqa: E731
    ref = lambda **kw: reference(**kw, temperature=0.05)  # noqa: E731
    names = ["query", "key", "value", "unary"]
    check_against_reference(fn, ref, x, names, dtype, device, make_input=noncontiguous,
                            make_grad=noncontiguous)

    def channels_last(t):
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.transpose(-1, -2).contiguous().transpose(-1, -2)
    y = inputs(1, 4, 3, (5, 6), (5, 6), qscale=0.5)
    check_against_reference(fn, ref, y, names, dtype, device, make_input=channels_last,
                            make_grad=channels_last)


@pytest.mark.parametrize("backend,device,dtype", backend_cases(include_reference=True))
def test_empty_inputs_give_empty_outputs(backend, device, dtype):
    require_backend(OP, backend, device, dtype)
    q = torch.randn(0, 4, 5, 6, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(0, 4, 7, device=device, dtype=dtype)
    v = torch.randn(0, 3, 7, device=device, dtype=dtype)
    out = segops.disentangled_non_local(q, k, v, backend=backend)
    assert out.shape == (0, 3, 5, 6)
    out.sum().backward()
    assert q.grad.shape == q.shape
    q2 = torch.randn(2, 4, 0, device=device, dtype=dtype)
    assert segops.disentangled_non_local(q2, k[:0].new_empty(2, 4, 7), v.new_empty(2, 3, 7),
                                         backend=backend).shape == (2, 3, 0)


def test_constant_input_gives_finite_output():
    q = torch.ones(1, 4, 3, 3)
    out = segops.disentangled_non_local(q, q, q, q[:, :1], temperature=0.05, backend="auto")
    assert torch.isfinite(out).all()


def test_cpu_gradcheck():
    require_backend(OP, "cpu", "cpu", torch.float64)
    x = {k: v.requires_grad_() for k, v in inputs(2, 3, 2, (2, 3), (5,), qscale=0.5).items()}
    for whiten in (True, False):
        assert torch.autograd.gradcheck(
            lambda q, k, v, u: segops.disentangled_non_local(q, k, v, u, whiten=whiten,
                                                             temperature=0.5, backend="cpu"),
            tuple(x.values()))


def test_opcheck_cpu():
    require_backend(OP, "cpu", "cpu", torch.float64)
    from segops.ops.disentangled_non_local import _backward_op, _forward_op
    for dtype in (torch.float32, torch.float64):
        x = inputs(2, 3, 4, (6,), (5,), dtype=dtype, qscale=0.5)
        q, k, v = (x[n].requires_grad_() for n in ("query", "key", "value"))
        u = x["unary"].reshape(2, 5).requires_grad_()
        for unary in (u, None):
            args = (q, k, v, unary, True, 0.8, "cpu")
            torch.library.opcheck(_forward_op, args)
            out, lse, g, lse_u = _forward_op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
            torch.library.opcheck(_backward_op, (torch.randn_like(out), q.detach(), k.detach(),
                                                 v.detach(), None if unary is None else u.detach(),
                                                 out, lse, g, lse_u, True, 0.8, "cpu"))
        # What the public function feeds the op from permuted inputs: contiguous flattened views.
        perm = torch.randn(2, 5, 3, 4, dtype=dtype).permute(0, 3, 1, 2)  # (2, 4, 5, 3), not contiguous
        vals = torch.randn(2, 3, 5, 3, dtype=dtype).permute(0, 1, 3, 2)
        torch.library.opcheck(_forward_op, (perm.reshape(2, 4, -1).contiguous(),
                                            perm.reshape(2, 4, -1).contiguous(),
                                            vals.reshape(2, 3, -1).contiguous(), None, False, 1.0, "cpu"))


def test_compile_fullgraph_cpu():
    require_backend(OP, "cpu", "cpu", torch.float32)
    x = {k: v.float().requires_grad_() for k, v in inputs(2, 4, 3, (5, 6), (19,)).items()}
    f = torch.compile(lambda **kw: segops.disentangled_non_local(**kw, temperature=0.05, backend="cpu"),
                      fullgraph=True, backend="aot_eager")
    out = f(**x)
    out.sum().backward()
    torch.testing.assert_close(out, reference(**{k: v.detach() for k, v in x.items()}, temperature=0.05))
    assert all(v.grad is not None for v in x.values())


def test_reference_compiles_fullgraph():
    x = {k: v.float().requires_grad_() for k, v in inputs(1, 4, 3, (5, 6), (7,)).items()}
    f = torch.compile(lambda **kw: segops.disentangled_non_local(**kw, backend="reference"),
                      fullgraph=True, backend="aot_eager")
    out = f(**x)
    out.sum().backward()
    torch.testing.assert_close(out, reference(**x))


@pytest.mark.parametrize("bad,match", [
    (dict(query=torch.randn(1, 2)), "`query` must have at least 3 dims"),
    (dict(key=torch.randn(1, 3, 4, 5)), "`key` must have"),
    (dict(value=torch.randn(1, 3, 4, 6)), "`value` must have"),
    (dict(unary=torch.randn(1, 2, 4, 5)), "`unary` must have"),
    (dict(value=torch.randn(1, 3, 4, 5, dtype=torch.float64)), "dtype"),
    (dict(query=torch.ones(1, 2, 4, 5, dtype=torch.int64)), "floating"),
    (dict(temperature=0.0), "`temperature`"),
    (dict(scale=float("nan")), "`scale`"),
])
def test_bad_input_errors(bad, match):
    x = dict(query=torch.randn(1, 2, 4, 5), key=torch.randn(1, 2, 4, 5), value=torch.randn(1, 3, 4, 5),
             unary=None)
    x.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        segops.disentangled_non_local(**x)


def test_unknown_backend_name_errors():
    x = inputs(1, 2, 3, (4,), (5,))
    with pytest.raises(ValueError, match="backend must be one of"):
        segops.disentangled_non_local(**x, backend="fastest")


# ---- modules ---------------------------------------------------------------------------------

MMCV_NL_KEYS = {"g.conv.weight", "g.conv.bias", "theta.conv.weight", "theta.conv.bias",
                "phi.conv.weight", "phi.conv.bias", "conv_out.conv.weight", "conv_out.conv.bias"}


def test_module_state_dict_keys():
    assert set(NonLocal2d(8).state_dict()) == MMCV_NL_KEYS
    keys = set(DisentangledNonLocal2d(8, norm_cfg=dict(type="BN", requires_grad=True)).state_dict())
    expect = (MMCV_NL_KEYS - {"conv_out.conv.bias"}) | {
        "conv_mask.weight", "conv_mask.bias", "conv_out.bn.weight", "conv_out.bn.bias",
        "conv_out.bn.running_mean", "conv_out.bn.running_var", "conv_out.bn.num_batches_tracked"}
    assert keys == expect
    assert "g.0.conv.weight" in NonLocal2d(8, sub_sample=True).state_dict()
    assert "concat_project.conv.weight" in NonLocal2d(8, mode="concatenation").state_dict()
    with pytest.raises(ValueError, match="Mode should be"):
        NonLocal2d(8, mode="bogus")


def _mmseg_dnl_forward(m, x, whiten=True, unary=True):
    """mmseg 1.x DisentangledNonLocal2d.forward (embedded_gaussian), written out."""
    n = x.size(0)
    g_x = m.g(x).view(n, m.inter_channels, -1).permute(0, 2, 1)
    theta_x = m.theta(x).view(n, m.inter_channels, -1).permute(0, 2, 1)
    phi_x = m.phi(x).view(n, m.inter_channels, -1)
    if whiten:
        theta_x = theta_x - theta_x.mean(dim=-2, keepdim=True)
        phi_x = phi_x - phi_x.mean(dim=-1, keepdim=True)
    pw = torch.matmul(theta_x, phi_x)
    if m.use_scale:
        pw = pw / theta_x.shape[-1] ** 0.5
    if unary:
        pw = pw / m.temperature
    pw = pw.softmax(dim=-1)
    y = torch.matmul(pw, g_x).permute(0, 2, 1).reshape(n, m.inter_channels, *x.shape[2:])
    if unary:
        um = m.conv_mask(x).view(n, 1, -1).softmax(dim=-1)
        y = y + torch.matmul(um, g_x).permute(0, 2, 1).reshape(n, m.inter_channels, 1, 1)
    return x + m.conv_out(y)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_modules_match_peer_forward(backend):
    require_backend(OP, backend, "cpu", torch.float64)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    dnl = DisentangledNonLocal2d(8, zeros_init=False, std=0.3, backend=backend).double().eval()
    torch.testing.assert_close(dnl(x), _mmseg_dnl_forward(dnl, x))
    nl = NonLocal2d(8, zeros_init=False, std=0.3, backend=backend).double().eval()
    nl.temperature = 1.0
    torch.testing.assert_close(nl(x), _mmseg_dnl_forward(nl, x, whiten=False, unary=False))
    # A DNL state dict loads into NonLocal2d's keys and back (same names for the shared parts).
    nl2 = NonLocal2d(8, backend=backend).double()
    nl2.load_state_dict({k: v for k, v in dnl.state_dict().items() if not k.startswith("conv_mask")})


@pytest.mark.parametrize("mode", ["gaussian", "dot_product", "concatenation"])
def test_nonlocal_other_modes(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    m = NonLocal2d(6, mode=mode, zeros_init=False, std=0.3).double()
    n = 2
    g_x = m.g(x).view(n, m.inter_channels, -1).permute(0, 2, 1)
    if mode == "gaussian":
        t = x.view(n, 6, -1).permute(0, 2, 1)
        p = x.view(n, 6, -1)
        pw = torch.matmul(t, p).softmax(-1)
    elif mode == "dot_product":
        t = m.theta(x).view(n, m.inter_channels, -1).permute(0, 2, 1)
        p = m.phi(x).view(n, m.inter_channels, -1)
        pw = torch.matmul(t, p) / p.shape[-1]
    else:
        t = m.theta(x).view(n, m.inter_channels, -1, 1).repeat(1, 1, 1, 20)
        p = m.phi(x).view(n, m.inter_channels, 1, -1).repeat(1, 1, 20, 1)
        pw = m.concat_project(torch.cat([t, p], 1)).view(n, 20, 20) / 20
    y = torch.matmul(pw, g_x).permute(0, 2, 1).reshape(n, m.inter_channels, 4, 5)
    torch.testing.assert_close(m(x), x + m.conv_out(y))


def test_module_backend_switch_and_sub_sample():
    require_backend(OP, "cpu", "cpu", torch.float32)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    for m in (DisentangledNonLocal2d(8, zeros_init=False, sub_sample=True),
              NonLocal2d(8, zeros_init=False, sub_sample=True)):
        m.backend = "reference"
        ref = m(x)
        m.backend = "cpu"
        out = m(x)
        assert out.shape == x.shape
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        with segops.use_backend("reference"):
            m.backend = "auto"
            torch.testing.assert_close(m(x), ref)
