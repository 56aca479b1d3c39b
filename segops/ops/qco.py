"""`segops.qco_1d`, `segops.texture_reconstruct`, `segops.qco_2d` (docs/operators.md §2.5,
STLNet's quantisation and counting operators): descriptions, validation, public functions.

The fused backends never build the dense encodings. Their forwards return, besides the public
outputs (in the accumulation dtype: fp64 for fp64 inputs, else fp32; the public function casts
them to the input dtype), what the backward needs, all small:

- `sim`   (N, H, W)   cosine similarity in the accumulation dtype (its band decisions are the
                      forward's, also for fp16/bf16 inputs);
- `rnorm` (N, H, W)   1 / max(|x_i|, 1e-12), stored negated where the clamp was active;
- `mean`  (N, R, C)   each region's mean of x (R = grid², 1 for qco_1d);
- `stats` (N, R, 3)   each region's lo = min sim, hi = max sim, and the histogram total Σ E.

texture_reconstruct saves nothing beyond its inputs.

The fused backends find the levels a pixel hits from its position u = (sim − L_0)/Δ (they test
the three candidates round(u) − 1, round(u), round(u) + 1 with the exact band rule), so they
assume levels spaced by Δ as qco_1d produces them; texture_reconstruct with other levels is
defined by the reference backend only.
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

from segops.ops import _spec
from segops.ops import _validate as V
from segops.ops._spec import ErrorSample, OpSpec, Sample
from segops.reference import qco as _ref

_QCO_RESULTS = ("hist", "levels", "sim", "rnorm", "mean", "stats")
_QCO_TRITON = ("segops.triton.qco:qco_forward", "segops.triton.qco:qco_backward")


def _qco_fake(x: Tensor, num_levels: int, grid: int, cooc: bool):
    n, c, h, w = x.shape
    acc = V.accumulation_dtype(x.dtype)
    k, r = num_levels, grid * grid
    hist_shape = (n, grid, grid, k, k) if cooc else (n, k)
    lev_shape = (n, grid, grid, k) if cooc else (n, k)
    return (x.new_empty(hist_shape, dtype=acc), x.new_empty(lev_shape, dtype=acc),
            x.new_empty((n, h, w), dtype=acc), x.new_empty((n, h, w), dtype=acc),
            x.new_empty((n, r, c), dtype=acc), x.new_empty((n, r, 3), dtype=acc))


# ---- sample inputs ---------------------------------------------------------------------------
def _region_sims(x: Tensor, grid: int) -> Tensor:
    n, _, hh, ww = x.shape
    h, w = hh // grid, ww // grid
    out = [_ref.qco_1d(x[:, :, ry * h:(ry + 1) * h, rx * w:(rx + 1) * w], 1)[2].reshape(n, -1)
           for ry, rx in itertools.product(range(grid), range(grid))]
    return torch.cat(out, 0)  # (N * R, h * w)


def _away_from_band_edges(sims: Tensor, k: int, tol: float = 1e-4) -> bool:
    lo, hi = sims.amin(-1, keepdim=True), sims.amax(-1, keepdim=True)
    levels = _ref.quantisation_levels(lo, hi, k)
    delta = ((hi - lo) / k).unsqueeze(-1)
    edge = ((levels.unsqueeze(1) - sims.unsqueeze(-1)).abs() - delta).abs().min()
    srt = sims.sort(-1).values
    gaps = (torch.cat([srt[:, 1:2] - srt[:, :1], srt[:, -1:] - srt[:, -2:-1]], 1)
            if sims.shape[1] > 1 else None)
    return edge.item() > tol and (gaps is None or gaps.min().item() > tol)


def smooth_input(shape, k: int, grid: int = 1, seed: int = 0) -> Tensor:
    """An fp64 input whose similarities keep away from every band edge (and whose extremes are
    unique), so finite differences and low-precision runs do not cross a band: for gradcheck."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        if _away_from_band_edges(_region_sims(x, grid), k):
            return x
    raise RuntimeError("no input away from the band edges found")


def recon_inputs(n: int, c: int, h: int, w: int, cf: int, k: int, seed: int = 0) -> dict:
    """(sim, levels) as qco_1d makes them from a random (n, c, h, w) input, and features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    _, levels, sim = _ref.qco_1d(x, k)
    return dict(sim=sim, levels=levels,
                features=torch.randn(n, cf, k, generator=g, dtype=torch.float64))


def _tie_input(shape) -> Tensor:
    """Several pixels share the minimum and several the maximum similarity exactly."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x[:, :, 0, 0] = x[:, :, 1, 2] = x[:, :, 2, 1] = -3.0  # anti-parallel to the mean: the minimum
    x[:, :, 0, 1] = x[:, :, 2, 2] = 1.0                    # along the ones direction: near the max
    x[:, :, -1, -1] = x[:, :, 0, 1] * 2                    # same direction: same similarity
    x[:, :, :, 3:] += 0.5                                  # keeps the mean away from zero
    return x


def _x_samples(cases, params):
    """Samples of an op of x alone; a "smooth" case keeps away from the band edges (gradcheck)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for name, shape, *values in cases:
        x = shape if isinstance(shape, Tensor) else _spec.randn(g, *shape)
        out.append(Sample(name, dict(x=x), dict(zip(params, values)), grads=("x",),
                          exact_inputs=True, gradcheck=name.startswith("smooth")))
    return out


def _qco_1d_samples():
    return _x_samples([("batch2", (2, 3, 5, 7), 8), ("smooth", smooth_input((2, 3, 4, 5), 4), 4),
                       ("one_row", (1, 4, 1, 6), 8),
                       ("one_level", (2, 5, 3, 3), 1), ("k128", (2, 16, 9, 11), 128),
                       ("one_column_k128", (1, 3, 7, 1), 128), ("one_pixel", (1, 3, 1, 1), 4),
                       ("ties", _tie_input((2, 4, 5, 6)), 8), ("constant", torch.full((2, 3, 6, 6), 0.7,
                                                                             dtype=torch.float64), 8),
                       ("no_channels", (2, 0, 3, 4), 8), ("empty_batch", (0, 3, 4, 4), 8)],
                      ("num_levels",))


def _qco_2d_samples():
    return _x_samples([("grid1", (2, 3, 6, 6), 8, 1), ("grid2", (1, 4, 6, 10), 8, 2),
                       ("smooth_grid2", smooth_input((1, 3, 4, 6), 3, grid=2, seed=1), 3, 2),
                       ("grid3", (1, 3, 9, 6), 8, 3), ("grid6", (1, 3, 12, 6), 8, 6),
                       ("one_level", (1, 2, 6, 6), 1, 2), ("odd_grid1", (1, 3, 5, 7), 4, 1),
                       ("k128", (1, 3, 8, 6), 128, 2), ("ties", _tie_input((2, 4, 4, 6)), 8, 1),
                       ("constant", torch.full((2, 3, 6, 6), 0.7, dtype=torch.float64), 4, 3),
                       ("empty_batch", (0, 3, 4, 4), 4, 2)], ("num_levels", "grid"))


def _recon_samples():
    out = []
    for name, (n, c, h, w, cf, k) in [("batch2", (2, 3, 5, 7, 4, 8)), ("one_level", (1, 3, 1, 6, 3, 1)),
                                      ("k128", (2, 8, 9, 11, 20, 128)),
                                      ("one_column_k128", (1, 2, 7, 1, 17, 128)),
                                      ("no_features", (2, 3, 4, 4, 0, 8)),
                                      ("empty_batch", (0, 3, 4, 4, 5, 8))]:
        x = recon_inputs(n, c, h, w, cf, k, seed=4) if n else dict(
            sim=torch.randn(0, h, w, dtype=torch.float64), levels=torch.randn(0, k, dtype=torch.float64),
            features=torch.randn(0, cf, k, dtype=torch.float64))
        out.append(Sample(name, x, grads=("sim", "levels", "features"), exact_inputs=True))
    _, levels, sim = _ref.qco_1d(smooth_input((2, 3, 4, 5), 5, seed=2), 5)
    features = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.append(Sample("smooth", dict(sim=sim, levels=levels, features=features),
                      grads=("sim", "levels", "features"), exact_inputs=True, gradcheck=True))
    return out


def _x_errors(op, extra=()):
    # Valid call: x (2, 3, 6, 6) (qco_2d: grid 1).
    return [ErrorSample("x_rank", dict(x=torch.randn(2, 3, 4)), "`x` must be 4-D"),
            ErrorSample("integer", dict(x=torch.ones(1, 2, 3, 3, dtype=torch.int64)), "floating"),
            ErrorSample("num_levels_zero", dict(num_levels=0), "num_levels"),
            ErrorSample("num_levels_float", dict(num_levels=8.0), "`num_levels` must be an int",
                        TypeError)] + list(extra)


def _recon_errors():
    # Valid call: sim (2, 5, 7), levels (2, 8), features (2, 4, 8).
    return [ErrorSample("features_levels", dict(features=torch.randn(2, 4, 7)), "`features` must have"),
            ErrorSample("levels_batch", dict(levels=torch.randn(3, 8)), "`levels` must have"),
            ErrorSample("mixed_dtype", dict(levels=torch.randn(2, 8, dtype=torch.float64)), "dtype"),
            ErrorSample("sim_rank", dict(sim=torch.randn(2, 5)), "`sim` must be 3-D")]


QCO_1D = _spec.define(OpSpec(
    name="qco_1d", public=3, inputs=("x",), params=(("num_levels", int),),
    results=("counts",) + _QCO_RESULTS[1:], saves=("x", "counts", "sim", "rnorm", "mean", "stats"),
    differentiable=("x",), fake=lambda x, k: _qco_fake(x, k, 1, False),
    kernels=("qco_forward", "qco_backward"), kernel_args=(1, False), triton=_QCO_TRITON,
    samples=_qco_1d_samples, large_samples=lambda: _x_samples(
        [("large", smooth_input((2, 16, 24, 20), 32, seed=4), 32)], ("num_levels",)),
    error_samples=lambda: _x_errors("qco_1d"), reference=_ref.qco_1d))

QCO_2D = _spec.define(OpSpec(
    name="qco_2d", public=2, inputs=("x",), params=(("num_levels", int), ("grid", int)),
    results=("cooc",) + _QCO_RESULTS[1:], saves=("x", "cooc", "sim", "rnorm", "mean", "stats"),
    grad_of=("cooc", "levels", None),  # the kernels' similarity-gradient slot: qco_1d's only
    differentiable=("x",), fake=lambda x, k, grid: _qco_fake(x, k, grid, True),
    kernels=("qco_forward", "qco_backward"), kernel_args=(True,), triton=_QCO_TRITON,
    samples=_qco_2d_samples, reference=_ref.qco_2d, large_samples=lambda: _x_samples(
        [("large", smooth_input((2, 8, 24, 18), 8, grid=3, seed=5), 8, 3)], ("num_levels", "grid")),
    error_samples=lambda: _x_errors("qco_2d", [
        ErrorSample("grid_not_dividing", dict(grid=4), "divisible by grid"),
        ErrorSample("grid_zero", dict(grid=0), "grid")])))

TEXTURE_RECONSTRUCT = _spec.define(OpSpec(
    name="texture_reconstruct", public=1, inputs=("sim", "levels", "features"), params=(),
    results=("out",), saves=("sim", "levels", "features"),
    differentiable=("sim", "levels", "features"),
    fake=lambda sim, levels, features: features.new_empty(
        (sim.shape[0], features.shape[1]) + tuple(sim.shape[1:])),
    triton=("segops.triton.qco:texture_reconstruct_forward",
            "segops.triton.qco:texture_reconstruct_backward"),
    samples=_recon_samples, error_samples=_recon_errors, reference=_ref.texture_reconstruct,
    large_samples=lambda: [Sample("large", recon_inputs(2, 16, 29, 31, 64, 128, seed=3),
                                  grads=("sim", "levels", "features"), exact_inputs=True)]))


def _zeros_like_graph(shape, *inputs: Tensor) -> Tensor:
    """Zeros of `shape` connected to `inputs` in the autograd graph (zero gradients)."""
    t = inputs[0]
    out = t.new_zeros(shape)
    for i in inputs:
        if i.requires_grad:
            out = out + 0 * i.sum()
    return out


def qco_1d(x: Tensor, num_levels: int, *, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """1-D quantisation and counting (STLNet's QCO_1d).

    x: (N, C, H, W) -> (counts (N, K), levels (N, K), sim (N, H, W)), K = num_levels.
    sim is the cosine similarity of each pixel to the global mean, levels the K quantisation
    levels spanning [min sim, max sim], counts the normalised histogram of the soft encoding
    E = 1 − |L − sim| within one level spacing (each pixel hits at most 2 levels).
    """
    V.check_tensor(QCO_1D.name, "x", x, ndim=4)
    V.check_int(QCO_1D.name, "num_levels", num_levels)
    name = QCO_1D.select(backend, x)
    n, _, h, w = x.shape
    if h * w == 0:  # no pixels: an empty histogram
        return (_zeros_like_graph((n, num_levels), x), _zeros_like_graph((n, num_levels), x),
                _zeros_like_graph((n, h, w), x))
    if name == "reference":
        return _ref.qco_1d(x, num_levels)
    return tuple(t.to(x.dtype) for t in QCO_1D.fused(name, x, num_levels))


def qco_2d(x: Tensor, num_levels: int, grid: int, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """2-D quantisation and co-occurrence counting per region (STLNet's QCO_2d).

    x: (N, C, H, W) with H, W divisible by grid = s -> (cooc (N, s, s, K, K), levels (N, s, s, K)).
    Each (H/s)×(W/s) region is quantised against its own mean; cooc[a, b] counts the pairs
    (pixel at level a, its (+1, +1) neighbour inside the region at level b).
    """
    V.check_tensor(QCO_2D.name, "x", x, ndim=4)
    V.check_int(QCO_2D.name, "num_levels", num_levels)
    V.check_int(QCO_2D.name, "grid", grid)
    h, w = x.shape[2:]
    if h % grid or w % grid:
        raise ValueError(f"segops.qco_2d: the spatial size of `x` must be divisible by grid = {grid}, "
                         f"got H x W = {h} x {w} (shape {tuple(x.shape)})")
    name = QCO_2D.select(backend, x)
    n = x.shape[0]
    if h * w == 0:  # no pixels: empty histograms
        return (_zeros_like_graph((n, grid, grid, num_levels, num_levels), x),
                _zeros_like_graph((n, grid, grid, num_levels), x))
    if name == "reference":
        return _ref.qco_2d(x, num_levels, grid)
    return tuple(t.to(x.dtype) for t in QCO_2D.fused(name, x, num_levels, grid))


def texture_reconstruct(sim: Tensor, levels: Tensor, features: Tensor, *,
                        backend: str = "auto") -> Tensor:
    """TEM's per-pixel reconstruction: out[:, :, i] = Σ_n E[i, n] · features[:, :, n].

    sim: (N, H, W), levels: (N, K) (normally qco_1d's outputs), features: (N, Cf, K)
    -> (N, Cf, H, W). E is qco_1d's encoding with Δ = (max sim − min sim)/K per sample.
    """
    op = TEXTURE_RECONSTRUCT.name
    V.check_tensor(op, "sim", sim, ndim=3)
    V.check_tensor(op, "levels", levels, ndim=2)
    V.check_tensor(op, "features", features, ndim=3)
    V.check_same_device_dtype(op, sim=sim, levels=levels, features=features)
    V.check_dim(op, "levels", levels, 0, sim.shape[0], "the batch size N of `sim`")
    V.check_dims(op, "features", features, (0, 2), (sim.shape[0], levels.shape[1]),
                 "(N, K) of `sim` and `levels`")
    name = TEXTURE_RECONSTRUCT.select(backend, sim)
    if sim.shape[1] * sim.shape[2] == 0:  # no pixels: no band, nothing to reconstruct
        return _zeros_like_graph((sim.shape[0], features.shape[1]) + tuple(sim.shape[1:]),
                                 features, sim, levels)
    if name == "reference":
        return _ref.texture_reconstruct(sim, levels, features)
    return TEXTURE_RECONSTRUCT.fused(name, sim, levels, features)


QCO_1D.function, QCO_2D.function, TEXTURE_RECONSTRUCT.function = qco_1d, qco_2d, texture_reconstruct
