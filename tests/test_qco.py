"""qco_1d, texture_reconstruct, qco_2d (STLNet): reference semantics, every backend against
fp64, identities, constant inputs, ties, registration, errors, and the STL modules."""
import itertools

import pytest
import torch

import segops
import segops.nn as snn
from segops.ops import qco as qco_ops
from segops.reference import qco as R
from tests.utils import (TRITON_DEVICE, backend_cases, channels_last, check_against_reference,
                         noncontiguous, require_backend)

# Triton under the CPU interpreter costs ~0.1 s per program and kernel: its slowest variants
# (fp16 at many regions, which adds nothing dtype-specific) are trimmed there, not on a GPU.
INTERPRETED = TRITON_DEVICE == "cpu"


def _interpreter_trim(backend, dtype, heavy):
    if backend == "triton" and INTERPRETED and heavy and dtype == torch.float16:
        pytest.skip("Triton interpreter time: covered by the fp32 variant (and on a GPU)")


# ------------------------------------------------------------------------------------------
# Independent loop implementations (SPEC §2.5 read literally)
# ------------------------------------------------------------------------------------------
def _cos(a, b):
    na, nb = max(a.norm().item(), 1e-12), max(b.norm().item(), 1e-12)
    return (a / na * (b / nb)).sum().item()


def _encode_loop(sims, k):
    """E[i][n] for a list of similarities (one region), plus the levels."""
    lo, hi = min(sims), max(sims)
    delta = (hi - lo) / k
    levels = [lo + (2 * n + 1) / (2 * k) * (hi - lo) for n in range(k)]
    enc = [[(1 - abs(levels[n] - s)) if abs(levels[n] - s) < delta else 0.0 for n in range(k)]
           for s in sims]
    return enc, levels


def naive_qco_1d(x, k):
    n, c, h, w = x.shape
    counts, levels, sim = torch.zeros(n, k), torch.zeros(n, k), torch.zeros(n, h, w)
    counts, levels, sim = counts.double(), levels.double(), sim.double()
    for b in range(n):
        g = x[b].double().reshape(c, -1).mean(1)
        sims = [_cos(x[b, :, i, j].double(), g) for i in range(h) for j in range(w)]
        enc, lev = _encode_loop(sims, k)
        tot = sum(sum(row) for row in enc)
        for m in range(k):
            counts[b, m] = sum(row[m] for row in enc) / (tot + 1e-6)
            levels[b, m] = lev[m]
        sim[b] = torch.tensor(sims, dtype=torch.float64).view(h, w)
    return counts, levels, sim


def naive_texture_reconstruct(sim, levels, features):
    n, h, w = sim.shape
    cf, k = features.shape[1:]
    out = torch.zeros(n, cf, h, w, dtype=torch.float64)
    for b in range(n):
        delta = (sim[b].max() - sim[b].min()).item() / k
        for i in range(h):
            for j in range(w):
                for m in range(k):
                    d = abs(levels[b, m].item() - sim[b, i, j].item())
                    if d < delta:
                        out[b, :, i, j] += (1 - d) * features[b, :, m].double()
    return out


def naive_qco_2d(x, k, s):
    n, c, hh, ww = x.shape
    h, w = hh // s, ww // s
    cooc = torch.zeros(n, s, s, k, k, dtype=torch.float64)
    levels = torch.zeros(n, s, s, k, dtype=torch.float64)
    for b, ry, rx in itertools.product(range(n), range(s), range(s)):
        blk = x[b, :, ry * h:(ry + 1) * h, rx * w:(rx + 1) * w].double()
        g = blk.reshape(c, -1).mean(1)
        sims = [_cos(blk[:, i, j], g) for i in range(h) for j in range(w)]
        enc, lev = _encode_loop(sims, k)
        m = torch.zeros(k, k, dtype=torch.float64)
        for i in range(h - 1):
            for j in range(w - 1):
                for a in range(k):
                    for bb in range(k):
                        m[a, bb] += enc[i * w + j][a] * enc[(i + 1) * w + j + 1][bb]
        cooc[b, ry, rx] = m / (m.sum() + 1e-6)
        levels[b, ry, rx] = torch.tensor(lev, dtype=torch.float64)
    return cooc, levels


@pytest.mark.parametrize("shape,k", [((2, 3, 4, 5), 4), ((1, 2, 1, 7), 3), ((1, 3, 3, 3), 1)])
def test_reference_qco_1d_matches_naive_loop(shape, k):
    x = torch.randn(*shape, dtype=torch.float64)
    for got, want in zip(R.qco_1d(x, k), naive_qco_1d(x, k)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_reference_texture_reconstruct_matches_naive_loop():
    _, levels, sim = R.qco_1d(torch.randn(2, 3, 4, 5, dtype=torch.float64), 6)
    f = torch.randn(2, 3, 6, dtype=torch.float64)
    torch.testing.assert_close(R.texture_reconstruct(sim, levels, f),
                               naive_texture_reconstruct(sim, levels, f), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape,k,s", [((1, 3, 4, 6), 4, 2), ((2, 2, 6, 3), 3, 3), ((1, 2, 5, 4), 2, 1)])
def test_reference_qco_2d_matches_naive_loop(shape, k, s):
    x = torch.randn(*shape, dtype=torch.float64)
    for got, want in zip(R.qco_2d(x, k, s), naive_qco_2d(x, k, s)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_reference_each_pixel_hits_at_most_two_levels_and_counts_sum_to_one():
    x = torch.randn(3, 8, 11, 13, dtype=torch.float64)
    for k in (1, 2, 8, 128):
        counts, levels, sim = R.qco_1d(x, k)
        flat = sim.reshape(3, -1)
        delta = (flat.amax(-1) - flat.amin(-1)).view(3, 1, 1) / k
        enc = R.encode(flat.unsqueeze(-1), levels.unsqueeze(1), delta)
        assert ((enc != 0).sum(-1) <= 2).all()
        assert ((enc != 0).sum(-1) >= 1).all()  # every pixel falls into some band
        torch.testing.assert_close(counts.sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    cooc, _ = R.qco_2d(x[..., :9, :12], 8, 3)
    torch.testing.assert_close(cooc.sum((-1, -2)), torch.ones(3, 3, 3, dtype=torch.float64),
                               atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# Inputs away from the band thresholds (for gradcheck)
# ------------------------------------------------------------------------------------------
def _region_sims(x, grid):
    n, _, hh, ww = x.shape
    h, w = hh // grid, ww // grid
    out = []
    for ry, rx in itertools.product(range(grid), range(grid)):
        out.append(R.qco_1d(x[:, :, ry * h:(ry + 1) * h, rx * w:(rx + 1) * w], 1)[2].reshape(n, -1))
    return torch.cat(out, 0)  # (N * R, h * w)


def _margin_ok(sims, k, levels=None, tol=1e-4):
    lo, hi = sims.amin(-1, keepdim=True), sims.amax(-1, keepdim=True)
    if levels is None:
        levels = R.quantisation_levels(lo, hi, k)
    delta = ((hi - lo) / k).unsqueeze(-1)
    edge = ((levels.unsqueeze(1) - sims.unsqueeze(-1)).abs() - delta).abs().min()
    srt = sims.sort(-1).values
    gaps = torch.cat([srt[:, 1:2] - srt[:, :1], srt[:, -1:] - srt[:, -2:-1]], 1) if sims.shape[1] > 1 else None
    return edge.item() > tol and (gaps is None or gaps.min().item() > tol)


def smooth_input(shape, k, grid=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        if _margin_ok(_region_sims(x, grid), k):
            return x
    raise RuntimeError("no input away from the band thresholds found")


def test_reference_gradcheck():
    x = smooth_input((2, 3, 4, 5), 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: R.qco_1d(t, 4), (x,))
    x = smooth_input((1, 3, 4, 6), 3, grid=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: R.qco_2d(t, 3, 2), (x,))
    _, lev, sim = R.qco_1d(smooth_input((2, 3, 4, 5), 5), 5)
    f = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(R.texture_reconstruct, (sim.requires_grad_(), lev.requires_grad_(), f))


# ------------------------------------------------------------------------------------------
# Every backend against the fp64 reference
# ------------------------------------------------------------------------------------------
def _run(op, backend):
    fn = getattr(segops, op)
    return lambda **kw: fn(**kw, backend=backend)


def recon_inputs(n, c, h, w, cf, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    _, levels, sim = R.qco_1d(x, k)
    return dict(sim=sim, levels=levels, features=torch.randn(n, cf, k, generator=g, dtype=torch.float64))


QCO1D_CASES = [((2, 3, 5, 7), 8), ((1, 4, 1, 6), 8), ((2, 5, 3, 3), 1), ((2, 16, 9, 11), 128),
               ((1, 3, 7, 1), 128)]


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("shape,k", QCO1D_CASES)
def test_qco_1d_matches_fp64_reference(backend, device, dtype, shape, k):
    require_backend("qco_1d", backend, device, dtype)
    x = torch.randn(*shape, dtype=torch.float64)
    check_against_reference(_run("qco_1d", backend), R.qco_1d, dict(x=x), ["x"], dtype, device,
                            kwargs=dict(num_levels=k))


RECON_CASES = [((2, 3, 5, 7, 4), 8), ((1, 3, 1, 6, 3), 1), ((2, 8, 9, 11, 20), 128), ((1, 2, 7, 1, 17), 128)]


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("shape,k", RECON_CASES)
def test_texture_reconstruct_matches_fp64_reference(backend, device, dtype, shape, k):
    require_backend("texture_reconstruct", backend, device, dtype)
    check_against_reference(_run("texture_reconstruct", backend), R.texture_reconstruct,
                            recon_inputs(*shape, k), ["sim", "levels", "features"], dtype, device)


QCO2D_CASES = [((2, 3, 6, 6), 8, 1), ((1, 4, 6, 10), 8, 2), ((1, 3, 9, 6), 8, 3), ((1, 3, 12, 6), 8, 6),
               ((1, 2, 6, 6), 1, 2), ((1, 3, 5, 7), 4, 1), ((1, 3, 8, 6), 128, 2)]


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("shape,k,grid", QCO2D_CASES)
def test_qco_2d_matches_fp64_reference(backend, device, dtype, shape, k, grid):
    require_backend("qco_2d", backend, device, dtype)
    _interpreter_trim(backend, dtype, grid >= 3)
    x = torch.randn(*shape, dtype=torch.float64)
    check_against_reference(_run("qco_2d", backend), R.qco_2d, dict(x=x), ["x"], dtype, device,
                            kwargs=dict(num_levels=k, grid=grid))


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last"])
def test_non_contiguous_inputs_and_grads(backend, device, dtype, layout):
    require_backend("qco_1d", backend, device, dtype)
    _interpreter_trim(backend, dtype, True)
    make = noncontiguous if layout == "noncontiguous" else channels_last
    x = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    check_against_reference(_run("qco_1d", backend), R.qco_1d, dict(x=x), ["x"], dtype, device,
                            kwargs=dict(num_levels=8), make_input=make, make_grad=make)
    check_against_reference(_run("qco_2d", backend), R.qco_2d, dict(x=x), ["x"], dtype, device,
                            kwargs=dict(num_levels=4, grid=2), make_input=make, make_grad=make)
    check_against_reference(_run("texture_reconstruct", backend), R.texture_reconstruct,
                            recon_inputs(2, 3, 5, 6, 4, 8), ["sim", "levels", "features"], dtype,
                            device, make_input=make, make_grad=make)


def _tie_input(shape, dtype=torch.float64):
    """Several pixels share the minimum and several the maximum similarity exactly."""
    x = torch.randn(*shape, dtype=dtype)
    x[:, :, 0, 0] = x[:, :, 1, 2] = x[:, :, 2, 1] = -3.0  # anti-parallel to the mean: the minimum
    x[:, :, 0, 1] = x[:, :, 2, 2] = 1.0                    # along the ones direction: near the max
    x[:, :, -1, -1] = x[:, :, 0, 1] * 2                    # same direction: same similarity
    return x


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_ties_at_min_and_max(backend, device, dtype):
    require_backend("qco_1d", backend, device, dtype)
    x = _tie_input((2, 4, 5, 6))
    x[:, :, :, 3:] += 0.5  # keep the mean away from zero
    check_against_reference(_run("qco_1d", backend), R.qco_1d, dict(x=x), ["x"], dtype, device,
                            kwargs=dict(num_levels=8))
    check_against_reference(_run("qco_2d", backend), R.qco_2d, dict(x=x[:, :, :4]), ["x"], dtype,
                            device, kwargs=dict(num_levels=8, grid=1))


@pytest.mark.parametrize("backend,device,dtype", backend_cases(include_reference=True))
@pytest.mark.parametrize("value", [0.0, 0.7])
def test_constant_input_gives_zero_counts_and_no_nan(backend, device, dtype, value):
    require_backend("qco_1d", backend, device, dtype)
    _interpreter_trim(backend, dtype, True)
    x = torch.full((2, 3, 6, 6), value, device=device, dtype=dtype, requires_grad=True)
    slow = backend == "triton" and INTERPRETED
    for k in ((8,) if slow else (1, 8, 128)):
        counts, levels, sim = segops.qco_1d(x, k, backend=backend)
        assert (counts == 0).all()
        cooc, lev2 = segops.qco_2d(x, k, 2 if slow else 3, backend=backend)
        assert (cooc == 0).all()
        feats = torch.randn(2, 5, k, device=device, dtype=dtype, requires_grad=True)
        out = segops.texture_reconstruct(sim, levels, feats, backend=backend)
        assert (out == 0).all()
        outs = (counts, levels, sim, cooc, lev2, out)
        assert all(torch.isfinite(o).all() for o in outs)
        gx, gf = torch.autograd.grad(outs, (x, feats), [torch.randn_like(o) for o in outs])
        assert torch.isfinite(gx).all() and torch.isfinite(gf).all()


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_zero_pixels_have_finite_gradients(backend, device, dtype):
    require_backend("qco_1d", backend, device, dtype)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    x[:, :, 1, 2] = 0  # F.normalize's eps clamp
    x = x.to(device, dtype).requires_grad_()
    counts, levels, sim = segops.qco_1d(x, 4, backend=backend)
    ref = R.qco_1d(x.detach().double().cpu(), 4)
    for got, want in zip((counts, levels, sim), ref):
        torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=2e-3)
    (gx,) = torch.autograd.grad(counts.sum() + levels.sum() + sim.sum(), x)
    if dtype in (torch.float32, torch.float64):
        # d normalize(x)/dx at x = 0 is 1/eps = 1e12: finite in fp32/fp64, not representable
        # in fp16 (whose reference gives NaN already in the forward, eps underflowing to 0)
        assert torch.isfinite(gx).all()


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_counts_sum_to_one(backend, device, dtype):
    require_backend("qco_1d", backend, device, dtype)
    x = torch.randn(2, 5, 7, 9, device=device, dtype=dtype)
    for k in (1, 8, 128):
        counts = segops.qco_1d(x, k, backend=backend)[0].double()
        torch.testing.assert_close(counts.sum(-1), torch.ones(2, dtype=torch.float64, device=device),
                                   atol=3e-3 if dtype == torch.float16 else 1e-5, rtol=0)
    cooc = segops.qco_2d(x[..., :6, :6], 8, 2, backend=backend)[0].double()
    torch.testing.assert_close(cooc.sum((-1, -2)), torch.ones(2, 2, 2, dtype=torch.float64, device=device),
                               atol=3e-3 if dtype == torch.float16 else 1e-5, rtol=0)


@pytest.mark.parametrize("backend,device,dtype", backend_cases(include_reference=True))
def test_empty_inputs(backend, device, dtype):
    require_backend("qco_1d", backend, device, dtype)
    x = torch.randn(0, 3, 4, 4, device=device, dtype=dtype, requires_grad=True)
    counts, levels, sim = segops.qco_1d(x, 8, backend=backend)
    assert counts.shape == (0, 8) and sim.shape == (0, 4, 4)
    cooc, lev = segops.qco_2d(x, 8, 2, backend=backend)
    assert cooc.shape == (0, 2, 2, 8, 8) and lev.shape == (0, 2, 2, 8)
    x2 = torch.randn(2, 3, 0, 4, device=device, dtype=dtype, requires_grad=True)
    counts, levels, sim = segops.qco_1d(x2, 8, backend=backend)
    assert counts.shape == (2, 8) and sim.shape == (2, 0, 4)
    (counts.sum() + levels.sum()).backward()
    assert x2.grad.shape == x2.shape
    f = torch.randn(2, 0, 8, device=device, dtype=dtype, requires_grad=True)
    out = segops.texture_reconstruct(torch.randn(2, 4, 4, device=device, dtype=dtype),
                                     torch.randn(2, 8, device=device, dtype=dtype), f, backend=backend)
    assert out.shape == (2, 0, 4, 4)


# ------------------------------------------------------------------------------------------
# cpu backend: gradcheck, opcheck, torch.compile
# ------------------------------------------------------------------------------------------
def test_cpu_gradcheck():
    require_backend("qco_1d", "cpu", "cpu", torch.float64)
    x = smooth_input((2, 3, 4, 5), 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: segops.qco_1d(t, 4, backend="cpu"), (x,))
    x = smooth_input((1, 3, 4, 6), 3, grid=2, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: segops.qco_2d(t, 3, 2, backend="cpu"), (x,))
    _, lev, sim = R.qco_1d(smooth_input((2, 3, 4, 5), 5, seed=2), 5)
    f = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: segops.texture_reconstruct(a, b, c, backend="cpu"),
                                    (sim.requires_grad_(), lev.requires_grad_(), f))


@pytest.mark.parametrize("permuted", [False, True])
def test_opcheck_cpu(permuted):
    require_backend("qco_1d", "cpu", "cpu", torch.float32)
    x = smooth_input((2, 3, 4, 6), 4, seed=3).float()
    if permuted:  # what the public functions feed the ops for a channels-last input
        x = channels_last(x).contiguous()
    fwd1 = qco_ops._qco_1d_op(x, 4, "cpu")
    torch.library.opcheck(qco_ops._qco_1d_op, (x.requires_grad_(), 4, "cpu"))
    gc, gl, gs = torch.randn_like(fwd1[0]), torch.randn_like(fwd1[1]), torch.randn_like(fwd1[2])
    torch.library.opcheck(qco_ops._qco_1d_backward_op,
                          (gc, gl, gs, x.detach(), fwd1[0], *fwd1[2:], 4, "cpu"))
    fwd2 = qco_ops._qco_2d_op(x.detach(), 4, 2, "cpu")
    torch.library.opcheck(qco_ops._qco_2d_op, (x, 4, 2, "cpu"))
    torch.library.opcheck(qco_ops._qco_2d_backward_op,
                          (torch.randn_like(fwd2[0]), torch.randn_like(fwd2[1]), x.detach(), fwd2[0],
                           *fwd2[2:], 4, 2, "cpu"))
    sim, lev = fwd1[2].detach().requires_grad_(), fwd1[1].detach().requires_grad_()
    f = torch.randn(2, 3, 4, requires_grad=True)
    torch.library.opcheck(qco_ops._recon_op, (sim, lev, f, "cpu"))
    torch.library.opcheck(qco_ops._recon_backward_op,
                          (torch.randn(2, 3, 4, 6), sim.detach(), lev.detach(), f.detach(), "cpu"))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compile_fullgraph(backend):
    require_backend("qco_1d", backend, "cpu", torch.float32)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    f = torch.randn(2, 4, 8, requires_grad=True)

    def fn(x, f):
        counts, levels, sim = segops.qco_1d(x, 8, backend=backend)
        out = segops.texture_reconstruct(sim, levels, f, backend=backend)
        cooc, lev2 = segops.qco_2d(x, 4, 3, backend=backend)
        return counts.sum() + out.square().sum() + cooc.square().sum() + lev2.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(x, f)
    gx, gf = torch.autograd.grad(got, (x, f))
    want = fn(x, f)
    wx, wf = torch.autograd.grad(want, (x, f))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gf, wf)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,match", [
    (lambda: segops.qco_1d(torch.randn(2, 3, 4), 8), "`x` must be 4-D"),
    (lambda: segops.qco_1d(torch.ones(1, 2, 3, 3, dtype=torch.int64), 8), "floating"),
    (lambda: segops.qco_1d(torch.randn(1, 2, 3, 3), 0), "num_levels"),
    (lambda: segops.qco_2d(torch.randn(1, 2, 6, 5), 8, 2), "divisible by grid"),
    (lambda: segops.qco_2d(torch.randn(1, 2, 6, 6), 8, 0), "grid"),
    (lambda: segops.texture_reconstruct(torch.randn(2, 3, 3), torch.randn(2, 8), torch.randn(2, 4, 7)),
     "`features` must have"),
    (lambda: segops.texture_reconstruct(torch.randn(2, 3, 3), torch.randn(3, 8), torch.randn(2, 4, 8)),
     "`levels` must have"),
    (lambda: segops.texture_reconstruct(torch.randn(2, 3, 3), torch.randn(2, 8).double(),
                                        torch.randn(2, 4, 8)), "dtype"),
])
def test_bad_input_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ------------------------------------------------------------------------------------------
# nn modules
# ------------------------------------------------------------------------------------------
def test_stl_end_to_end_shapes_and_backends():
    torch.manual_seed(0)
    m = snn.STL(16).eval()
    x = torch.randn(2, 16, 13, 17)  # not a multiple of 24: PTFEM pools to the nearest valid size
    with segops.use_backend("reference"):
        want = m(x)
    assert want.shape == (2, 768, 13, 17)
    if segops._backend.REGISTRY["qco_1d"].status(torch.device("cpu"), torch.float32)["cpu"] is None:
        xg = x.clone().requires_grad_()
        got = m(xg)  # auto: the cpu backend
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        got.square().mean().backward()
        assert torch.isfinite(xg.grad).all()


def test_ptfem_accepts_any_size():
    m = snn.PyramidTextureExtraction().eval()
    assert m.pooled_size(97, 97) == (96, 96)     # the official size (floor to a multiple of 8)
    assert m.pooled_size(64, 50) == (72, 48)     # official 64 and 48: not multiples of 3 -> nearest
    assert m.pooled_size(5, 30) == (24, 24)
    x = torch.randn(1, 512, 7, 11)
    with segops.use_backend("reference"):
        assert m(x).shape == (1, 256, 7, 11)


def test_state_dict_keys_match_official():
    # Names from STLNet.py (QCO_1d / TEM / QCO_2d / PTFEM / STL).
    tem = set(snn.TextureEnhance(128).state_dict())
    conv = lambda p: {f"{p}.conv.weight"}  # noqa: E731
    bn = lambda p: {f"{p}.bn.{n}" for n in ("weight", "bias", "running_mean", "running_var",  # noqa: E731
                                             "num_batches_tracked")}
    qco1 = (conv("qco.conv1.0") | bn("qco.conv1.0") | conv("qco.conv2") | conv("qco.f1.0")
            | conv("qco.f2") | conv("qco.out") | bn("qco.out"))
    assert tem == qco1 | conv("k") | conv("q") | conv("v") | conv("out") | bn("out")
    qco2 = set(snn.QCO2d(2, 8).state_dict())
    assert qco2 == (conv("f1.0") | conv("f2") | conv("out.0") | bn("out.0") | conv("out.1")
                    | bn("out.1"))
    stl = set(snn.STL(32).state_dict())
    assert {k.split(".")[0] for k in stl} == {"conv_start", "tem", "ptfem"}
    assert {k.split(".")[1] for k in stl if k.startswith("ptfem")} == {"conv", "qco_1", "qco_2", "qco_3",
                                                                        "qco_6", "out"}
    shapes = {k: tuple(v.shape) for k, v in snn.STL(32).state_dict().items()}
    assert shapes["conv_start.conv.weight"] == (256, 32, 1, 1)
    assert shapes["tem.qco.conv1.0.conv.weight"] == (256, 256, 3, 3)
    assert shapes["tem.qco.f1.0.conv.weight"] == (64, 2, 1)
    assert shapes["ptfem.qco_3.out.0.conv.weight"] == (128, 384, 1, 1)
    assert shapes["ptfem.out.conv.weight"] == (256, 512, 1, 1)


def test_qco_modules_backend_switch():
    torch.manual_seed(0)
    x = torch.randn(2, 256, 6, 6)
    q1, q2 = snn.QCO1d(8).eval(), snn.QCO2d(3, 8).eval()
    with segops.use_backend("reference"):
        want = (q1(x), q2(x))
    for backend in ("cpu",):
        if segops._backend.REGISTRY["qco_1d"].status(torch.device("cpu"), torch.float32)[backend]:
            continue
        q1.backend = q1.backend  # modules follow use_backend when their backend is "auto"
        with segops.use_backend(backend):
            got = (q1(x), q2(x))
        for g, w in zip(got[0] + (got[1],), want[0] + (want[1],)):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
