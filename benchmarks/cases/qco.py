"""QCO benchmark cases (docs/operators.md §4): texture_reconstruct, qco_2d, qco_1d and the STL block.

GPU: 1-D N=2, C=128, 97x97, K=128 with reconstruction to 256 channels; 2-D N=2, C=128, 96x96,
K=8, grids 1, 2, 3, 6; STL N=2, 256 input channels, 97x97. CPU: same channels, half of each
side (49x49 and 48x48). Each row's `op` names the operator it measures.

Cost, with P = H·W positions per map. qco_1d and qco_2d: forward 5 FLOPs per input element (the
region mean 1, the dot product with it 2, the squared norm 2); the quantisation touches at most
two levels per position (two for qco_1d's count, 2x2 level pairs for qco_2d's co-occurrence),
O(N·P), not counted. Backward 10 per element: the normalisation again (3), the gradient through
the normalised input and the similarity (3), the reduction that gives the region mean's
gradient (2) and its broadcast back (2). texture_reconstruct: each position's encoding has at
most two non-zero levels, so the forward is 2 levels x 2 FLOPs per (position, output channel),
4·N·Cf·P, and the backward twice that (the features' gradient, and the per-level dot products
giving the gradients of sim and levels). The dense (N, P, K) encoding of the reference is extra
work the bound does not allow for. Bytes: forward reads the inputs and writes the results;
backward reads the results' gradients and the inputs and writes the inputs' gradients.
The STL block has no analytic cost: its FLOPs are counted on the reference provider.
"""
import torch

import segops
import segops.nn as snn
from benchmarks.common import (Case, Cost, fused_backends, io_bytes, mode_costs, sample_maker,
                               standard_providers)
from segops.ops._spec import Sample, randn
from segops.ops.qco import recon_inputs
from segops.reference import qco as R

# The CPU targets are the first two rows (texture_reconstruct K=128, qco_2d grid 1).
DEFAULT_CPU_CASES = 2


def _sizes(device, quick):
    if quick:
        return dict(n=1, c=16, hw1=(13, 11), hw2=(12, 12), k1=16, cf=32, k2=4, stl_in=32)
    if device == "cuda":
        return dict(n=2, c=128, hw1=(97, 97), hw2=(96, 96), k1=128, cf=256, k2=8, stl_in=256)
    return dict(n=2, c=128, hw1=(49, 49), hw2=(48, 48), k1=128, cf=256, k2=8, stl_in=256)


def _recon_cost(kw):
    n, cf, _ = kw["features"].shape
    work = float(kw["sim"].numel()) * cf
    fwd_bytes, bwd_bytes = io_bytes([kw["sim"], kw["levels"], kw["features"]],
                                    work * kw["features"].element_size())
    return mode_costs(Cost(4.0 * work, fwd_bytes), Cost(8.0 * work, bwd_bytes))


def _histogram_cost(result_elements):
    """Cost of qco_1d/qco_2d of x; result_elements(x) counts the elements of their results."""
    def cost(kw):
        x = kw["x"]
        fwd_bytes, bwd_bytes = io_bytes([x], result_elements(x) * x.element_size())
        return mode_costs(Cost(5.0 * x.numel(), fwd_bytes), Cost(10.0 * x.numel(), bwd_bytes))
    return cost


def _gen():
    return torch.Generator(device="cpu").manual_seed(0)


def cases(device: str, dtype: torch.dtype, quick: bool = False):
    z = _sizes(device, quick)
    n, c, k1, cf, k2 = z["n"], z["c"], z["k1"], z["cf"], z["k2"]
    (h1, w1), (h2, w2) = z["hw1"], z["hw2"]
    out = []

    # texture_reconstruct: sim and levels as qco_1d makes them, features (N, Cf, K)
    recon = Sample("bench", recon_inputs(n, c, h1, w1, cf, k1), grads=("sim", "levels", "features"))
    out.append(Case("texture_reconstruct", f"recon N{n} Cf{cf} {h1}x{w1} K{k1}", sample_maker(recon),
                    ("sim", "levels", "features"),
                    standard_providers("texture_reconstruct", R.texture_reconstruct,
                                       segops.texture_reconstruct, device, dtype),
                    cost=_recon_cost,
                    params=dict(N=n, Cf=cf, H=h1, W=w1, K=k1)))

    def make_x(hw):
        return sample_maker(Sample("bench", dict(x=randn(_gen(), n, c, *hw)), grads=("x",)))

    for grid in (1, 2, 3, 6):
        if quick and grid > 2:
            continue
        ref = (lambda s: (lambda x: R.qco_2d(x, k2, s)))(grid)
        pub = (lambda s: (lambda x, backend="auto": segops.qco_2d(x, k2, s, backend=backend)))(grid)
        out.append(Case("qco_2d", f"qco_2d N{n} C{c} {h2}x{w2} K{k2} grid{grid}", make_x((h2, w2)), ("x",),
                        standard_providers("qco_2d", ref, pub, device, dtype),
                        cost=_histogram_cost(lambda x, s=grid: x.shape[0] * s * s * (k2 * k2 + k2)),
                        params=dict(N=n, C=c, H=h2, W=w2, K=k2, grid=grid)))

    out.append(Case("qco_1d", f"qco_1d N{n} C{c} {h1}x{w1} K{k1}", make_x((h1, w1)), ("x",),
                    standard_providers("qco_1d", lambda x: R.qco_1d(x, k1),
                                       lambda x, backend="auto": segops.qco_1d(x, k1, backend=backend),
                                       device, dtype),
                    cost=_histogram_cost(lambda x: x.shape[0] * (2 * k1 + x[0, 0].numel())),
                    params=dict(N=n, C=c, H=h1, W=w1, K=k1)))

    # The STL block end to end (train mode: BN batch statistics), input 256 channels
    modules = {}

    def stl(backend):
        def run(x):
            if backend not in modules:
                torch.manual_seed(0)
                modules[backend] = snn.STL(z["stl_in"], backend=backend).to(x.device, x.dtype)
            return modules[backend](x)
        return run

    make_stl = sample_maker(Sample("bench", dict(x=randn(_gen(), n, z["stl_in"], h1, w1)),
                                   grads=("x",)))

    providers = {"reference": stl("reference")}
    ref_mod = stl("reference")
    compiled = {}

    def stl_compiled(x):
        if "fn" not in compiled:
            compiled["fn"] = torch.compile(ref_mod, dynamic=False)
        return compiled["fn"](x)
    if not quick:  # compiling the block takes minutes: too long for a smoke run
        providers["reference+compile"] = stl_compiled
    for name in fused_backends("qco_1d", device, dtype):
        providers[name] = stl(name)
    out.append(Case("stl", f"STL N{n} Cin{z['stl_in']} {h1}x{w1}", make_stl, ("x",), providers,
                    params=dict(N=n, Cin=z["stl_in"], H=h1, W=w1)))
    return out
