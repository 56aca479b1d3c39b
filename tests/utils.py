"""Shared test utilities: backend cases, the tolerance rule, input factories, fp64 comparison.

Tolerance rule (flash-attention's): a backend's max error against the reference evaluated in
fp64 must be at most 2x the error of the reference itself run in the same dtype, plus a small
floor relative to the magnitude of the fp64 result (ABS_FLOOR below, the one table of it).
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import pytest
import torch

from segops._backend import REGISTRY

ABS_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def _required() -> set[str]:
    return {b.strip() for b in os.environ.get("SEGOPS_REQUIRE_BACKENDS", "").split(",") if b.strip()}


def backend_cases(include_reference: bool = False) -> list:
    """pytest params (backend, device, dtype) for every backend tier.

    cpu: fp64 and fp32 on CPU; triton: fp32 and fp16 on the Triton device (the GPU, else CPU under
    the interpreter), bf16 only on a GPU; cuda: fp32, fp16, bf16 on a GPU.
    """
    f64, f32, f16, bf16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
    cases = []
    if include_reference:
        cases += [pytest.param("reference", "cpu", f32)]
    cases += [pytest.param("cpu", "cpu", f64), pytest.param("cpu", "cpu", f32)]
    tri = [pytest.mark.triton]
    cases += [pytest.param("triton", TRITON_DEVICE, f32, marks=tri),
              pytest.param("triton", TRITON_DEVICE, f16, marks=tri)]
    cases += [pytest.param("triton", "cuda", bf16, marks=tri + [pytest.mark.cuda])]
    cuda = [pytest.mark.cuda]
    cases += [pytest.param("cuda", "cuda", d, marks=cuda) for d in (f32, f16, bf16)]
    return cases


def require_backend(op: str, backend: str, device: str, dtype: torch.dtype) -> None:
    """Skip (or fail, for backends listed in SEGOPS_REQUIRE_BACKENDS) when unavailable."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    reason = REGISTRY[op].status(torch.device(device), dtype)[backend]
    if reason is None:
        return
    if backend in _required() and not (device == "cuda" and not HAS_CUDA):
        pytest.fail(f"{op}: required backend {backend} unavailable: {reason}")
    pytest.skip(f"{op}: {backend} unavailable: {reason}")


def sample_params(ops=None, where=lambda sample: True) -> list:
    """pytest params (op, sample name) for the samples of every OpSpec (or of `ops`)."""
    from segops.ops._spec import SPECS
    return [pytest.param(op, s.name, id=f"{op}-{s.name}") for op in sorted(ops or SPECS)
            for s in SPECS[op].samples() if where(s)]


def find_sample(op: str, name: str):
    from segops.ops._spec import SPECS
    return next(s for s in SPECS[op].samples() if s.name == name)


def rounded_inputs(sample, dtype: torch.dtype) -> dict:
    """The sample's fp64 tensors, rounded to `dtype` and back when the sample asks for a
    comparison on the inputs the low-precision run actually sees (`exact_inputs`)."""
    if not sample.exact_inputs or dtype == torch.float64:
        return sample.tensors
    return {k: v.to(dtype).double() for k, v in sample.tensors.items()}


def qkv_inputs(n: int, ck: int, cv: int, h: int, w: int, scale: float = 1.0) -> dict:
    """fp64 query, key (N, Ck, H, W) scaled by `scale` and value (N, Cv, H, W)."""
    return dict(query=scale * torch.randn(n, ck, h, w, dtype=torch.float64),
                key=scale * torch.randn(n, ck, h, w, dtype=torch.float64),
                value=torch.randn(n, cv, h, w, dtype=torch.float64))


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous storage (every other element of the last dim)."""
    out = t.new_empty(*t.shape, 2)[..., 0]
    out.copy_(t)
    assert not out.is_contiguous() or t.numel() <= 1
    return out


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _error(got: torch.Tensor, ref64: torch.Tensor) -> float:
    if got.numel() == 0:
        return 0.0
    # got may live on the GPU while the fp64 reference is on the CPU.
    return (got.double().cpu() - ref64.double().cpu()).abs().max().item()


def tolerance(ref64: torch.Tensor, ref_same: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest error from the fp64 result the rule allows: 2x the reference's own error in
    `dtype` plus ABS_FLOOR[dtype] relative to the magnitude of the fp64 result."""
    scale = max(1.0, ref64.abs().max().item() if ref64.numel() else 1.0)
    return 2 * _error(ref_same, ref64) + ABS_FLOOR[dtype] * scale


def assert_close_to_reference(name: str, got: torch.Tensor, ref64: torch.Tensor,
                              ref_same: torch.Tensor, dtype: torch.dtype) -> None:
    """The flash-attention rule, with a message that says where the tensors differ."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values in the result"
    err = _error(got, ref64)
    ref_err = _error(ref_same, ref64)
    tol = tolerance(ref64, ref_same, dtype)
    if err > tol:
        diff = (got.double().cpu() - ref64.double().cpu()).abs()
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{name} ({dtype}): max error {err:.3e} > tolerance {tol:.3e} "
            f"(reference's own {dtype} error {ref_err:.3e}); worst at index {idx}: "
            f"got {got.double().cpu()[idx].item():.6g}, fp64 reference {ref64.double().cpu()[idx].item():.6g}")


def run_with_grads(fn: Callable, inputs: Mapping[str, torch.Tensor], grad_names: Sequence[str],
                   grad_out, kwargs=None):
    """Run fn(**inputs, **kwargs) and backprop `grad_out`; returns (outputs tuple, {name: grad})."""
    kwargs = kwargs or {}
    leaves = {}
    call = {}
    for k, v in inputs.items():
        if k in grad_names:
            v = v.detach().requires_grad_(True)
            leaves[k] = v
        call[k] = v
    out = fn(**call, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    gos = grad_out if isinstance(grad_out, (tuple, list)) else (grad_out,)
    pairs = [(o, g) for o, g in zip(outs, gos) if g is not None and o.requires_grad]
    if leaves and pairs:
        grads = torch.autograd.grad([o for o, _ in pairs], list(leaves.values()),
                                    [g for _, g in pairs], allow_unused=True)
        grads = {k: (g if g is not None else torch.zeros_like(leaves[k]))
                 for k, g in zip(leaves, grads)}
    else:
        grads = {}
    return tuple(o.detach() for o in outs), grads


def check_against_reference(fn: Callable, reference: Callable, inputs64: Mapping[str, torch.Tensor],
                            grad_names: Sequence[str], dtype: torch.dtype, device: str,
                            kwargs=None, make_input: Callable | None = None,
                            make_grad: Callable | None = None, grad_outs64=None) -> None:
    """Compare `fn` in (dtype, device) with `reference` in fp64 (CPU) on outputs and gradients.

    inputs64: fp64 CPU tensors (non-tensor kwargs go in `kwargs`). make_input/make_grad transform
    the low-precision tensors (e.g. `noncontiguous`) before they are fed to `fn`. grad_outs64 are
    the incoming gradients per output (random if None).
    """
    kwargs = kwargs or {}
    out64, grads64 = run_with_grads(reference, inputs64, grad_names, None, kwargs)
    if grad_outs64 is None:
        grad_outs64 = tuple(torch.randn_like(o) if o.is_floating_point() else None for o in out64)
    out64, grads64 = run_with_grads(reference, inputs64, grad_names, grad_outs64, kwargs)

    def cast(t):
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    low = {k: cast(v) for k, v in inputs64.items()}
    gos = tuple(None if g is None else cast(g) for g in grad_outs64)
    ref_out, ref_grads = run_with_grads(reference, low, grad_names, gos, kwargs)
    if make_input is not None:
        low = {k: make_input(v) for k, v in low.items()}
    if make_grad is not None:
        gos = tuple(None if g is None else make_grad(g) for g in gos)
    got_out, got_grads = run_with_grads(fn, low, grad_names, gos, kwargs)
    assert len(got_out) == len(out64), f"{len(got_out)} outputs, expected {len(out64)}"
    for i, (g, r64, rs) in enumerate(zip(got_out, out64, ref_out)):
        if r64.is_floating_point():
            assert g.dtype == dtype, f"output {i}: dtype {g.dtype}, expected {dtype}"
            assert_close_to_reference(f"output {i}", g, r64, rs, dtype)
    for k in grad_names:
        assert_close_to_reference(f"grad of {k}", got_grads[k], grads64[k], ref_grads[k], dtype)


def randomize_zero_parameters(model: torch.nn.Module, generator: torch.Generator,
                              std: float = 0.2) -> None:
    """Give every all-zero parameter random values: zero-initialised parts (attention gammas,
    output projections, residual BN) would otherwise hide the attention path."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(std * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def assert_fused_model_close(build: Callable, name: str, size=(64, 64), backend: str = "cpu",
                             **build_kw) -> None:
    """Model `name` built with `backend` (fused kernels, fp32) against the same weights run in
    fp64 on the reference backend, under the fp64 tolerance rule (the yardstick is the error of
    the reference backend itself in fp32). `build` is `segops.models.build`."""
    import copy

    import segops
    model = build(name, **build_kw).eval()
    g = torch.Generator().manual_seed(1)
    randomize_zero_parameters(model, g)
    fused = build(name, backend=backend, **build_kw).eval()
    fused.load_state_dict(model.state_dict())
    model64 = copy.deepcopy(model).double()
    x = torch.randn(1, 3, *size, dtype=torch.float64, generator=g)
    with torch.no_grad(), segops.use_backend("reference"):
        ref64 = model64(x)
        ref32 = model(x.float())
    with torch.no_grad():
        got = fused(x.float())
    assert_close_to_reference(name, got, ref64, ref32, torch.float32)


def zoo_models() -> list[str]:
    """The registered models, less those the tests register themselves (tests/train_toy.py)."""
    from segops.models import list_models, registry
    return [name for name in list_models()
            if not registry._MODELS[name][0].__module__.startswith("tests.")]
