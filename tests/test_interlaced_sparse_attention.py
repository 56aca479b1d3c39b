"""interlaced_sparse_attention: reference semantics, every backend against fp64, registration,
errors, and the InterlacedSparseAttention module (mmseg ISAHead's inner part)."""
import math

import pytest
import torch
import torch.nn.functional as F

import segops
from segops.nn import InterlacedSparseAttention
from segops.ops.interlaced_sparse_attention import _backward_op, _forward_op
from segops.reference.interlaced_sparse_attention import interlaced_sparse_attention as reference
from tests.utils import (backend_cases, channels_last, check_against_reference, noncontiguous,
                         require_backend)

OP = "interlaced_sparse_attention"


def naive(query, key, value, block_size, mode, scale=None):
    """Loop form of SPEC §2.2: a softmax over the positions sharing the query's group label."""
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


def inputs(n, ck, cv, h, w, dtype=torch.float64, scale=1.0):
    return dict(query=scale * torch.randn(n, ck, h, w, dtype=dtype),
                key=scale * torch.randn(n, ck, h, w, dtype=dtype),
                value=torch.randn(n, cv, h, w, dtype=dtype))


@pytest.mark.parametrize("mode", ["long", "short"])
@pytest.mark.parametrize("shape,block", [((1, 3, 2, 4, 6), (2, 3)), ((2, 2, 3, 6, 4), (3, 2)),
                                         ((1, 2, 2, 4, 4), (1, 1)), ((1, 2, 2, 3, 5), (3, 5))])
def test_reference_matches_naive_loop(shape, block, mode):
    x = inputs(*shape)
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
    x = inputs(2, 3, 4, 6, 10)
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


@pytest.mark.parametrize("mode", ["long", "short"])
def test_reference_gradcheck(mode):
    x = {k: v.requires_grad_() for k, v in inputs(2, 2, 2, 2, 6, scale=0.5).items()}
    assert torch.autograd.gradcheck(lambda q, k, v: reference(q, k, v, (2, 3), mode), tuple(x.values()))


# (shape (N, Ck, Cv, H, W), block_size, modes). Tiny, so that the Triton interpreter stays fast.
CASES = [
    ((2, 4, 3, 8, 12), (4, 2), ("long", "short")),    # batch > 1, H != W, Ph != Pw
    ((1, 3, 5, 16, 8), (8, 8), ("long", "short")),    # the default block; groups of 2 / 64
    ((1, 5, 4, 6, 10), (1, 1), ("long", "short")),    # one group of 60 / 60 groups of 1
    ((1, 4, 3, 6, 10), (6, 10), ("long", "short")),   # block = (H, W)
    ((1, 20, 24, 10, 10), (10, 10), ("short",)),      # 100 members: two key tiles, channels > 16
    ((1, 40, 72, 16, 16), (16, 16), ("short",)),      # 256 members (the largest group size named)
    ((1, 512, 512, 4, 8), (4, 4), ("short",)),        # Ck = Cv = 512: several channel chunks
]
PARAMS = [pytest.param(s, b, m, id=f"{s}-{b}-{m}") for s, b, ms in CASES for m in ms]


def _fn(backend, block, mode):
    return lambda **kw: segops.interlaced_sparse_attention(**kw, block_size=block, mode=mode,
                                                          backend=backend)


def _ref(block, mode):
    return lambda **kw: reference(**kw, block_size=block, mode=mode)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("shape,block,mode", PARAMS)
def test_backend_matches_fp64_reference(backend, device, dtype, shape, block, mode):
    require_backend(OP, backend, device, dtype)
    check_against_reference(_fn(backend, block, mode), _ref(block, mode), inputs(*shape),
                            ["query", "key", "value"], dtype, device)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["long", "short"])
def test_backend_non_contiguous_inputs_and_grads(backend, device, dtype, layout, mode):
    require_backend(OP, backend, device, dtype)
    make = noncontiguous if layout == "noncontiguous" else channels_last
    check_against_reference(_fn(backend, (2, 3), mode), _ref((2, 3), mode), inputs(2, 4, 3, 4, 6),
                            ["query", "key", "value"], dtype, device, make_input=make, make_grad=make)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_backend_explicit_scale_and_large_logits(backend, device, dtype):
    # Large logits: the online softmax must subtract the running max (no overflow).
    require_backend(OP, backend, device, dtype)
    fn = lambda **kw: segops.interlaced_sparse_attention(**kw, block_size=(2, 2), mode="long",  # noqa: E731
                                                          scale=2.5, backend=backend)
    ref = lambda **kw: reference(**kw, block_size=(2, 2), mode="long", scale=2.5)  # noqa: E731
    check_against_reference(fn, ref, inputs(1, 4, 3, 4, 6, scale=3.0), ["query", "key", "value"],
                            dtype, device)


@pytest.mark.parametrize("backend,device,dtype", backend_cases(include_reference=True))
def test_constant_input_is_finite(backend, device, dtype):
    require_backend(OP, backend, device, dtype)
    q = torch.full((1, 4, 4, 4), 7.0, device=device, dtype=dtype)
    v = torch.full((1, 3, 4, 4), 2.0, device=device, dtype=dtype)
    out = segops.interlaced_sparse_attention(q, q, v, (2, 2), backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, v)


@pytest.mark.parametrize("backend,device,dtype", backend_cases(include_reference=True))
@pytest.mark.parametrize("shape", [(0, 4, 3, 4, 4), (1, 4, 3, 0, 4), (1, 0, 3, 4, 4), (1, 4, 0, 4, 4)])
def test_empty_inputs_give_empty_outputs(backend, device, dtype, shape):
    require_backend(OP, backend, device, dtype)
    n, ck, cv, h, w = shape
    q = torch.randn(n, ck, h, w, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(n, cv, h, w, device=device, dtype=dtype, requires_grad=True)
    out = segops.interlaced_sparse_attention(q, q, v, (2, 2), backend=backend)
    assert out.shape == (n, cv, h, w)
    out.sum().backward()
    assert q.grad.shape == q.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("bad,match", [
    (dict(query=torch.randn(1, 2, 4)), "`query` must be 4-D"),
    (dict(key=torch.randn(1, 3, 4, 6)), "`key` must have"),
    (dict(value=torch.randn(1, 3, 4, 4)), "`value` must have"),
    (dict(value=torch.randn(1, 3, 4, 6, dtype=torch.float64)), "dtype"),
    (dict(query=torch.ones(1, 2, 4, 6, dtype=torch.int64)), "floating"),
    (dict(block_size=(3, 2)), r"divisible by `block_size`"),
    (dict(block_size=(2, 0)), "`block_size` must be"),
    (dict(block_size=(2, 2, 2)), "`block_size` must be"),
    (dict(block_size=2.0), "`block_size` must be"),
    (dict(mode="medium"), "`mode` must be"),
    (dict(scale=float("nan")), "`scale` must be"),
])
def test_bad_input_errors(bad, match):
    x = dict(query=torch.randn(1, 2, 4, 6), key=torch.randn(1, 2, 4, 6), value=torch.randn(1, 3, 4, 6),
             block_size=(2, 2))
    x.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        segops.interlaced_sparse_attention(**x)


def test_unknown_backend_name_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        segops.interlaced_sparse_attention(**inputs(1, 2, 3, 4, 4), block_size=2, backend="fastest")


def test_int_block_size_is_square():
    x = inputs(1, 2, 3, 4, 6)
    torch.testing.assert_close(segops.interlaced_sparse_attention(**x, block_size=2, backend="reference"),
                               reference(**x, block_size=(2, 2)))


# ----------------------------------------------------------------------------- cpu registration

@pytest.mark.parametrize("mode", ["long", "short"])
def test_cpu_gradcheck(mode):
    require_backend(OP, "cpu", "cpu", torch.float64)
    x = {k: v.requires_grad_() for k, v in inputs(2, 2, 2, 2, 6, scale=0.5).items()}
    f = lambda q, k, v: segops.interlaced_sparse_attention(q, k, v, (2, 3), mode, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(x.values()))


@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
@pytest.mark.parametrize("long", [True, False])
def test_cpu_opcheck(layout, long):
    require_backend(OP, "cpu", "cpu", torch.float32)
    x = inputs(2, 3, 4, 4, 6, dtype=torch.float32)
    if layout == "permuted":
        x = {k: channels_last(v) for k, v in x.items()}
    q, k, v = (t.requires_grad_() for t in x.values())
    torch.library.opcheck(_forward_op, (q, k, v, 2, 3, long, 0.5, "cpu"))
    out, lse = _forward_op(q.detach(), k.detach(), v.detach(), 2, 3, long, 0.5, "cpu")
    g = torch.randn_like(out)
    if layout == "permuted":
        g = channels_last(g)
    torch.library.opcheck(_backward_op, (g, q.detach(), k.detach(), v.detach(), out, lse, 2, 3,
                                         long, 0.5, "cpu"))


def test_cpu_compiles_fullgraph():
    require_backend(OP, "cpu", "cpu", torch.float32)
    x = {k: v.float().requires_grad_() for k, v in inputs(2, 4, 3, 4, 6).items()}
    f = torch.compile(lambda **kw: segops.interlaced_sparse_attention(**kw, block_size=(2, 3),
                                                                     mode="short", backend="cpu"),
                      fullgraph=True, backend="aot_eager")
    out = f(**x)
    out.sum().backward()
    ref = {k: v.detach().requires_grad_() for k, v in x.items()}
    out_ref = reference(**ref, block_size=(2, 3), mode="short")
    out_ref.sum().backward()
    torch.testing.assert_close(out, out_ref)
    for k in x:
        torch.testing.assert_close(x[k].grad, ref[k].grad)


# ----------------------------------------------------------------------------- module

MMSEG_KEYS = {  # the parameter/buffer names of one mmseg ISAHead SelfAttentionBlock
    *(f"{p}_project.{i}.conv.weight" for p in ("key", "query") for i in (0, 1)),
    *(f"{p}_project.{i}.bn.{b}" for p in ("key", "query") for i in (0, 1)
      for b in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
    "value_project.weight", "value_project.bias", "output_project.conv.weight",
    *(f"output_project.bn.{b}" for b in ("weight", "bias", "running_mean", "running_var",
                                         "num_batches_tracked")),
}


def test_module_state_dict_keys_match_mmseg():
    m = InterlacedSparseAttention(16, 8)
    expected = {f"{r}.{k}" for r in ("global_relation", "local_relation") for k in MMSEG_KEYS}
    assert set(m.state_dict()) == expected
    assert m.global_relation.key_project[0].conv.weight.shape == (8, 16, 1, 1)
    assert m.global_relation.value_project.weight.shape == (16, 16, 1, 1)


def _mmseg_style(m, x):
    """ISAHead's forward between in_conv and out_conv, written as mmseg does (views + permutes +
    a per-group SelfAttentionBlock with matmul, channels**-0.5 scaling, softmax)."""
    def sab(block, t):
        b = t.shape[0]
        q = block.query_project(t).flatten(2).transpose(1, 2)
        k = block.key_project(t).flatten(2)
        v = block.value_project(t).flatten(2).transpose(1, 2)
        a = torch.softmax(block.channels ** -0.5 * (q @ k), -1)
        ctx = (a @ v).transpose(1, 2).reshape(b, -1, *t.shape[2:])
        return block.output_project(ctx)
    n, c, h, w = x.shape
    lh, lw = m.block_size
    gh, gw = math.ceil(h / lh), math.ceil(w / lw)
    ph, pw = gh * lh - h, gw * lw - w
    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    x = x.view(n, c, gh, lh, gw, lw).permute(0, 3, 5, 1, 2, 4).reshape(-1, c, gh, gw)
    x = sab(m.global_relation, x)
    x = x.view(n, lh, lw, c, gh, gw).permute(0, 4, 5, 3, 1, 2).reshape(-1, c, lh, lw)
    x = sab(m.local_relation, x)
    x = x.view(n, gh, gw, c, lh, lw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, gh * lh, gw * lw)
    return x[:, :, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]


@pytest.mark.parametrize("hw", [(8, 12), (7, 10), (5, 3)])  # exact, padded on both axes, smaller than a block
def test_module_matches_mmseg_style_forward(hw):
    torch.manual_seed(1)
    m = InterlacedSparseAttention(6, 4, block_size=(4, 3), backend="reference").double().eval()
    for p in m.parameters():  # non-trivial BN statistics and affine parameters
        torch.nn.init.normal_(p, 0, 0.5)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.3)
            mod.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, *hw, dtype=torch.float64)
    out = m(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _mmseg_style(m, x))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_module_backend_switch_is_equivalent(backend):
    require_backend(OP, backend, "cpu", torch.float32)
    m = InterlacedSparseAttention(8, 4, block_size=(2, 3), backend="reference").train()
    x = torch.randn(2, 8, 5, 7, requires_grad=True)
    out_ref = m(x)
    g_ref, = torch.autograd.grad(out_ref.sum(), x)
    m.backend = backend
    out = m(x)
    g, = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
