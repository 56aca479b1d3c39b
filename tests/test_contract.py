"""The operator contract (docs/operators.md §1 and §3), run for every OpSpec on every backend.

Each op's description (segops/ops/<op>.py: SPEC) supplies its samples and bad inputs; this module
checks, for every backend available here: forward and every gradient against the reference in
fp64 under the tolerance rule (empty and one-pixel samples included, reaching the fused kernels),
non-contiguous and channels-last inputs and incoming gradients, the errors of bad inputs,
gradcheck, opcheck of both custom ops, and torch.compile(fullgraph=True) through the op.
Op-specific semantics (identities, loop forms, modules) stay in tests/test_<op>.py.
"""
from __future__ import annotations

import pytest
import torch

from segops.ops._spec import SPECS
from tests.utils import (backend_cases, channels_last, check_against_reference, find_sample,
                         noncontiguous, require_backend, rounded_inputs, sample_params)

SPEC_NAMES = sorted(SPECS)
FUSED_CASES = backend_cases()


def _call(spec, backend):
    return lambda **kw: spec.function(**kw, backend=backend)


class _CountingForward:
    """Counts calls of a fused backend's forward (the empty samples must reach the kernels)."""

    def __init__(self, monkeypatch, spec, backend):
        fused = spec.backends.fused[backend]
        self.calls = 0
        inner = fused.forward

        def forward(*args):
            self.calls += 1
            return inner(*args)
        monkeypatch.setattr(fused, "forward", forward)


@pytest.mark.parametrize("backend,device,dtype", FUSED_CASES)
@pytest.mark.parametrize("op,sample", sample_params())
def test_matches_fp64_reference(monkeypatch, op, sample, backend, device, dtype):
    spec = SPECS[op]
    require_backend(op, backend, device, dtype)
    s = find_sample(op, sample)
    counter = _CountingForward(monkeypatch, spec, backend)
    check_against_reference(_call(spec, backend), spec.reference, rounded_inputs(s, dtype),
                            s.grads, dtype, device, kwargs=s.kwargs)
    assert counter.calls >= 1, f"{op}: the {backend} kernels were not called for {sample}"


@pytest.mark.parametrize("backend,device,dtype", FUSED_CASES)
@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last"])
@pytest.mark.parametrize("op", SPEC_NAMES)
def test_strided_inputs_and_incoming_gradients(op, layout, backend, device, dtype):
    spec = SPECS[op]
    require_backend(op, backend, device, dtype)
    s = spec.samples()[0]
    make = noncontiguous if layout == "noncontiguous" else channels_last
    check_against_reference(_call(spec, backend), spec.reference, rounded_inputs(s, dtype),
                            s.grads, dtype, device, kwargs=s.kwargs, make_input=make,
                            make_grad=make)


def _error_params():
    return [pytest.param(n, e, id=f"{n}-{e.name}") for n in SPEC_NAMES
            for e in SPECS[n].error_samples()]


@pytest.mark.parametrize("op,error", _error_params())
def test_bad_input_raises_a_clear_error(op, error):
    spec = SPECS[op]
    s = spec.samples()[0]
    args = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in s.tensors.items()}
    args.update(s.kwargs)
    args.update(error.update)
    with pytest.raises(error.error, match=error.match):
        spec.function(**args)


@pytest.mark.parametrize("op", SPEC_NAMES)
def test_unknown_backend_name_raises(op):
    spec = SPECS[op]
    s = spec.samples()[0]
    with pytest.raises(ValueError, match="backend must be one of"):
        spec.function(**s.tensors, **s.kwargs, backend="fastest")


@pytest.mark.parametrize("op", SPEC_NAMES)
def test_samples_cover_the_edges(op):
    """Every description has a sample for each edge the contract names."""
    samples = SPECS[op].samples()
    assert any(s.gradcheck for s in samples), f"{op}: no sample marked for gradcheck"
    assert any(any(t.numel() == 0 for t in s.tensors.values()) for s in samples), \
        f"{op}: no sample with an empty input"
    assert len({s.name for s in samples}) == len(samples), f"{op}: duplicate sample names"
    assert SPECS[op].error_samples(), f"{op}: no bad-input samples"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("op", SPEC_NAMES)
def test_gradcheck(op, backend):
    spec = SPECS[op]
    require_backend(op, backend, "cpu", torch.float64)
    for s in (s for s in spec.samples() if s.gradcheck):
        names = list(s.grads)
        fixed = {k: v for k, v in s.tensors.items() if k not in names}

        def f(*tensors):
            return spec.function(**dict(zip(names, tensors)), **fixed, **s.kwargs, backend=backend)
        inputs = tuple(s.tensors[n].clone().requires_grad_() for n in names)
        # fast mode checks random projections of the Jacobian: the same formula errors show.
        assert torch.autograd.gradcheck(f, inputs, fast_mode=True), f"{op}/{s.name}"


def _captured_op_args(monkeypatch, spec, sample, dtype, backend="cpu"):
    """The arguments the public function hands the forward custom op for `sample`."""
    seen = []
    real = spec.forward_op

    def record(*args):
        seen.append(args)
        return real(*args)
    monkeypatch.setattr(spec, "forward_op", record)
    args = {k: v.to(dtype) for k, v in sample.tensors.items()}
    spec.function(**args, **sample.kwargs, backend=backend)
    monkeypatch.setattr(spec, "forward_op", real)
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("op", SPEC_NAMES)
def test_opcheck_forward_and_backward_ops(monkeypatch, op, dtype):
    spec = SPECS[op]
    require_backend(op, "cpu", "cpu", dtype)
    s = next(s for s in spec.samples() if s.gradcheck)
    args = _captured_op_args(monkeypatch, spec, s, dtype)
    grad_args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a
                      for a in args)
    torch.library.opcheck(spec.forward_op, grad_args)
    results = spec.forward_op(*args)
    results = (results,) if isinstance(results, torch.Tensor) else results
    values = dict(zip(spec.input_names, args[:len(spec.inputs)]))
    values.update(zip(spec.results, results))
    incoming = [torch.randn_like(values[n]) for n in spec.incoming if n is not None]
    params = args[len(spec.inputs):]
    torch.library.opcheck(spec.backward_op,
                          (*incoming, *(values[n] for n in spec.saves), *params))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("op", SPEC_NAMES)
def test_compiles_fullgraph(op, backend):
    spec = SPECS[op]
    require_backend(op, backend, "cpu", torch.float32)
    s = next(s for s in spec.samples() if s.gradcheck)
    names = list(s.grads)
    fixed = {k: v.float() for k, v in s.tensors.items() if k not in names}

    def f(*tensors):
        out = spec.function(**dict(zip(names, tensors)), **fixed, **s.kwargs, backend=backend)
        outs = out if isinstance(out, tuple) else (out,)
        return sum((o * o).sum() for o in outs)
    inputs = tuple(s.tensors[n].float().requires_grad_() for n in names)
    torch._dynamo.reset()  # `f` is one code object for every op: start each from a clean cache
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(*inputs)
    got_grads = torch.autograd.grad(got, inputs)
    want = f(*inputs)
    want_grads = torch.autograd.grad(want, inputs)
    # The same kernels run eagerly and compiled: only summation order may differ.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["criss_cross_attention", "semantic_difference_conv2d"])
def test_compiles_with_inductor(op):
    spec = SPECS[op]
    require_backend(op, "cpu", "cpu", torch.float32)
    s = spec.samples()[0]
    args = {k: v.float() for k, v in s.tensors.items()}
    torch._dynamo.reset()
    f = torch.compile(lambda **kw: 2 * spec.function(**kw, **s.kwargs, backend="cpu"),
                      fullgraph=True)
    want = 2 * spec.function(**args, **s.kwargs, backend="cpu")
    torch.testing.assert_close(f(**args), want, rtol=1e-5, atol=1e-5)
