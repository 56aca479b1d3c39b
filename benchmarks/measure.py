"""Timing and peak-memory measurement of one (case, provider, mode).

CPU time: torch.utils.benchmark (blocked_autorange) with all of torch's threads, median and
p20/p80 of its blocks.
CPU memory: the process's peak resident set above the resident set before the call, with the
peak reset through /proc/self/clear_refs and glibc told to unmap large blocks on free
(MALLOC_MMAP_THRESHOLD_, set by the runner), so freed memory returns to the OS and the peak
counts only what this call holds at once. Each (case, provider) runs in a fresh process.
GPU time: triton.testing.do_bench (median, p20, p80); GPU memory: CUDA peak-allocation counters.
"""
from __future__ import annotations

import gc
import statistics
from typing import Callable

import torch


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kib("VmRSS")


def first_floating(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]


def make_step(fn: Callable, kwargs: dict, grad_names, mode: str):
    """A zero-argument callable performing one `mode` step, and any state it needs set up."""
    leaves = [kwargs[n] for n in grad_names]
    if mode == "fwd":
        return lambda: fn(**kwargs)
    if mode == "fwd+bwd":
        grads_out = {}

        def step():
            outs = first_floating(fn(**kwargs))
            if "g" not in grads_out:
                grads_out["g"] = [torch.randn_like(o) for o in outs]
            torch.autograd.grad(outs, leaves, grads_out["g"], allow_unused=True)
        return step
    if mode == "bwd":
        outs = first_floating(fn(**kwargs))
        g = [torch.randn_like(o) for o in outs]
        return lambda: torch.autograd.grad(outs, leaves, g, retain_graph=True, allow_unused=True)
    raise ValueError(f"mode must be one of fwd, bwd, fwd+bwd, got {mode!r}")


def measure(step: Callable, device: str, min_run_time: float) -> dict:
    """Warm up, then measure peak memory of one call and the time distribution."""
    step()  # warm-up: compilation, autotuning, allocator growth
    if device == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        import triton.testing
        q50, q20, q80 = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8],
                                                 rep=max(25, int(min_run_time * 1000)))
        return dict(median_ms=q50, p20_ms=q20, p80_ms=q80, peak_bytes=int(peak))
    base = _reset_cpu_peak()
    step()
    peak = max(0, _rss_kib("VmHWM") - base) * 1024
    from torch.utils import benchmark
    # torch.utils.benchmark times with one thread unless told otherwise; time what a user gets.
    m = benchmark.Timer(stmt="step()", globals={"step": step},
                        num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time)
    times = sorted(m.times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return dict(median_ms=m.median * 1e3, p20_ms=q[1] * 1e3, p80_ms=q[7] * 1e3, peak_bytes=int(peak))
