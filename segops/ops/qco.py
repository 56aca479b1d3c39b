"""`segops.qco_1d`, `segops.texture_reconstruct`, `segops.qco_2d` — schema, fakes, autograd,
validation and dispatch (SPEC §2.5, STLNet's quantisation and counting operators).

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

import torch
from torch import Tensor

from segops._backend import FusedBackend, op_backends
from segops.ops import _validate as V
from segops.reference import qco as _ref

FUSED_DTYPES_TRITON = (torch.float16, torch.bfloat16, torch.float32)

# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------
QCO_1D, QCO_2D, RECON = "qco_1d", "qco_2d", "texture_reconstruct"
BACKENDS_1D = op_backends(QCO_1D)
BACKENDS_2D = op_backends(QCO_2D)
BACKENDS_RECON = op_backends(RECON)


# The segops._C kernels; the dispatcher picks the CPU or CUDA implementation by device.
def _compiled_qco_forward(x, num_levels, grid, cooc):
    return torch.ops.segops_C.qco_forward(x, num_levels, grid, cooc)


def _compiled_qco_backward(grad_hist, grad_levels, grad_sim, x, hist, sim, rnorm, mean, stats,
                      num_levels, grid, cooc):
    return torch.ops.segops_C.qco_backward(grad_hist, grad_levels, grad_sim, x, hist, sim, rnorm,
                                           mean, stats, num_levels, grid, cooc)


def _compiled_recon_forward(sim, levels, features):
    return torch.ops.segops_C.texture_reconstruct_forward(sim, levels, features)


def _compiled_recon_backward(grad_out, sim, levels, features):
    return torch.ops.segops_C.texture_reconstruct_backward(grad_out, sim, levels, features)


_QCO_KERNELS = ("qco_forward", "qco_backward")
for _b in (BACKENDS_1D, BACKENDS_2D):
    _b.register(FusedBackend("cpu", _compiled_qco_forward, _compiled_qco_backward, kernels=_QCO_KERNELS))
    _b.register(FusedBackend("cuda", _compiled_qco_forward, _compiled_qco_backward,
                             dtypes=V.CUDA_DTYPES, kernels=_QCO_KERNELS))
    _b.register(FusedBackend("triton", "segops.triton.qco:qco_forward",
                             "segops.triton.qco:qco_backward", dtypes=FUSED_DTYPES_TRITON))
BACKENDS_RECON.register(FusedBackend(
    "cpu", _compiled_recon_forward, _compiled_recon_backward,
    kernels=("texture_reconstruct_forward", "texture_reconstruct_backward")))
BACKENDS_RECON.register(FusedBackend(
    "cuda", _compiled_recon_forward, _compiled_recon_backward, dtypes=V.CUDA_DTYPES,
    kernels=("texture_reconstruct_forward", "texture_reconstruct_backward")))
BACKENDS_RECON.register(FusedBackend(
    "triton", "segops.triton.qco:texture_reconstruct_forward",
    "segops.triton.qco:texture_reconstruct_backward", dtypes=FUSED_DTYPES_TRITON))


def _qco_fake(x: Tensor, num_levels: int, grid: int, cooc: bool):
    n, c, h, w = x.shape
    acc = V.accumulation_dtype(x.dtype)
    k, r = num_levels, grid * grid
    hist_shape = (n, grid, grid, k, k) if cooc else (n, k)
    lev_shape = (n, grid, grid, k) if cooc else (n, k)
    return (x.new_empty(hist_shape, dtype=acc), x.new_empty(lev_shape, dtype=acc),
            x.new_empty((n, h, w), dtype=acc), x.new_empty((n, h, w), dtype=acc),
            x.new_empty((n, r, c), dtype=acc), x.new_empty((n, r, 3), dtype=acc))


# --------------------------------------------------------------------------------------------
# qco_1d
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("segops::qco_1d", mutates_args=())
def _qco_1d_op(x: Tensor, num_levels: int, backend: str
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return BACKENDS_1D.fused[backend].fn("forward")(x, num_levels, 1, False)


@_qco_1d_op.register_fake
def _(x, num_levels, backend):
    return _qco_fake(x, num_levels, 1, False)


@torch.library.custom_op("segops::qco_1d_backward", mutates_args=())
def _qco_1d_backward_op(grad_counts: Tensor, grad_levels: Tensor, grad_sim: Tensor, x: Tensor,
                        counts: Tensor, sim: Tensor, rnorm: Tensor, mean: Tensor, stats: Tensor,
                        num_levels: int, backend: str) -> Tensor:
    return BACKENDS_1D.fused[backend].fn("backward")(
        grad_counts, grad_levels, grad_sim, x, counts, sim, rnorm, mean, stats, num_levels, 1, False)


@_qco_1d_backward_op.register_fake
def _(grad_counts, grad_levels, grad_sim, x, counts, sim, rnorm, mean, stats, num_levels, backend):
    return torch.empty_like(x)


def _qco_1d_setup(ctx, inputs, output):
    x, num_levels, backend = inputs
    counts, _, sim, rnorm, mean, stats = output
    ctx.save_for_backward(x, counts, sim, rnorm, mean, stats)
    ctx.num_levels, ctx.backend = num_levels, backend


def _qco_1d_backward(ctx, g_counts, g_levels, g_sim, _g_rnorm, _g_mean, _g_stats):
    x, counts, sim, rnorm, mean, stats = ctx.saved_tensors
    gx = _qco_1d_backward_op(g_counts.contiguous(), g_levels.contiguous(), g_sim.contiguous(), x,
                             counts, sim, rnorm, mean, stats, ctx.num_levels, ctx.backend)
    return gx, None, None


_qco_1d_op.register_autograd(_qco_1d_backward, setup_context=_qco_1d_setup)


# --------------------------------------------------------------------------------------------
# qco_2d
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("segops::qco_2d", mutates_args=())
def _qco_2d_op(x: Tensor, num_levels: int, grid: int, backend: str
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return BACKENDS_2D.fused[backend].fn("forward")(x, num_levels, grid, True)


@_qco_2d_op.register_fake
def _(x, num_levels, grid, backend):
    return _qco_fake(x, num_levels, grid, True)


@torch.library.custom_op("segops::qco_2d_backward", mutates_args=())
def _qco_2d_backward_op(grad_cooc: Tensor, grad_levels: Tensor, x: Tensor, cooc: Tensor,
                        sim: Tensor, rnorm: Tensor, mean: Tensor, stats: Tensor, num_levels: int,
                        grid: int, backend: str) -> Tensor:
    return BACKENDS_2D.fused[backend].fn("backward")(
        grad_cooc, grad_levels, None, x, cooc, sim, rnorm, mean, stats, num_levels, grid, True)


@_qco_2d_backward_op.register_fake
def _(grad_cooc, grad_levels, x, cooc, sim, rnorm, mean, stats, num_levels, grid, backend):
    return torch.empty_like(x)


def _qco_2d_setup(ctx, inputs, output):
    x, num_levels, grid, backend = inputs
    cooc, _, sim, rnorm, mean, stats = output
    ctx.save_for_backward(x, cooc, sim, rnorm, mean, stats)
    ctx.num_levels, ctx.grid, ctx.backend = num_levels, grid, backend


def _qco_2d_backward(ctx, g_cooc, g_levels, _g_sim, _g_rnorm, _g_mean, _g_stats):
    x, cooc, sim, rnorm, mean, stats = ctx.saved_tensors
    gx = _qco_2d_backward_op(g_cooc.contiguous(), g_levels.contiguous(), x, cooc, sim, rnorm, mean,
                             stats, ctx.num_levels, ctx.grid, ctx.backend)
    return gx, None, None, None


_qco_2d_op.register_autograd(_qco_2d_backward, setup_context=_qco_2d_setup)


# --------------------------------------------------------------------------------------------
# texture_reconstruct
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("segops::texture_reconstruct", mutates_args=())
def _recon_op(sim: Tensor, levels: Tensor, features: Tensor, backend: str) -> Tensor:
    return BACKENDS_RECON.fused[backend].fn("forward")(sim, levels, features)


@_recon_op.register_fake
def _(sim, levels, features, backend):
    n, h, w = sim.shape
    return features.new_empty((n, features.shape[1], h, w))


@torch.library.custom_op("segops::texture_reconstruct_backward", mutates_args=())
def _recon_backward_op(grad_out: Tensor, sim: Tensor, levels: Tensor, features: Tensor,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return BACKENDS_RECON.fused[backend].fn("backward")(grad_out, sim, levels, features)


@_recon_backward_op.register_fake
def _(grad_out, sim, levels, features, backend):
    return torch.empty_like(sim), torch.empty_like(levels), torch.empty_like(features)


def _recon_setup(ctx, inputs, output):
    sim, levels, features, backend = inputs
    ctx.save_for_backward(sim, levels, features)
    ctx.backend = backend


def _recon_backward(ctx, grad_out):
    sim, levels, features = ctx.saved_tensors
    gs, gl, gf = _recon_backward_op(grad_out.contiguous(), sim, levels, features, ctx.backend)
    return gs, gl, gf, None


_recon_op.register_autograd(_recon_backward, setup_context=_recon_setup)


# --------------------------------------------------------------------------------------------
# Validation and public functions
# --------------------------------------------------------------------------------------------
def _zeros_like_graph(shape, *inputs: Tensor) -> Tensor:
    """Zeros of `shape` connected to `inputs` in the autograd graph (zero gradients)."""
    t = inputs[0]
    out = t.new_zeros(shape)
    for i in inputs:
        if i.requires_grad:
            out = out + 0 * i.sum()
    return out


def _check_int(op: str, name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"segops.{op}: `{name}` must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"segops.{op}: `{name}` must be >= {minimum}, got {value}")


def qco_1d(x: Tensor, num_levels: int, *, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """1-D quantisation and counting (STLNet's QCO_1d).

    x: (N, C, H, W) -> (counts (N, K), levels (N, K), sim (N, H, W)), K = num_levels.
    sim is the cosine similarity of each pixel to the global mean, levels the K quantisation
    levels spanning [min sim, max sim], counts the normalised histogram of the soft encoding
    E = 1 − |L − sim| within one level spacing (each pixel hits at most 2 levels).
    """
    V.check_tensor(QCO_1D, "x", x, ndim=4)
    _check_int(QCO_1D, "num_levels", num_levels)
    name = BACKENDS_1D.select(backend, x.device, x.dtype)
    n, _, h, w = x.shape
    if h * w == 0 or n == 0:  # no pixels: an empty histogram
        return (_zeros_like_graph((n, num_levels), x), _zeros_like_graph((n, num_levels), x),
                _zeros_like_graph((n, h, w), x))
    if name == "reference" or V.is_empty(x):
        return _ref.qco_1d(x, num_levels)
    counts, levels, sim, *_ = _qco_1d_op(x.contiguous(), num_levels, name)
    return counts.to(x.dtype), levels.to(x.dtype), sim.to(x.dtype)


def qco_2d(x: Tensor, num_levels: int, grid: int, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """2-D quantisation and co-occurrence counting per region (STLNet's QCO_2d).

    x: (N, C, H, W) with H, W divisible by grid = s -> (cooc (N, s, s, K, K), levels (N, s, s, K)).
    Each (H/s)×(W/s) region is quantised against its own mean; cooc[a, b] counts the pairs
    (pixel at level a, its (+1, +1) neighbour inside the region at level b).
    """
    V.check_tensor(QCO_2D, "x", x, ndim=4)
    _check_int(QCO_2D, "num_levels", num_levels)
    _check_int(QCO_2D, "grid", grid)
    h, w = x.shape[2:]
    if h % grid or w % grid:
        raise ValueError(f"segops.qco_2d: the spatial size of `x` must be divisible by grid = {grid}, "
                         f"got H x W = {h} x {w} (shape {tuple(x.shape)})")
    name = BACKENDS_2D.select(backend, x.device, x.dtype)
    n = x.shape[0]
    if h * w == 0 or n == 0:
        return (_zeros_like_graph((n, grid, grid, num_levels, num_levels), x),
                _zeros_like_graph((n, grid, grid, num_levels), x))
    if name == "reference" or V.is_empty(x):
        return _ref.qco_2d(x, num_levels, grid)
    cooc, levels, *_ = _qco_2d_op(x.contiguous(), num_levels, grid, name)
    return cooc.to(x.dtype), levels.to(x.dtype)


def texture_reconstruct(sim: Tensor, levels: Tensor, features: Tensor, *,
                        backend: str = "auto") -> Tensor:
    """TEM's per-pixel reconstruction: out[:, :, i] = Σ_n E[i, n] · features[:, :, n].

    sim: (N, H, W), levels: (N, K) (normally qco_1d's outputs), features: (N, Cf, K)
    -> (N, Cf, H, W). E is qco_1d's encoding with Δ = (max sim − min sim)/K per sample.
    """
    V.check_tensor(RECON, "sim", sim, ndim=3)
    V.check_tensor(RECON, "levels", levels, ndim=2)
    V.check_tensor(RECON, "features", features, ndim=3)
    V.check_same_device_dtype(RECON, sim=sim, levels=levels, features=features)
    V.check_dim(RECON, "levels", levels, 0, sim.shape[0], "the batch size N of `sim`")
    V.check_dims(RECON, "features", features, (0, 2), (sim.shape[0], levels.shape[1]),
                 "(N, K) of `sim` and `levels`")
    name = BACKENDS_RECON.select(backend, sim.device, sim.dtype)
    if V.is_empty(sim, levels, features):
        return _zeros_like_graph((sim.shape[0], features.shape[1]) + tuple(sim.shape[1:]),
                                 features, sim, levels)
    if name == "reference":
        return _ref.texture_reconstruct(sim, levels, features)
    return _recon_op(sim.contiguous(), levels.contiguous(), features.contiguous(), name)
