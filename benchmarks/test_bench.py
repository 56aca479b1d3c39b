"""The benchmark cases exposed to pytest-benchmark, for its save/compare regression tools:

    pytest benchmarks --benchmark-only --benchmark-autosave         # record
    pytest benchmarks --benchmark-only --benchmark-compare          # compare with the last record

Shapes: the quick ones by default (their test ids start with `quick-`, so `-k quick` selects
them); SEGOPS_BENCH_FULL=1 uses the docs/operators.md §4 shapes of the device.
"""
import os

import pytest
import torch

from benchmarks import cases as cases_mod
from benchmarks.measure import make_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
QUICK = os.environ.get("SEGOPS_BENCH_FULL", "0") != "1"


def _params():
    params = []
    for op in cases_mod.available_ops():
        for i, case in enumerate(cases_mod.load(op).cases(DEVICE, DTYPE, QUICK)):
            for provider in case.providers:
                for mode in ("fwd", "fwd+bwd"):
                    params.append(pytest.param(op, i, provider, mode,
                                               id=f"{'quick-' if QUICK else ''}{case.op}-{case.label}-"
                                                  f"{provider}-{mode}".replace(" ", "_")))
    return params


@pytest.mark.parametrize("op,index,provider,mode", _params())
def test_benchmark(benchmark, op, index, provider, mode):
    case = cases_mod.load(op).cases(DEVICE, DTYPE, QUICK)[index]
    kwargs = case.make(DEVICE, DTYPE)
    for name in case.grad:
        kwargs[name].requires_grad_(True)
    step = make_step(case.providers[provider], kwargs, case.grad, mode)
    step()  # compile / warm up outside the measurement
    if DEVICE == "cuda":
        def run():
            step()
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(step)
    benchmark.extra_info.update(case=case.label, provider=provider, mode=mode, dtype=str(DTYPE))
