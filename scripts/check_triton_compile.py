#!/usr/bin/env python
"""Compile tier for the Triton kernels: every configuration the launchers pick, compiled for real
GPUs (sm_80, sm_90) without a GPU and without launching anything.

How the configurations are found: every operator's Triton forward and backward launchers run on
meta tensors (shapes, no data) inside `compile_target(target)`, so they plan exactly as they
would on that GPU, while `JITFunction.run` (and `Autotuner.run`, all of whose configs count)
only records each launch: kernel, arguments, constexprs, num_warps, num_stages. A launch is then
specialised as Triton's own launcher would specialise it (its binder, for that target's backend;
meta tensors count as 16-byte aligned, as fresh CUDA allocations are) and compiled with
`triton.compile`; the bundled ptxas runs without a GPU. Nothing is cached across runs.

Shapes (--shapes): the canonical GPU shapes of the benchmark cases (benchmarks/cases/<op>.py with
device "cuda", docs/operators.md §4) and the operators' GPU-sized test samples
(`large_samples()`): "ci", the default; "all" adds every small test sample (`samples()`).

Checks per compiled kernel: no compile error, shared memory within the target's limit
(A100 164 KiB, H100/H200 227 KiB), spilled bytes (ptxas spill stores) within
SPILL_BUDGET_BYTES. Writes a markdown report; exit status 1 when a check fails.

  python scripts/check_triton_compile.py                      # sm_80 + sm_90, fp16/bf16/fp32
  python scripts/check_triton_compile.py --arch 90 --dtype fp16 --one-per-kernel
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import io
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

# Compiled kernels, not the interpreter; a fresh cache so every run compiles everything.
os.environ.pop("TRITON_INTERPRET", None)
_CACHE = tempfile.mkdtemp(prefix="segops-triton-compile-")
os.environ["TRITON_CACHE_DIR"] = _CACHE
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import segops  # noqa: E402,F401  (defines every OpSpec)
from segops.ops._spec import SPECS  # noqa: E402
from segops.triton._common import SM80, SM90, compile_target  # noqa: E402

# Spills are local-memory traffic inside the hot loops of these kernels (they are all
# loop-carried accumulators and tiles): every spilled byte is re-read per loop iteration, so the
# launchers choose tiles that fit in registers instead and the budget is zero.
SPILL_BUDGET_BYTES = 0
BUDGET_WHY = ("every kernel keeps its accumulators and tiles live across its main loop, so a "
              "spill is local-memory traffic on every iteration; the launchers pick tiles that "
              "fit in registers instead")
TARGETS = {80: SM80, 90: SM90}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Benchmark case modules holding the canonical GPU shapes of each operator.
BENCH_MODULES = ("criss_cross_attention", "interlaced_sparse_attention", "disentangled_non_local",
                 "semantic_difference_conv2d", "qco")
# Shape sets: "ci" the canonical GPU shapes and the GPU-sized test samples (large_samples(), what
# the cuda tier compares); "all" adds every small test sample (edge cases: their tiles are the
# 16-32 wide clamps of the same configurations, about four times as many compilations).
SHAPES = ("ci", "all", "gpu", "tests")
# qco benchmark cases keep num_levels and grid in their params, not in their tensors.
_CASE_ARGS = {"qco_1d": lambda p: dict(num_levels=p["K"]),
              "qco_2d": lambda p: dict(num_levels=p["K"], grid=p["grid"])}


# ---------------------------------------------------------------------------------- recording
@dataclass
class Job:
    """One kernel specialisation to compile for one architecture."""

    module: str
    kernel: str
    arch: int
    dtype: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    sources: list = field(default_factory=list)  # op/sample names that launch it

    @property
    def key(self):
        """A configuration: the kernel, the launcher's constexprs, num_warps, num_stages and the
        pointer dtypes. Triton's own specialisation of integer arguments (== 1, divisible by
        16) varies with the shape; one specialisation per configuration is compiled, a GPU
        shape's where there is one."""
        pointers = tuple(v for v in self.signature.values() if v.startswith("*"))
        return (self.module, self.kernel, self.arch, self.dtype, pointers,
                tuple(self.chosen()), self.options["num_warps"], self.options["num_stages"])

    @property
    def identity(self):
        """Everything triton.compile sees: jobs that agree here are one compilation (a second
        one would be a cache hit, with no ptxas report)."""
        return (self.module, self.kernel, self.arch, repr(self.signature),
                repr(sorted(self.constexprs.items())), repr(sorted(self.attrs.items())),
                repr(sorted(self.options.items())))

    def chosen(self) -> list:
        """(name, value) of the kernel's tl.constexpr parameters (what the launcher chooses)."""
        fn = _kernel(self.module, self.kernel)
        return [(p.name, self.constexprs[(p.num,)]) for p in fn.params if p.is_constexpr]

    @property
    def config(self) -> str:
        """The tiles and flags a launcher chooses, num_warps and num_stages."""
        picked = [f"{name}={value}" for name, value in self.chosen()
                  if name not in ("PREC", "DOT_PREC", "EPS")]
        launch = [f"w{self.options['num_warps']}", f"s{self.options['num_stages']}"]
        return " ".join(picked + launch)


def _kernel(module: str, name: str) -> JITFunction:
    return getattr(importlib.import_module(module), name)


@contextlib.contextmanager
def _recording(records: list):
    """JITFunction and Autotuner launches inside only append (kernel, args, kwargs) to records."""
    def run(self, *args, grid, warmup, **kwargs):
        records.append((self, args, kwargs))

    def autotuned(self, *args, **kwargs):
        for config in self.configs:
            records.append((self.fn, args, {**kwargs, **config.all_kwargs()}))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = run, autotuned
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def _specialise(fn: JITFunction, args, kwargs, arch: int, dtype: str, source: str) -> Job:
    """What JITFunction.run would compile for this launch on `arch`."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    return Job(fn.module, fn.fn.__name__, arch, dtype, signature, constexprs, attrs,
               dict(options.__dict__), [source])


def _meta(tensors: dict, dtype: torch.dtype) -> dict:
    return {k: (t.to("meta", dtype) if t.is_floating_point() else t.to("meta"))
            if isinstance(t, torch.Tensor) else t for k, t in tensors.items()}


def _run_fused(spec, call):
    """Run `call` (the public function) with spec's fused step replaced by the Triton forward
    and backward launchers on the same (meta) arguments."""
    forward = spec.backends.fused["triton"].forward
    backward = spec.backends.fused["triton"].backward
    n_inputs, n_params = len(spec.inputs), len(spec.params)

    def fused(backend, *args):
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        results = forward(*args)
        results = (results,) if isinstance(results, torch.Tensor) else tuple(results)
        values = dict(zip(spec.input_names, args[:n_inputs]))
        values.update(zip(spec.results, results))
        incoming = [torch.empty_like(values[n]) for n in spec.incoming if n is not None]
        backward(*incoming, *(values[s] for s in spec.saves), *args[n_inputs:n_inputs + n_params])
        return results[0] if spec.public == 1 else results[:spec.public]

    spec.select = lambda backend, like: "triton"
    spec.fused = fused
    try:
        call()
    finally:
        del spec.select, spec.fused


def _call(fn, kwargs):
    return lambda: fn(**kwargs)


def _calls(dtype: torch.dtype, shapes: str):
    """(op, source name, thunk calling the op's public function on meta tensors) for the shape
    set `shapes` (see SHAPES)."""
    if shapes != "gpu":
        for spec in SPECS.values():
            small = list(spec.samples()) if shapes in ("all", "tests") else []
            for sample in small + list(spec.large_samples()):
                kw = dict(_meta(sample.tensors, dtype), **sample.kwargs)
                yield spec.name, f"test:{sample.name}", _call(spec.function, kw)
    if shapes in ("all", "ci", "gpu"):
        for name in BENCH_MODULES:
            module = importlib.import_module(f"benchmarks.cases.{name}")
            with torch.device("meta"):
                cases = module.cases("cuda", dtype)
            for case in cases:
                if case.op not in SPECS:  # whole blocks (STL) run the ops measured on their own
                    continue
                with torch.device("meta"):
                    kw = case.make("meta", dtype)
                kw.update(_CASE_ARGS.get(case.op, lambda p: {})(case.params))
                yield case.op, f"gpu:{case.label}", _call(SPECS[case.op].function, kw)


def collect(archs, dtypes, shapes: str) -> list[Job]:
    """Every distinct kernel specialisation the launchers pick, per architecture and dtype."""
    jobs: dict = {}
    for arch in archs:
        for dname in dtypes:
            for op, source, call in _calls(DTYPES[dname], shapes):
                records: list = []
                with _recording(records), compile_target(TARGETS[arch]):
                    _run_fused(SPECS[op], call)
                for fn, args, kwargs in records:
                    job = _specialise(fn, args, kwargs, arch, dname, f"{op} {source}")
                    known = jobs.get(job.key)
                    if known is None:
                        jobs[job.key] = job
                    elif " gpu:" in job.sources[0] and " gpu:" not in known.sources[0]:
                        jobs[job.key] = job  # a canonical GPU shape's specialisation
                        job.sources += known.sources
                    else:
                        known.sources += job.sources
    return list(jobs.values())


# ---------------------------------------------------------------------------------- compiling
_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas)."""
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def compile_job(job: Job) -> dict:
    """Compile one job; registers and spills from ptxas -v, shared memory from the metadata."""
    fn = _kernel(job.module, job.kernel)
    start, cpu = time.perf_counter(), _cpu_seconds()
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs),
                                    target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as e:  # noqa: BLE001  (any compile failure is a result to report)
        return dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}",
                    seconds=time.perf_counter() - start, cpu=_cpu_seconds() - cpu)
    text = log.getvalue()
    regs = [int(r) for r in _PTXAS.findall(text)]
    spills = [int(stores) for stores, _ in _SPILL.findall(text)]
    return dict(regs=max(regs) if regs else None, spill=max(spills) if spills else 0,
                shared=int(kernel.metadata.shared), seconds=time.perf_counter() - start,
                cpu=_cpu_seconds() - cpu)


def check(job: Job, result: dict) -> list[str]:
    """The reasons this compiled kernel fails the tier (empty: it passes)."""
    if "error" in result:
        return [result["error"]]
    if result["regs"] is None:
        return ["no ptxas report"]
    out = []
    limit = TARGETS[job.arch].smem_bytes
    if result["shared"] > limit:
        out.append(f"shared memory {result['shared']} B > {limit} B")
    if result["spill"] > SPILL_BUDGET_BYTES:
        out.append(f"{result['spill']} B spilled > budget {SPILL_BUDGET_BYTES} B")
    return out


# ---------------------------------------------------------------------------------- report
def _kib(b: int) -> str:
    return f"{b / 1024:.1f}"


def report(jobs: list[Job], results: list[dict], seconds: float) -> str:
    archs = sorted({j.arch for j in jobs})
    rows = collections.defaultdict(dict)
    sources = collections.defaultdict(set)
    for job, res in zip(jobs, results):
        key = (job.module.rsplit(".", 1)[-1], job.kernel, job.config, job.dtype)
        rows[key][job.arch] = (job, res)
        sources[key].update(s.split(" ")[0] + (" (GPU shape)" if " gpu:" in s else "")
                            for s in job.sources)
    failed = sum(bool(check(j, r)) for j, r in zip(jobs, results))
    distinct = {j.identity: r for j, r in zip(jobs, results)}
    cpu = sum(r["cpu"] for r in distinct.values())
    lines = [f"# Triton compile tier: {', '.join(f'sm_{a}' for a in archs)}",
             "",
             f"`python scripts/check_triton_compile.py` — triton {triton.__version__}, torch "
             f"{torch.__version__}; {len(jobs)} kernel configurations x architectures x dtypes "
             f"({len(rows)} rows; {len(distinct)} distinct compilations), {failed} failing; "
             f"{seconds:.0f} s wall, {cpu:.0f} s CPU in the compiler processes.",
             "",
             f"Checks: compiles; shared memory within the device limit (sm_80: A100 "
             f"{SM80.smem_bytes // 1024} KiB, sm_90: H100/H200 {SM90.smem_bytes // 1024} KiB); "
             f"spilled bytes (ptxas spill stores) <= {SPILL_BUDGET_BYTES}: {BUDGET_WHY}.",
             "Config: the constexprs the launcher picks, `w` num_warps, `s` num_stages. Cells: "
             "registers / spilled bytes / shared KiB.",
             "",
             "| module | kernel | config | dtype | " + " | ".join(f"sm_{a}" for a in archs)
             + " | ok | picked for |",
             "|---|---|---|---|" + "---|" * len(archs) + "---|---|"]
    for key in sorted(rows):
        cells, ok = [], True
        for a in archs:
            if a not in rows[key]:
                cells.append("–")
                continue
            job, res = rows[key][a]
            bad = check(job, res)
            ok &= not bad
            cells.append(res.get("error", "")[:80] if "error" in res else
                         f"{res['regs']} / {res['spill']} / {_kib(res['shared'])}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells)
                     + f" | {'yes' if ok else '**no**'} | {', '.join(sorted(sources[key]))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(TARGETS))
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--shapes", default="ci", choices=SHAPES)
    ap.add_argument("--kernel", default=None, help="only kernels whose module:name contains this")
    ap.add_argument("--one-per-kernel", action="store_true",
                    help="only the first configuration of each kernel (a quick smoke check)")
    ap.add_argument("--jobs", type=int, default=2, help="compiler processes")
    ap.add_argument("--report", default=None, help="write the markdown report here")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        jobs = collect(args.arch, args.dtype, args.shapes)
        if args.kernel:
            jobs = [j for j in jobs if args.kernel in f"{j.module}:{j.kernel}"]
        if args.one_per_kernel:
            first = {}
            for j in jobs:
                first.setdefault((j.module, j.kernel, j.arch, j.dtype), j)
            jobs = list(first.values())
        print(f"{len(jobs)} kernel configurations", flush=True)
        unique = {job.identity: job for job in reversed(jobs)}
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("fork")) as pool:
            compiled = dict(zip(unique, pool.map(compile_job, unique.values())))
        results = [compiled[job.identity] for job in jobs]
    finally:
        shutil.rmtree(_CACHE, ignore_errors=True)
    text = report(jobs, results, time.perf_counter() - start)
    print(text)
    if args.report:
        Path(args.report).write_text(text)
    failures = [(j, check(j, r)) for j, r in zip(jobs, results) if check(j, r)]
    for job, why in failures:
        print(f"FAIL sm_{job.arch} {job.dtype} {job.kernel} [{job.config}]: {'; '.join(why)}",
              file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
