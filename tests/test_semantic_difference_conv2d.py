"""semantic_difference_conv2d: reference semantics, every backend against fp64, registration,
errors, torch.compile, and the SemanticDifferenceConv2d / SemanticDiffusion modules."""
import pytest
import torch
import torch.nn.functional as F

import segops
import segops.nn
from segops.ops.semantic_difference_conv2d import _backward_op, _forward_op
from segops.reference.semantic_difference_conv2d import semantic_difference_conv2d as reference
from tests.utils import (TRITON_DEVICE, backend_cases, channels_last, check_against_reference,
                         noncontiguous, require_backend)

OP = "semantic_difference_conv2d"


def naive(input, guidance, weight, bias=None, *, dilation=1, similarity="charbonnier", sigma=1.0):
    """Loop form of SPEC §2.4, U and V zero outside the image."""
    n, cin, h, w = input.shape
    cout, _, k, _ = weight.shape
    cg = guidance.shape[1]
    half = (k - 1) // 2
    U, Vg, Wt = input.double(), guidance.double(), weight.double()

    def at(x, b, y, xx):  # x[b, :, y, xx] or zeros outside
        return x[b, :, y, xx] if 0 <= y < h and 0 <= xx < w else torch.zeros(x.shape[1], dtype=torch.float64)

    out = torch.zeros(n, cout, h, w, dtype=torch.float64)
    for b in range(n):
        for y in range(h):
            for x in range(w):
                acc = torch.zeros(cout, dtype=torch.float64)
                for ky in range(k):
                    for kx in range(k):
                        yy, xx = y + (ky - half) * dilation, x + (kx - half) * dilation
                        d = at(U, b, yy, xx) - U[b, :, y, x]
                        e = at(Vg, b, yy, xx) - Vg[b, :, y, x]
                        if similarity == "charbonnier":
                            s = (1 + e * e / sigma ** 2) ** -0.5
                        elif similarity == "gaussian":
                            s = torch.exp(-(e * e).sum() / (2 * sigma ** 2 * cg))
                        else:
                            s = 1.0
                        acc += Wt[:, :, ky, kx] @ (s * d)
                out[b, :, y, x] = acc + (0 if bias is None else bias.double())
    return out


def inputs(n, cin, cg, cout, h, w, k, bias=True, dtype=torch.float64):
    x = dict(input=torch.randn(n, cin, h, w, dtype=dtype),
             guidance=torch.randn(n, cg, h, w, dtype=dtype),
             weight=torch.randn(cout, cin, k, k, dtype=dtype) / (cin * k * k) ** 0.5)
    if bias:
        x["bias"] = torch.randn(cout, dtype=dtype)
    return x


@pytest.mark.parametrize("similarity,k,dilation,cg,sigma", [
    ("charbonnier", 3, 1, 3, 1.0), ("charbonnier", 3, 2, 3, 0.7), ("gaussian", 3, 1, 5, 1.0),
    ("gaussian", 5, 1, 2, 1.5), ("none", 3, 2, 4, 1.0), ("charbonnier", 1, 1, 3, 1.0)])
def test_reference_matches_naive_loop(similarity, k, dilation, cg, sigma):
    x = inputs(2, 3, cg, 4, 4, 5, k)
    kw = dict(dilation=dilation, similarity=similarity, sigma=sigma)
    torch.testing.assert_close(reference(**x, **kw), naive(**x, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k,dilation", [(1, 1), (3, 1), (3, 2), (5, 1)])
def test_reference_none_is_central_difference_conv(k, dilation):
    x = inputs(2, 3, 3, 4, 6, 7, k, bias=False)
    u, wt = x["input"], x["weight"]
    cdc = (F.conv2d(u, wt, padding=dilation * (k - 1) // 2, dilation=dilation)
           - F.conv2d(u, wt.sum((2, 3), keepdim=True)))
    torch.testing.assert_close(reference(**x, dilation=dilation, similarity="none"), cdc,
                               rtol=1e-10, atol=1e-10)


def test_reference_constant_guidance_inside_is_none():
    # With V constant, S = 1 wherever the neighbour is inside the image: away from the border
    # every similarity gives the central difference convolution.
    x = inputs(1, 3, 3, 2, 7, 8, 3, bias=False)
    x["guidance"] = torch.full_like(x["guidance"], 0.3)
    none = reference(**x, similarity="none")
    for sim in ("charbonnier", "gaussian"):
        torch.testing.assert_close(reference(**x, similarity=sim)[..., 1:-1, 1:-1],
                                   none[..., 1:-1, 1:-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("similarity,cg", [("charbonnier", 2), ("gaussian", 3), ("none", 2)])
def test_reference_gradcheck(similarity, cg):
    x = {k: v.requires_grad_() for k, v in inputs(2, 2, cg, 3, 3, 4, 3).items()}
    f = lambda *a: reference(*a, dilation=1, similarity=similarity, sigma=0.8)  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(x.values()))


# (similarity, k, dilation, N, Cin, Cg, Cout, H, W, bias)
CONFIGS = [
    ("charbonnier", 3, 1, 2, 3, 3, 5, 5, 7, True),     # batch > 1, Cin != Cout, H != W, primes
    ("gaussian", 3, 2, 2, 4, 6, 3, 6, 5, False),       # Cg != Cin, dilation 2
    ("none", 5, 1, 1, 3, 3, 4, 7, 6, True),            # k = 5
    ("charbonnier", 1, 1, 1, 3, 3, 2, 4, 5, False),    # k = 1
    ("gaussian", 5, 2, 1, 2, 3, 3, 7, 9, True),        # k = 5, dilation 2 (taps leave the image)
    ("charbonnier", 3, 2, 1, 16, 16, 17, 9, 9, True),  # channels that fill a 16-wide tile
    ("gaussian", 3, 1, 1, 3, 2, 4, 1, 6, False),       # H = 1
    ("charbonnier", 3, 1, 1, 3, 3, 4, 6, 1, True),     # W = 1
]


def _ids(c):
    return f"{c[0]}-k{c[1]}d{c[2]}-N{c[3]}C{c[4]}g{c[5]}o{c[6]}-{c[7]}x{c[8]}"


def _call(backend):
    return lambda **kw: segops.semantic_difference_conv2d(**kw, backend=backend)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_backend_matches_fp64_reference(backend, device, dtype, cfg):
    require_backend(OP, backend, device, dtype)
    sim, k, dil, n, cin, cg, cout, h, w, bias = cfg
    x = inputs(n, cin, cg, cout, h, w, k, bias=bias)
    names = ["input", "guidance", "weight"] + (["bias"] if bias else [])
    check_against_reference(_call(backend), reference, x, names, dtype, device,
                            kwargs=dict(dilation=dil, similarity=sim, sigma=0.9))


@pytest.mark.triton
@pytest.mark.parametrize("similarity", ["charbonnier", "gaussian"])
def test_triton_several_channel_blocks_and_split_k(monkeypatch, similarity):
    # Several Cin / Cout / Cg blocks per program grid and the split-K grad_weight path (used on
    # GPUs to fill the machine; forced here because the interpreter path uses one split).
    require_backend(OP, "triton", TRITON_DEVICE, torch.float32)
    import segops.triton.semantic_difference_conv2d as tri
    monkeypatch.setattr(tri, "_DW_SPLITS", 3)
    cg = 20 if similarity == "charbonnier" else 33
    check_against_reference(_call("triton"), reference, inputs(2, 20, cg, 40, 5, 13, 3),
                            ["input", "guidance", "weight", "bias"], torch.float32, TRITON_DEVICE,
                            kwargs=dict(similarity=similarity, dilation=2))


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last"])
@pytest.mark.parametrize("similarity", ["charbonnier", "gaussian"])
def test_backend_non_contiguous_inputs_and_grads(backend, device, dtype, layout, similarity):
    require_backend(OP, backend, device, dtype)
    make = noncontiguous if layout == "noncontiguous" else channels_last
    cg = 3 if similarity == "charbonnier" else 2
    check_against_reference(_call(backend), reference, inputs(2, 3, cg, 4, 5, 6, 3),
                            ["input", "guidance", "weight", "bias"], dtype, device,
                            kwargs=dict(similarity=similarity), make_input=make, make_grad=make)


@pytest.mark.parametrize("backend,device,dtype", backend_cases(include_reference=True))
@pytest.mark.parametrize("shape", [(0, 3, 5, 6), (2, 3, 0, 6), (2, 0, 4, 5)])
def test_empty_inputs_give_empty_outputs(backend, device, dtype, shape):
    require_backend(OP, backend, device, dtype)
    u = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    wt = torch.randn(4, shape[1], 3, 3, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(4, device=device, dtype=dtype, requires_grad=True)
    out = segops.semantic_difference_conv2d(u, u, wt, b, backend=backend)
    assert out.shape == (shape[0], 4) + shape[2:]
    if out.numel():
        torch.testing.assert_close(out, b.detach().view(1, 4, 1, 1).expand_as(out))
    out.sum().backward()
    assert u.grad.shape == u.shape and wt.grad.shape == wt.shape and b.grad.shape == b.shape


def _bad(**over):
    x = dict(input=torch.randn(1, 3, 4, 5), guidance=torch.randn(1, 3, 4, 5),
             weight=torch.randn(2, 3, 3, 3))
    x.update(over)
    return x


@pytest.mark.parametrize("bad,kw,match", [
    (dict(input=torch.randn(1, 3, 4)), {}, "`input` must be 4-D"),
    (dict(guidance=torch.randn(1, 3, 4, 6)), {}, "`guidance` must have"),
    (dict(guidance=torch.randn(2, 3, 4, 5)), {}, "`guidance` must have"),
    (dict(weight=torch.randn(2, 4, 3, 3)), {}, "`weight` must have in channels"),
    (dict(weight=torch.randn(2, 3, 2, 2)), {}, "k odd"),
    (dict(weight=torch.randn(2, 3, 3, 1)), {}, "k odd"),
    (dict(bias=torch.randn(3)), {}, "`bias` must have"),
    (dict(guidance=torch.randn(1, 2, 4, 5)), {}, "Cg == Cin"),
    (dict(guidance=torch.randn(1, 3, 4, 5, dtype=torch.float64)), {}, "dtype"),
    (dict(input=torch.ones(1, 3, 4, 5, dtype=torch.int64)), {}, "floating"),
    ({}, dict(similarity="cosine"), "`similarity` must be one of"),
    ({}, dict(dilation=0), "`dilation`"),
    ({}, dict(sigma=0.0), "`sigma`"),
    ({}, dict(backend="fastest"), "backend must be one of"),
])
def test_bad_input_errors(bad, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        segops.semantic_difference_conv2d(**_bad(**bad), **kw)


def test_gaussian_accepts_any_guidance_channels():
    x = _bad(guidance=torch.randn(1, 7, 4, 5))
    assert segops.semantic_difference_conv2d(**x, similarity="gaussian", backend="reference").shape == (1, 2, 4, 5)


@pytest.mark.parametrize("similarity,cg,k,dilation", [("charbonnier", 2, 3, 1), ("gaussian", 3, 3, 2),
                                                      ("none", 2, 1, 1)])
def test_cpu_backend_gradcheck(similarity, cg, k, dilation):
    require_backend(OP, "cpu", "cpu", torch.float64)
    x = {k_: v.requires_grad_() for k_, v in inputs(2, 2, cg, 3, 4, 5, k).items()}
    f = lambda *a: segops.semantic_difference_conv2d(  # noqa: E731
        *a, dilation=dilation, similarity=similarity, sigma=0.8, backend="cpu")
    assert torch.autograd.gradcheck(f, tuple(x.values()))


@pytest.mark.parametrize("similarity", ["charbonnier", "gaussian", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_cpu(similarity, layout):
    require_backend(OP, "cpu", "cpu", torch.float64)
    x = inputs(2, 3, 3 if similarity == "charbonnier" else 2, 4, 4, 5, 3)
    if layout == "channels_last":  # what the public function feeds the op: contiguous tensors
        x = {k: channels_last(v).contiguous() for k, v in x.items()}
    args = (x["input"].requires_grad_(), x["guidance"].requires_grad_(),
            x["weight"].requires_grad_(), x["bias"].requires_grad_(), 2, similarity, 0.9, "cpu")
    torch.library.opcheck(_forward_op, args)
    grad = torch.randn(2, 4, 4, 5, dtype=torch.float64)
    torch.library.opcheck(_backward_op, (grad, x["input"].detach(), x["guidance"].detach(),
                                         x["weight"].detach(), 2, similarity, 0.9, "cpu"))


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_compile_fullgraph_forward_backward(backend):
    require_backend(OP, backend, "cpu", torch.float32)
    x = {k: v.float().requires_grad_() for k, v in inputs(1, 3, 3, 4, 5, 6, 3).items()}
    f = torch.compile(lambda **kw: segops.semantic_difference_conv2d(**kw, backend=backend),
                      fullgraph=True, backend="aot_eager")
    out = f(**x)
    out.sum().backward()
    torch.testing.assert_close(out, reference(**x), rtol=1e-5, atol=1e-5)
    grads = [x[k].grad.clone() for k in x]
    for v in x.values():
        v.grad = None
    reference(**x).sum().backward()
    for g, k in zip(grads, x):
        torch.testing.assert_close(g, x[k].grad, rtol=1e-4, atol=1e-4)


def test_compile_inductor_forward_cpu():
    require_backend(OP, "cpu", "cpu", torch.float32)
    x = {k: v.float() for k, v in inputs(1, 3, 2, 4, 5, 6, 3).items()}
    f = torch.compile(lambda **kw: segops.semantic_difference_conv2d(
        **kw, similarity="gaussian", backend="cpu") * 2, fullgraph=True)
    torch.testing.assert_close(f(**x), 2 * reference(**x, similarity="gaussian"), rtol=1e-5, atol=1e-5)


# ---- modules -------------------------------------------------------------------------------

def test_sdc_module_shapes_state_and_backends():
    torch.manual_seed(0)
    m = segops.nn.SemanticDifferenceConv2d(4, 6, 3, dilation=2, bias=True, similarity="gaussian", sigma=0.5)
    assert sorted(m.state_dict()) == ["bias", "weight"]
    assert m.weight.shape == (6, 4, 3, 3)
    assert sorted(segops.nn.SemanticDifferenceConv2d(4, 6).state_dict()) == ["weight"]
    u, v = torch.randn(2, 4, 7, 8), torch.randn(2, 5, 7, 8)
    ref = m(u, v)
    assert ref.shape == (2, 6, 7, 8)
    torch.testing.assert_close(ref, reference(u, v, m.weight, m.bias, dilation=2,
                                              similarity="gaussian", sigma=0.5))
    for b in ("reference", "cpu"):
        if segops._backend.REGISTRY[OP].status(torch.device("cpu"), torch.float32)[b] is None:
            with segops.use_backend(b):
                torch.testing.assert_close(m(u, v), ref, rtol=1e-5, atol=1e-5)


def test_sdc_module_rejects_even_kernel():
    with pytest.raises(ValueError, match="odd"):
        segops.nn.SemanticDifferenceConv2d(3, 3, kernel_size=2)


def _backends():
    ok = segops._backend.REGISTRY[OP].status(torch.device("cpu"), torch.float32)
    return [b for b in ("reference", "cpu") if ok[b] is None]


def test_semantic_diffusion_single_scale():
    torch.manual_seed(0)
    m = segops.nn.SemanticDiffusion(8, 6, single_scale=True).eval()
    assert sorted(m.state_dict()) == sorted(
        ["downsample.weight", "downsample.bias", "guidance_proj.weight", "guidance_proj.bias",
         "sdc.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
         "bn.num_batches_tracked", "fuse.weight", "fuse.bias"])
    assert m.downsample.stride == (2, 2) and m.downsample.kernel_size == (3, 3)
    u = torch.randn(2, 8, 9, 11)
    outs = []
    for b in _backends():
        m.backend = b
        outs.append(m(u))
    assert outs[0].shape == u.shape
    # The SDN composition, written out: stride-2 guidance, 1x1 projection, resize, SDC, BN, ReLU, fuse.
    v = F.interpolate(m.guidance_proj(m.downsample(u)), size=(9, 11), mode="bilinear", align_corners=False)
    y = F.relu(m.bn(reference(u, v, m.sdc.weight)))
    expected = m.fuse(torch.cat([u, y], 1))
    for o in outs:
        torch.testing.assert_close(o, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="guidance"):
        segops.nn.SemanticDiffusion(8, 6)(u)


def test_semantic_diffusion_multi_scale_backward():
    torch.manual_seed(0)
    chans = [4, 6, 8]
    feats = [torch.randn(2, c, 16 // 2 ** i, 20 // 2 ** i, requires_grad=True) for i, c in enumerate(chans)]
    necks = [segops.nn.SemanticDiffusion(chans[i], chans[i + 1], similarity=s)
             for i, s in zip(range(2), ("charbonnier", "gaussian"))]
    results = {}
    for b in _backends():
        for m in necks:
            m.backend = b
        outs = [m(feats[i], feats[i + 1]) for i, m in enumerate(necks)]  # guidance of i is i+1
        assert [o.shape for o in outs] == [f.shape for f in feats[:2]]
        grads = torch.autograd.grad(sum(o.square().sum() for o in outs), feats)
        assert all(torch.isfinite(g).all() for g in grads) and grads[2].abs().sum() > 0
        results[b] = (outs, grads)
    if len(results) == 2:
        for a, b in zip(*[sum(map(list, results[k]), []) for k in ("reference", "cpu")]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
