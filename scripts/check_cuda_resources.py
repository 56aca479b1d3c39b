#!/usr/bin/env python
"""Compile check and resource budgets for the CUDA C++ kernels (csrc/cuda/*.cu): every kernel
instantiation compiled for sm_80 and sm_90 without a GPU, with its registers, spills and shared
memory checked against the devices' limits.

Each .cu is compiled once, for both architectures, with the nvcc flags of the real build
(setup.py's and torch's CUDAExtension defines) plus `-Xptxas -v`, whose report gives per kernel
and architecture: registers, spill stores / loads, stack frame, static shared memory. Kernels
whose launchers add dynamic shared memory get it from a probe: the .cu is compiled as part of a
small host program (the same translation unit, so still one compilation) whose main() prints the
launcher's byte counts (DYNAMIC_SMEM below); the program runs on the CPU, without a GPU.

Fails on: a compile error, static + dynamic shared memory over the device's limit per block
(A100 164 KiB, H100/H200 227 KiB), or spill stores above SPILL_BUDGET_BYTES (0), except the
kernels in SPILL_EXCEPTIONS, each with its measured bytes and why. Writes a markdown report.

  python scripts/check_cuda_resources.py --report build/cuda-resources.md
  python scripts/check_cuda_resources.py --files qco --arch 90
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "csrc" / "cuda"
# Shared memory a block may use (static + dynamic, opt-in), as in segops.triton._common.
SMEM_LIMIT = {80: 164 * 1024, 90: 227 * 1024}
DEVICE = {80: "A100", 90: "H100/H200"}
# setup.py's nvcc flags and the defines torch's CUDAExtension adds, so that registers and spills
# are those of the extension that is shipped.
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]

SPILL_BUDGET_BYTES = 0
BUDGET_WHY = ("a spill is local-memory traffic inside a kernel's main loop (accumulators and "
              "tiles are live across it)")
# (file stem, kernel name pattern (fnmatch, on the demangled name without namespaces and
# parameters), architecture or None for both) -> (largest spill stores in bytes allowed, why).
# Each was read in the SASS (nvdisasm 13): what spills is loop-invariant (indices, pointers,
# per-row constants) stored once before the main loop and reloaded at most once per outer
# iteration, where each iteration streams whole tiles through shared memory; ptxas chose that
# over a register count that would cost a resident block per SM (launch bounds could force the
# other way; which is faster needs a GPU to measure).
_INVARIANTS = "loop-invariant values stored once before the main loop, reloaded once per "
SPILL_EXCEPTIONS: dict[tuple[str, str, int | None], tuple[int, str]] = {
    ("criss_cross_attention", "cca_line_kernel<double, *>", None): (
        36, "fp64 only: mode 2 on sm_90, " + _INVARIANTS + "tile of the line; mode 1 on sm_80, "
            "one value stored and reloaded outside the loops"),
    ("disentangled_non_local", "attention_dq_kernel<__half, 8>", 90): (
        16, "two 64-bit values stored before the key loop and reloaded once after it, in the "
            "epilogue; at 128 registers (2 blocks per SM)"),
    ("interlaced_sparse_attention", "isa_backward_kernel<__half, *>", 90): (
        8, _INVARIANTS + "key block, at the 128-register cap of __launch_bounds__(256, 2)"),
    ("qco", "region_sum_kernel<float, float, 256>", 90): (
        4, "one value stored before the pixel loop and reloaded once after it"),
    ("semantic_difference_conv2d", "grad_input_kernel<*>", None): (
        32, _INVARIANTS + "kernel tap (9 per block for 3x3), each tap a whole Cout reduction"),
    ("semantic_difference_conv2d", "grad_weight_partial_kernel<double, 1>", 80): (
        12, _INVARIANTS + "pixel chunk (fp64 only)"),
}

# Dynamic shared memory the launchers request, per kernel name pattern: C++ expressions the probe
# program evaluates inside the kernel file's translation unit (its anonymous namespace included).
DYNAMIC_SMEM = {
    "disentangled_non_local": [
        (f"attention_*_kernel<{t}, {vpt}>", f"tile_smem<{t}, {vpt}>()")
        for t, vpts in (("float", (4, 8)), ("double", (4,)), ("__half", (4, 8)),
                        ("__nv_bfloat16", (4, 8)))
        for vpt in vpts],
    # Histogram bins live in dynamic shared memory only while they fit kSmemBinsMax (the
    # launchers fall back to global memory above it): that bound is the most requested.
    "qco": [(f"{k}<*>", "kSmemBinsMax")
            for k in ("region_hist_kernel", "region_grad_kernel", "recon_feat_kernel")],
}


def nvcc_path() -> str | None:
    found = os.environ.get("NVCC") or shutil.which("nvcc")
    if found:
        return found
    default = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(default) if default.exists() else None


# ---------------------------------------------------------------------------------- parsing
@dataclass
class Kernel:
    """One kernel instantiation compiled for one architecture."""

    mangled: str
    arch: int
    registers: int | None = None
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    static_smem: int = 0
    name: str = ""          # demangled, without namespaces and parameters
    dynamic_smem: int = 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> list[Kernel]:
    """Kernels from `ptxas -v` output (nvcc -Xptxas -v, any number of architectures). Spills of
    non-inlined device functions count towards the entry being compiled."""
    kernels: list[Kernel] = []
    current: Kernel | None = None
    properties_of = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = Kernel(m.group(1), int(m.group(2)))
            kernels.append(current)
            properties_of = None
        elif m := _PROPERTIES.search(line):
            properties_of = m.group(1)
        elif (m := _FRAME.search(line)) and current is not None and properties_of is not None:
            stack, stores, loads = (int(g) for g in m.groups())
            if properties_of == current.mangled:
                current.stack = stack
            current.spill_stores += stores
            current.spill_loads += loads
            properties_of = None
        elif (m := _USED.search(line)) and current is not None:
            current.registers = int(m.group(1))
            if s := _SMEM.search(line):
                current.static_smem = int(s.group(1))
    return kernels


def short_name(demangled: str) -> str:
    """`ns::(anonymous namespace)::kernel<T, (ns::E)1>(args)` -> `kernel<T, (E)1>`."""
    depth, cut = 0, len(demangled)
    for i, ch in enumerate(demangled):  # the parameter list: the first '(' outside <...>
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not demangled.startswith("(anonymous", i):
            cut = i
            break
    head = demangled[:cut]
    depth, start = 0, 0
    for i, ch in enumerate(head):  # the last '::' outside <...>
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif head.startswith("::", i) and depth == 0:
            start = i + 2
    return re.sub(r"(\w+::|\(anonymous namespace\)::)+", "", head[start:])


def demangle(names: list[str]) -> list[str]:
    """c++filt over the names (unchanged when c++filt is absent)."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return out if len(out) == len(names) else list(names)


def parse_probe(text: str) -> list[tuple[str, int]]:
    """(kernel name pattern, bytes) lines the probe program prints."""
    out = []
    for line in text.splitlines():
        pattern, _, value = line.rpartition("\t")
        if pattern:
            out.append((pattern, int(value)))
    return out


# ---------------------------------------------------------------------------------- compiling
@dataclass
class FileResult:
    stem: str
    kernels: list[Kernel] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


def probe_source(kernel_file: Path, entries) -> str:
    prints = "".join(f'  std::printf("%s\\t%zu\\n", "{pattern}", static_cast<size_t>({expr}));\n'
                     for pattern, expr in entries)
    return (f'#include "{kernel_file}"\n#include <cstdio>\n'
            "int main() {\n  using namespace segops::cuda;\n" + prints + "  return 0;\n}\n")


def compile_file(nvcc: str, kernel_file: Path, archs, workdir: Path, extra) -> FileResult:
    """Compile kernel_file for `archs` into the probe program, run it, parse everything."""
    stem = kernel_file.stem
    result = FileResult(stem)
    source = workdir / f"{stem}_probe.cu"
    source.write_text(probe_source(kernel_file, DYNAMIC_SMEM.get(stem, [])))
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    cmd = [nvcc, *NVCC_FLAGS, f"-I{ROOT / 'csrc' / 'include'}", *gencode, "-Xptxas", "-v",
           f"--threads={len(archs)}", *extra, str(source), "-o", str(workdir / stem)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    result.seconds = time.perf_counter() - start
    (workdir / f"{stem}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error" in ln]
        result.error = (errors[0] if errors else f"nvcc exited {proc.returncode}")[:300]
        return result
    result.kernels = parse_ptxas(proc.stdout + proc.stderr)
    for kernel, demangled in zip(result.kernels, demangle([k.mangled for k in result.kernels])):
        kernel.name = short_name(demangled)
    probe = subprocess.run([str(workdir / stem)], capture_output=True, text=True)
    if probe.returncode != 0:
        result.error = f"probe program exited {probe.returncode}: {probe.stderr.strip()[:200]}"
        return result
    for pattern, nbytes in parse_probe(probe.stdout):
        for kernel in result.kernels:
            if fnmatch.fnmatchcase(kernel.name, pattern):
                kernel.dynamic_smem = max(kernel.dynamic_smem, nbytes)
    return result


# ---------------------------------------------------------------------------------- checking
def spill_allowance(stem: str, kernel: Kernel) -> tuple[int, str | None]:
    for (file, pattern, arch), (nbytes, why) in SPILL_EXCEPTIONS.items():
        if file == stem and arch in (None, kernel.arch) and fnmatch.fnmatchcase(kernel.name,
                                                                                pattern):
            return nbytes, why
    return SPILL_BUDGET_BYTES, None


def check(stem: str, kernel: Kernel) -> list[str]:
    """Why this kernel fails the budgets (empty: it passes)."""
    out = []
    if kernel.registers is None:
        out.append("no ptxas report")
    smem = kernel.static_smem + kernel.dynamic_smem
    if smem > SMEM_LIMIT[kernel.arch]:
        out.append(f"shared memory {smem} B > {SMEM_LIMIT[kernel.arch]} B")
    allowed, _ = spill_allowance(stem, kernel)
    if kernel.spill_stores > allowed:
        out.append(f"{kernel.spill_stores} B spilled > budget {allowed} B")
    return out


def _kib(b: int) -> str:
    return f"{b / 1024:.1f}"


def report(results: list[FileResult], archs, seconds: float, nvcc_version: str) -> str:
    count = sum(len(r.kernels) for r in results)
    failing = sum(bool(check(r.stem, k)) for r in results for k in r.kernels)
    failing += sum(r.error is not None for r in results)
    lines = [f"# CUDA C++ kernel resources: {', '.join(f'sm_{a}' for a in archs)}",
             "",
             f"`python scripts/check_cuda_resources.py` — {nvcc_version}; {len(results)} files, "
             f"{count} kernel instantiations x architectures, {failing} failing; {seconds:.0f} s "
             "wall.",
             "",
             f"Flags: `{' '.join(NVCC_FLAGS)} -Xptxas -v` (setup.py's, with torch's "
             "CUDAExtension defines). Checks: compiles; static + dynamic shared memory within the "
             "device limit per block ("
             + ", ".join(f"sm_{a}: {DEVICE[a]} {SMEM_LIMIT[a] // 1024} KiB" for a in archs)
             + f"); spill stores <= {SPILL_BUDGET_BYTES} B ({BUDGET_WHY}), except the listed "
             "exceptions.",
             "Cells: registers / spill stores / spill loads (bytes) / static + dynamic shared "
             "memory (KiB; dynamic: what the launcher requests at most).",
             ""]
    for r in results:
        if r.error:
            lines.append(f"**{r.stem}.cu: {r.error}**")
    lines += ["| file | kernel | " + " | ".join(f"sm_{a}" for a in archs) + " | ok |",
              "|---|---|" + "---|" * len(archs) + "---|"]
    for r in results:
        rows: dict[str, dict[int, Kernel]] = {}
        for k in r.kernels:
            rows.setdefault(k.name, {})[k.arch] = k
        for name in sorted(rows):
            cells, ok = [], True
            for a in archs:
                k = rows[name].get(a)
                if k is None:
                    cells.append("–")
                    continue
                ok &= not check(r.stem, k)
                smem = _kib(k.static_smem) + (f" + {_kib(k.dynamic_smem)}"
                                              if k.dynamic_smem else "")
                cells.append(f"{k.registers} / {k.spill_stores} / {k.spill_loads} / {smem}")
            excepted = any(k.spill_stores for k in rows[name].values())
            verdict = ("yes (spill exception)" if excepted else "yes") if ok else "**no**"
            lines.append(f"| {r.stem} | `{name}` | " + " | ".join(cells) + f" | {verdict} |")
    if SPILL_EXCEPTIONS:
        lines += ["", "Spill budget exceptions:", ""]
        for (stem, pattern, arch), (nbytes, why) in SPILL_EXCEPTIONS.items():
            where = f"sm_{arch}" if arch else "both architectures"
            lines.append(f"- {stem} `{pattern}` ({where}): up to {nbytes} B. {why}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--files", nargs="+", default=None,
                    help="only these kernel files (stems, e.g. qco disentangled_non_local)")
    ap.add_argument("--jobs", type=int, default=2, help="files compiled at once")
    ap.add_argument("--report", default=None, help="write the markdown report here")
    ap.add_argument("--logs", default=None, help="keep nvcc's output per file in this folder")
    ap.add_argument("nvcc_flags", nargs="*", help="extra nvcc flags (after --)")
    args = ap.parse_args(argv)
    nvcc = nvcc_path()
    if nvcc is None:
        if os.environ.get("SEGOPS_REQUIRE_NVCC", "0") == "1":
            print("nvcc not found", file=sys.stderr)
            return 1
        print("check_cuda_resources: nvcc not found, skipping")
        return 0
    files = sorted(KERNEL_DIR.glob("*.cu"))
    if args.files:
        files = [f for f in files if f.stem in args.files]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    version = "nvcc " + (re.findall(r"release ([\d.]+)", version) or ["?"])[0]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segops-cuda-resources-") as tmp:
        workdir = Path(tmp)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(
                lambda f: compile_file(nvcc, f, args.arch, workdir, args.nvcc_flags), files))
        if args.logs:
            Path(args.logs).mkdir(parents=True, exist_ok=True)
            for log in workdir.glob("*.log"):
                shutil.copy(log, Path(args.logs) / log.name)
    for r in results:
        print(f"{'FAIL' if r.error else 'ok  '} csrc/cuda/{r.stem}.cu ({r.seconds:.0f} s, "
              f"{len(r.kernels)} kernels)" + (f": {r.error}" if r.error else ""), flush=True)
    text = report(results, args.arch, time.perf_counter() - start, version)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text)
    failures = [(r.stem, k, check(r.stem, k)) for r in results for k in r.kernels
                if check(r.stem, k)]
    for stem, k, why in failures:
        print(f"FAIL sm_{k.arch} {stem} {k.name}: {'; '.join(why)}", file=sys.stderr)
    if not args.report:
        print(text)
    return 1 if failures or any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
