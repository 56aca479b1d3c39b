"""The C++ CPU kernels called directly (torch.ops.segops_C.*), past the Python validation.

Every guard left in csrc/cpu (segops/torch_guards.h, segops/cpu/guards.h) must turn bad
arguments into a RuntimeError that names the kernel and the argument, never a crash; and the
kernels' own handling of zero-size inputs must give the right (empty) shapes.
"""
from __future__ import annotations

import pytest
import torch

from segops import _ext

pytestmark = pytest.mark.skipif(not _ext.has_kernel("criss_cross_attention_forward", "CPU"),
                                reason="segops._C with the CPU kernels is not built")

C = torch.ops.segops_C if _ext.load() else None


def rand(*shape):
    return torch.randn(*shape)


def strided(t):
    """Same shape and values, not contiguous."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


# Valid arguments of every kernel, as ordered dicts (backward ones from a real forward call).
def cca_forward(n=2, ck=3, cv=6, h=4, w=5):
    return dict(query=rand(n, ck, h, w), key=rand(n, ck, h, w), value=rand(n, cv, h, w))


def cca_backward(**shape):
    a = cca_forward(**shape)
    out, stats = C.criss_cross_attention_forward(*a.values())
    return dict(grad_out=torch.randn_like(out), **a, out=out, stats=stats)


def isa_forward(n=2, ck=3, cv=5, h=4, w=6):
    return dict(query=rand(n, ck, h, w), key=rand(n, ck, h, w), value=rand(n, cv, h, w),
                bias=None, mask=None, ph=2, pw=3, long_range=True, scale=0.5)


def isa_backward(**shape):
    a = isa_forward(**shape)
    out, lse = C.interlaced_sparse_attention_forward(*a.values())
    t = dict(list(a.items())[:5])
    return dict(grad_out=torch.randn_like(out), **t, out=out, lse=lse, ph=2, pw=3,
                long_range=True, scale=0.5)


def dnl_forward(n=2, ck=3, cv=4, lq=7, lk=5):
    return dict(query=rand(n, ck, lq), key=rand(n, ck, lk), value=rand(n, cv, lk),
                unary=rand(n, lk), whiten=True, s=0.5)


def dnl_backward(**shape):
    a = dnl_forward(**shape)
    out, lse, g, lse_u = C.disentangled_non_local_forward(*a.values())
    t = dict(list(a.items())[:4])
    return dict(grad_out=torch.randn_like(out), **t, out=out, lse=lse, g=g, lse_u=lse_u,
                whiten=True, s=0.5)


def sdc_forward(n=2, cin=3, cout=4, h=5, w=6, similarity="charbonnier"):
    return dict(input=rand(n, cin, h, w), guidance=rand(n, cin, h, w), weight=rand(cout, cin, 3, 3),
                bias=rand(cout), dilation=1, similarity=similarity, sigma=1.0)


def sdc_backward(n=2, cin=3, cout=4, h=5, w=6, similarity="charbonnier"):
    a = sdc_forward(n, cin, cout, h, w, similarity)
    del a["bias"]
    return dict(grad_out=rand(n, cout, h, w), **a)


def qco_forward(n=2, c=3, h=4, w=6, cooc=True):
    return dict(x=rand(n, c, h, w), num_levels=4, grid=2 if cooc else 1, cooc=cooc)


def qco_backward(cooc=True, **shape):
    a = qco_forward(cooc=cooc, **shape)
    hist, levels, sim, rnorm, mean, stats = C.qco_forward(*a.values())
    return dict(grad_hist=torch.randn_like(hist), grad_levels=torch.randn_like(levels),
                grad_sim=None if cooc else torch.randn_like(sim), x=a["x"], hist=hist, sim=sim,
                rnorm=rnorm, mean=mean, stats=stats, num_levels=a["num_levels"], grid=a["grid"],
                cooc=cooc)


def recon_forward(n=2, cf=3, h=4, w=5, k=6):
    return dict(sim=rand(n, h, w), levels=rand(n, k), features=rand(n, cf, k))


def recon_backward(n=2, cf=3, h=4, w=5, k=6):
    return dict(grad_out=rand(n, cf, h, w), **recon_forward(n, cf, h, w, k))


BUILDERS = {
    "criss_cross_attention_forward": cca_forward,
    "criss_cross_attention_backward": cca_backward,
    "interlaced_sparse_attention_forward": isa_forward,
    "interlaced_sparse_attention_backward": isa_backward,
    "disentangled_non_local_forward": dnl_forward,
    "disentangled_non_local_backward": dnl_backward,
    "semantic_difference_conv2d_forward": sdc_forward,
    "semantic_difference_conv2d_backward": sdc_backward,
    "qco_forward": qco_forward,
    "qco_backward": qco_backward,
    "texture_reconstruct_forward": recon_forward,
    "texture_reconstruct_backward": recon_backward,
}


def call(kernel, args):
    return getattr(C, kernel)(*args.values())


def with_(**changes):
    """Bad arguments: each named one replaced by a value or by a function of the valid one."""
    def apply(args):
        for name, new in changes.items():
            args[name] = new(args[name]) if callable(new) else new
        return args
    return apply


to_half = lambda t: t.half()  # noqa: E731
to_double = lambda t: t.double()  # noqa: E731
drop_dim = lambda t: t[0]  # noqa: E731
grow_last = lambda t: torch.cat([t, t[..., :1]], -1)  # noqa: E731  (one more in the last dim)
grow_first = lambda t: torch.cat([t, t[:1]], 0)  # noqa: E731  (one more in the first dim)

# kernel -> (bad arguments, message fragment[, keyword arguments of the kernel's builder])
GUARDS = {
    "criss_cross_attention_forward": [
        (with_(query=drop_dim), "query must be 4-D"),
        (with_(query=to_half, key=to_half, value=to_half),
         "query has dtype Half, which this backend does not implement"),
        (with_(key=to_double), "key has dtype Double, expected Float"),
        (with_(value=strided), "value must be contiguous"),
        (with_(key=grow_last), "key must have shape"),
        (with_(value=grow_first), "value must have shape"),
    ],
    "criss_cross_attention_backward": [
        (with_(grad_out=to_double), "grad_out has dtype Double"),
        (with_(stats=strided), "stats must be contiguous"),
        (with_(grad_out=grow_last), "grad_out must have shape"),
        (with_(out=grow_last), "out must have shape"),
        (with_(stats=lambda t: t[:, :1].contiguous()), "stats must have shape"),
    ],
    "interlaced_sparse_attention_forward": [
        (with_(value=drop_dim), "value must be 4-D"),
        (with_(query=to_half, key=to_half, value=to_half), "query has dtype Half"),
        (with_(value=to_double), "value has dtype Double"),
        (with_(key=grow_last), "key must have shape"),
        (with_(value=grow_first), "value must have shape"),
        (with_(ph=3), "(H, W) = (4, 6) must be divisible by the block size (3, 3)"),
        (with_(pw=0), "must be divisible by the block size (2, 0)"),
        # long mode, block (2, 3) on 4 x 6: G = 6 groups of L = 4 members, N = 2
        (with_(bias=rand(3, 4, 4)), "bias must have shape (k, L, L) with L = 4 and k dividing 2"),
        (with_(bias=rand(2, 4, 5)), "bias must have shape (k, L, L)"),
        (with_(bias=torch.randn(2, 4, 4, dtype=torch.float64)), "bias has dtype Double"),
        (with_(mask=rand(4, 4, 4)), "mask must have shape (k, L, L) with L = 4 and k dividing 6"),
    ],
    "interlaced_sparse_attention_backward": [
        (with_(lse=to_double), "lse has dtype Double"),
        (with_(grad_out=grow_last), "grad_out must have shape"),
        (with_(out=grow_first), "out must have shape"),
        (with_(lse=grow_last), "lse must have shape"),
        (with_(mask=rand(1, 4, 3)), "mask must have shape (k, L, L)"),
    ],
    "disentangled_non_local_forward": [
        (with_(query=lambda t: t[..., None]), "query must be 3-D"),
        (with_(query=to_half, key=to_half, value=to_half, unary=to_half), "query has dtype Half"),
        (with_(key=lambda t: t[:, :2].contiguous()), "key must have shape"),
        (with_(value=grow_last), "value must have shape"),
        (with_(unary=lambda t: t[:, None]), "unary must be 2-D"),
        (with_(unary=to_double), "unary has dtype Double"),
        (with_(unary=grow_last), "unary must have shape"),
    ],
    "disentangled_non_local_backward": [
        (with_(lse=to_double), "lse has dtype Double"),
        (with_(g=strided), "g must be contiguous"),
        (with_(grad_out=grow_last), "grad_out must have shape"),
        (with_(out=grow_first), "out must have shape"),
        (with_(lse=grow_last), "lse must have shape"),
        (with_(g=grow_last), "g must have shape"),
        (with_(lse_u=grow_last), "lse_u must have shape"),
    ],
    "semantic_difference_conv2d_forward": [
        (with_(similarity="cosine"),
         "similarity must be charbonnier, gaussian or none, got cosine"),
        (with_(weight=drop_dim), "weight must be 4-D"),
        (with_(input=to_half, guidance=to_half, weight=to_half), "input has dtype Half"),
        (with_(guidance=strided), "guidance must be contiguous"),
        (with_(weight=lambda t: t[:, :2].contiguous()), "weight must have shape"),
        # charbonnier is per channel: Cg == Cin
        (with_(guidance=lambda t: t[:, :2].contiguous()), "guidance must have shape"),
        (with_(guidance=grow_last), "guidance must have shape", dict(similarity="gaussian")),
        (with_(bias=to_double), "bias has dtype Double"),
        (with_(bias=grow_last), "bias must have shape"),
    ],
    "semantic_difference_conv2d_backward": [
        (with_(similarity="cosine"), "similarity must be"),
        (with_(grad_out=to_double), "grad_out has dtype Double"),
        (with_(grad_out=grow_first), "grad_out must have shape"),
    ],
    "qco_forward": [
        (with_(x=drop_dim), "x must be 4-D"),
        (with_(x=to_half), "x has dtype Half"),
        (with_(num_levels=0), "num_levels must be >= 1, got 0"),
        (with_(grid=0), "must be divisible by grid = 0"),
        (with_(grid=3), "(H, W) = (4, 6) must be divisible by grid = 3"),
        (with_(cooc=False), "the 1-D histogram (cooc false) has grid 1, got 2"),
    ],
    "qco_backward": [
        (with_(num_levels=0), "num_levels must be >= 1"),
        (with_(stats=to_double), "stats has dtype Double"),
        (with_(hist=strided), "hist must be contiguous"),
        (with_(grad_hist=grow_last), "grad_hist must have shape"),
        (with_(hist=grow_first), "hist must have shape"),
        (with_(grad_levels=grow_last), "grad_levels must have shape"),
        (with_(sim=grow_last), "sim must have shape"),
        (with_(rnorm=grow_first), "rnorm must have shape"),
        (with_(mean=grow_last), "mean must have shape"),
        (with_(stats=grow_last), "stats must have shape"),
        (with_(grad_sim=to_double), "grad_sim has dtype Double", dict(cooc=False)),
        (with_(grad_sim=grow_last), "grad_sim must have shape", dict(cooc=False)),
    ],
    "texture_reconstruct_forward": [
        (with_(sim=drop_dim), "sim must be 3-D"),
        (with_(sim=to_half, levels=to_half, features=to_half), "sim has dtype Half"),
        (with_(features=to_double), "features has dtype Double"),
        (with_(levels=lambda t: t[..., None]), "levels must be 2-D"),
        (with_(levels=to_double), "levels has dtype Double"),
        (with_(levels=grow_first), "levels must have shape"),
        (with_(features=grow_last), "features must have shape"),
    ],
    "texture_reconstruct_backward": [
        (with_(grad_out=to_double), "grad_out has dtype Double"),
        (with_(grad_out=grow_last), "grad_out must have shape"),
    ],
}
CASES = [(kernel, *case, {})[:4] for kernel, cases in GUARDS.items() for case in cases]


@pytest.mark.parametrize("kernel, bad, fragment, shape", CASES,
                         ids=[f"{c[0]}-{c[2][:40]}" for c in CASES])
def test_guard(kernel, bad, fragment, shape):
    args = bad(BUILDERS[kernel](**shape))
    with pytest.raises(RuntimeError) as info:
        call(kernel, args)
    message = str(info.value)
    assert f"segops_C.{kernel} (cpu): " in message, message
    assert fragment in message, message


def test_valid_arguments_pass():
    """The builders' arguments are valid, so each guard case fails for its one change only."""
    for kernel, build in BUILDERS.items():
        call(kernel, build())
    call("qco_backward", qco_backward(cooc=False))


# Zero-size inputs: (forward kernel, its builder's shape keywords).
EMPTY = [
    ("criss_cross_attention", dict(n=0)), ("criss_cross_attention", dict(h=0)),
    ("criss_cross_attention", dict(w=0)), ("criss_cross_attention", dict(ck=0)),
    ("criss_cross_attention", dict(cv=0)),
    ("interlaced_sparse_attention", dict(n=0)), ("interlaced_sparse_attention", dict(h=0, w=0)),
    ("interlaced_sparse_attention", dict(ck=0)), ("interlaced_sparse_attention", dict(cv=0)),
    ("disentangled_non_local", dict(n=0)), ("disentangled_non_local", dict(lq=0)),
    ("disentangled_non_local", dict(lk=0)), ("disentangled_non_local", dict(ck=0)),
    ("semantic_difference_conv2d", dict(n=0)), ("semantic_difference_conv2d", dict(h=0, w=0)),
    ("semantic_difference_conv2d", dict(cin=0, similarity="gaussian")),
    ("qco", dict(n=0)), ("qco", dict(h=0, w=0)), ("qco", dict(c=0)),
    ("qco_1d", dict(h=0, w=0)),
    ("texture_reconstruct", dict(n=0)), ("texture_reconstruct", dict(h=0)),
    ("texture_reconstruct", dict(k=0)),
]

def kernels(op):
    """(forward kernel, backward kernel, builder keyword arguments fixed for the op)."""
    if op == "qco_1d":
        return "qco_forward", "qco_backward", dict(cooc=False)
    return f"{op}_forward", f"{op}_backward", {}


def expected_forward_shapes(op, a):
    if op == "criss_cross_attention":
        n, _, h, w = a["query"].shape
        return [(n, a["value"].shape[1], h, w), (n, 2, h, w)]
    if op == "interlaced_sparse_attention":
        n, _, h, w = a["query"].shape
        return [(n, a["value"].shape[1], h, w), (n, h, w)]
    if op == "disentangled_non_local":
        n, _, lq = a["query"].shape
        cv = a["value"].shape[1]
        return [(n, cv, lq), (n, lq), (n, cv), (n,)]
    if op == "semantic_difference_conv2d":
        n, _, h, w = a["input"].shape
        return [(n, a["weight"].shape[0], h, w)]
    if op in ("qco", "qco_1d"):
        n, c, h, w = a["x"].shape
        k, s = a["num_levels"], a["grid"]
        hist, levels = ((n, s, s, k, k), (n, s, s, k)) if a["cooc"] else ((n, k), (n, k))
        return [hist, levels, (n, h, w), (n, h, w), (n, s * s, c), (n, s * s, 3)]
    n, h, w = a["sim"].shape
    return [(n, a["features"].shape[1], h, w)]


def backward_inputs(op, bwd):
    """The backward arguments that have gradients, in the order the backward returns them."""
    names = {"criss_cross_attention": ["query", "key", "value"],
             "interlaced_sparse_attention": ["query", "key", "value"],
             "disentangled_non_local": ["query", "key", "value", "unary"],
             "semantic_difference_conv2d": ["input", "guidance", "weight"],
             "qco": ["x"], "qco_1d": ["x"],
             "texture_reconstruct": ["sim", "levels", "features"]}[op]
    return [bwd[n] for n in names]


@pytest.mark.parametrize("op, shape", EMPTY,
                         ids=["-".join([o] + [f"{k}{v}" for k, v in s.items()]) for o, s in EMPTY])
def test_zero_size(op, shape):
    fwd_kernel, bwd_kernel, fixed = kernels(op)
    build = BUILDERS[fwd_kernel]
    a = build(**fixed, **shape)
    outs = call(fwd_kernel, a)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    assert [tuple(t.shape) for t in outs] == expected_forward_shapes(op, a)
    assert torch.isfinite(outs[0]).all()
    torch.manual_seed(0)
    bwd = BUILDERS[bwd_kernel](**fixed, **shape)
    grads = call(bwd_kernel, bwd)
    grads = list(grads) if isinstance(grads, (tuple, list)) else [grads]
    for grad, inp in zip(grads, backward_inputs(op, bwd)):
        assert grad.shape == inp.shape
        assert torch.isfinite(grad).all()
