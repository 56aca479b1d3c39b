"""qco_1d, texture_reconstruct, qco_2d (STLNet) beyond the contract (tests/test_contract.py):
loop forms of the semantics, at most two levels per pixel, constant inputs, zero pixels,
normalised histograms and maps without pixels."""
import itertools

import pytest
import torch

import segops
from segops.reference import qco as R
from tests.utils import TRITON_DEVICE, backend_cases, require_backend

# Triton under the CPU interpreter costs ~0.1 s per program and kernel: its slowest variants
# (fp16 at many regions, which adds nothing dtype-specific) are trimmed there, not on a GPU.
INTERPRETED = TRITON_DEVICE == "cpu"


def _interpreter_trim(backend, dtype, heavy):
    if backend == "triton" and INTERPRETED and heavy and dtype == torch.float16:
        pytest.skip("Triton interpreter time: covered by the fp32 variant (and on a GPU)")


# ------------------------------------------------------------------------------------------
# Independent loop implementations (docs/operators.md §2.5 read literally)
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
