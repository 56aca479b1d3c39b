"""Timing, peak-memory and machine-bound measurement of one (case, provider, mode).

CPU time: torch.utils.benchmark (blocked_autorange) with all of torch's threads and glibc's
default allocator settings (what a user gets), median and p20/p80 of its blocks.
CPU memory, in a second process of its own started with MEMORY_ENV (glibc maps every block
above 64 KiB on its own and unmaps it on free, and trims the heap on every free): after a
warm-up call, the process's peak resident set during one call above its level before it (peak
reset through /proc/self/clear_refs). Those settings make large allocations slower, which is
why the timing process runs with the allocator's defaults. (Switching glibc with mallopt in the
timing process after timing is not enough: blocks freed while timing stay resident and are
reused, and the peak comes out low.)
GPU time: triton.testing.do_bench (median, p20, p80); GPU memory: CUDA peak-allocation counters.
Machine bounds: the best of several GEMMs and large copies on the device (see machine_bounds),
measured before the first worker and after the last, the better of the two kept.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Optional

import torch

# glibc settings of the memory-measuring process only: every block above 64 KiB is its own
# mapping, unmapped on free, and the heap is trimmed on every free, so the resident set follows
# what is allocated. They make allocation-heavy code slower, so no timing runs under them.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


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


def time_step(step: Callable, device: str, min_run_time: float) -> dict:
    """Warm up, then the time distribution of `step` (ms)."""
    step()  # warm-up: compilation, autotuning, allocator growth
    if device == "cuda":
        torch.cuda.synchronize()
        import triton.testing
        q50, q20, q80 = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8],
                                                 rep=max(25, int(min_run_time * 1000)))
        return dict(median_ms=q50, p20_ms=q20, p80_ms=q80)
    from torch.utils import benchmark
    # torch.utils.benchmark times with one thread unless told otherwise; time what a user gets.
    m = benchmark.Timer(stmt="step()", globals={"step": step},
                        num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time)
    times = sorted(m.times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return dict(median_ms=m.median * 1e3, p20_ms=q[1] * 1e3, p80_ms=q[7] * 1e3)


def time_paired(anchor_step: Callable, step: Callable, device: str, min_run_time: float) -> dict:
    """`step` against `anchor_step`, the two timed alternately in one process for twice
    `min_run_time` (at least 5 pairs), so that both see the same machine state: a clock that
    drifts between two separately timed rows does not move their ratio. Returns that ratio of
    the two median times and the number of pairs."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    anchor_step()  # warm-up
    step()
    sync()
    times: tuple[list, list] = ([], [])
    start = time.perf_counter()
    while len(times[0]) < 5 or (time.perf_counter() - start < 2 * min_run_time
                                and len(times[0]) < 10000):
        for fn, out in ((anchor_step, times[0]), (step, times[1])):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
    return dict(paired_ratio=statistics.median(times[1]) / statistics.median(times[0]),
                pairs=len(times[0]))


def peak_bytes(step: Callable, device: str) -> int:
    """Peak memory of one call of `step` above what is held before it (after a warm-up call).
    On CPU, only meaningful in a process started with MEMORY_ENV."""
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    base = _reset_cpu_peak()
    step()
    return max(0, _rss_kib("VmHWM") - base) * 1024


def counted_flops(step: Callable) -> float:
    """FLOPs of one call as torch.utils.flop_counter's formulas count them (matrix products and
    convolutions of aten ops, backward included; custom segops kernels count nothing). Its
    FlopCounterMode is not used: its module tracking breaks torch.autograd.grad on leaves."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    with Count() as counter:
        step()
    return float(counter.total)


def _best_rate(fn: Callable, work: float, device: str, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return work / best


def machine_bounds(device: str, dtype: torch.dtype, peak_flops: Optional[float] = None) -> dict:
    """This machine's dense GEMM throughput (FLOP/s; `peak_flops` instead when given, e.g. a GPU's
    data-sheet dense peak) and copy bandwidth (bytes/s, read + write) in `dtype`: the best of
    several square GEMMs and of several large copies, with all of torch's threads.

    On CPU the throughput is the better of torch.mm (the BLAS torch links, MKL in the wheels) and
    a 3x3 convolution (oneDNN): the wheels' MKL runs its AVX2 code on AMD CPUs, under half of an
    AVX-512 Zen 5's fp32 peak, which oneDNN's convolution reaches."""
    gemm_n = 4096 if device == "cuda" else 2048
    copy_bytes = 1 << (30 if device == "cuda" else 28)
    a = torch.randn(gemm_n, gemm_n, device=device).to(dtype)
    b = torch.randn(gemm_n, gemm_n, device=device).to(dtype)
    source = "data sheet" if peak_flops else "measured"
    if not peak_flops:
        peak_flops = _best_rate(lambda: torch.mm(a, b), 2.0 * gemm_n ** 3, device,
                                20 if device == "cuda" else 5)
    del a, b
    extra = {}
    if source == "measured" and device == "cpu":
        c, hw = 512, 48
        x = torch.randn(1, c, hw, hw).to(dtype)
        w = torch.randn(c, c, 3, 3).to(dtype)
        conv = _best_rate(lambda: torch.nn.functional.conv2d(x, w, padding=1),
                          2.0 * c * c * 9 * hw * hw, device, 5)
        extra = dict(gemm_flops_per_s=peak_flops, conv_flops_per_s=conv)
        peak_flops = max(peak_flops, conv)
        del x, w
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    bandwidth = _best_rate(lambda: dst.copy_(src), 2.0 * copy_bytes, device, 10)
    return dict(flops_per_s=peak_flops, bytes_per_s=bandwidth, flops_source=source,
                gemm_n=gemm_n, copy_bytes=copy_bytes, dtype=str(dtype).replace("torch.", ""),
                **extra)


def best_bounds(first: dict, second: dict) -> dict:
    """The higher throughput and bandwidth of two measurements (a shared machine only ever
    slows a measurement down)."""
    return dict(first, flops_per_s=max(first["flops_per_s"], second["flops_per_s"]),
                bytes_per_s=max(first["bytes_per_s"], second["bytes_per_s"]))


def roofline(flops: Optional[float], nbytes: Optional[float], bounds: dict) -> dict:
    """The time the faster of compute and memory allows for this work, and which bound it is."""
    compute = flops / bounds["flops_per_s"] if flops else 0.0
    memory = nbytes / bounds["bytes_per_s"] if nbytes else 0.0
    if not compute and not memory:
        return {}
    return dict(bound_ms=1e3 * max(compute, memory),
                bound="compute" if compute >= memory else "memory")
