#!/usr/bin/env python
"""One-shot validation on a GPU machine: build the CUDA extension, run every GPU test tier,
compute-sanitizer memcheck on the smoke subset, and the benchmark's headline cases, writing
everything under one results folder, within a wall-time budget (default 9 minutes).

Meant for a fresh H100/H200 machine with torch (CUDA build), triton, nvcc and no package
registry (nothing is downloaded). Steps run in order, each with its own timeout (shortened to
what is left of --budget), and a failing step does not stop the next ones; a summary table
(step, status, seconds) is printed and written to summary.md; the exit status is 1 if any step
failed or timed out. Without a GPU (no nvidia-smi, or torch sees no CUDA device) it says so and
exits 2 at once, creating nothing.

  python scripts/gpu_validate.py                       # benchmarks/results/gpu-<device>_<date>/
  python scripts/gpu_validate.py --dry-run             # the steps, their commands and timeouts
  python scripts/gpu_validate.py --skip build --out /tmp/run
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass
class Step:
    name: str
    command: list[str]
    timeout: int  # seconds
    env: dict | None = None
    what: str = ""


def steps(out: Path, jobs: int) -> list[Step]:
    """The validation steps; `out` is the results folder."""
    def pytest(*args, junit):
        return [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={out / junit}",
                *args]

    require = {"SEGOPS_REQUIRE_BACKENDS": "cpu,triton,cuda"}
    # Timeouts add up to the default --budget (540 s), so every step gets its own in full
    # while the earlier ones keep to theirs.
    return [
        Step("build", [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e",
                       str(ROOT)], 160, {"SEGOPS_BUILD_CUDA": "1", "MAX_JOBS": str(jobs)},
             "the extension with csrc/cuda (setup.py; fails when it cannot build the CUDA part)"),
        Step("info", [PY, "-m", "segops.info"], 20, None, "which backend of which op is usable"),
        Step("tests-triton", pytest("-m", "triton and not cuda", junit="triton.xml"), 80, require,
             "Triton tier, compiled for the GPU (not the interpreter)"),
        Step("tests-cuda", pytest("-m", "cuda", "--ignore=tests/test_cuda_backend.py",
                                  junit="cuda.xml"), 60, require,
             "cuda tier (CUDA C++ kernels, Triton bf16) against the fp64 reference"),
        Step("tests-cuda-vs-triton",
             pytest("tests/test_cuda_backend.py", junit="cuda-vs-triton.xml"), 45, require,
             "both GPU backends at GPU-sized shapes"),
        Step("sanitizer",
             ["scripts/cuda_sanitizer_smoke.sh", f"--junitxml={out / 'sanitizer.xml'}"], 55, None,
             "compute-sanitizer memcheck over every op's cuda samples"),
        Step("benchmark", [PY, "-m", "benchmarks.run", "--device", "cuda", "--headline",
                           "--mode", "fwd+bwd", "--provider", "reference", "triton", "cuda",
                           "--min-run-time", "0.2", "--timeout", "60",
                           "--out", str(out / "benchmark.json"), "--plot", str(out)], 120, None,
             "fwd+bwd of every op's headline GPU cases (fp16): reference, triton, cuda"),
    ]


def has_gpu() -> str | None:
    """None when a CUDA device is usable, else why not."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    probe = subprocess.run([PY, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() "
                                      "else 1)"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "torch.cuda.is_available() is false" + (
            f" ({probe.stderr.strip().splitlines()[-1]})" if probe.stderr.strip() else "")
    return None


def device_slug() -> str:
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.splitlines()
    name = name[0] if name else "unknown"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:40]


def run_step(step: Step, out: Path, timeout: float) -> tuple[str, float]:
    """Run one step with its output in <out>/<name>.log; (status, seconds)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(step.env or {}))
    env.pop("TRITON_INTERPRET", None)  # the Triton tier is the compiled one here
    start = time.perf_counter()
    with open(out / f"{step.name}.log", "w") as log:
        log.write(f"$ {shlex.join(step.command)}\n")
        log.flush()
        proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the step's whole process group (pytest workers, nvcc)
            proc.wait()
            return f"timeout ({timeout:.0f} s)", time.perf_counter() - start
    return ("ok" if rc == 0 else f"failed (exit {rc})"), time.perf_counter() - start


def table(rows) -> str:
    lines = ["| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {status} | {seconds:.0f} |" for name, status, seconds in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None,
                    help="results folder (default benchmarks/results/gpu-<device>_<date>/)")
    ap.add_argument("--budget", type=float, default=540, help="seconds for all steps together")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="parallel compile jobs (MAX_JOBS of the build)")
    ap.add_argument("--skip", nargs="*", default=[], help="steps to leave out")
    ap.add_argument("--timeout", nargs="*", default=[], metavar="STEP=SECONDS",
                    help="change steps' timeouts (--budget still bounds the whole run)")
    ap.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else None
    names = [s.name for s in steps(Path("<results>"), args.jobs)]
    timeouts = dict(t.split("=", 1) for t in args.timeout if "=" in t)
    unknown = (set(args.skip) | set(timeouts)) - set(names)
    if unknown or len(timeouts) != len(args.timeout) or not all(
            t.isdigit() for t in timeouts.values()):
        ap.error(f"unknown step(s) {sorted(unknown)} or not STEP=SECONDS; steps: {names}")

    def chosen(out_dir: Path) -> list[Step]:
        plan = [s for s in steps(out_dir, args.jobs) if s.name not in args.skip]
        for s in plan:
            s.timeout = int(timeouts.get(s.name, s.timeout))
        return plan

    plan = chosen(out or Path("<results>"))
    if args.dry_run:
        for s in plan:
            env = " ".join(f"{k}={v}" for k, v in (s.env or {}).items())
            print(f"{s.name} ({s.timeout} s): {s.what}\n    {env + ' ' if env else ''}"
                  f"{shlex.join(s.command)}")
        return 0
    why = has_gpu()
    if why is not None:
        print(f"gpu_validate: no GPU on this machine ({why}); nothing was run", file=sys.stderr)
        return 2
    if out is None:
        out = ROOT / "benchmarks" / "results" / f"gpu-{device_slug()}_{datetime.date.today()}"
    out.mkdir(parents=True, exist_ok=True)
    plan = chosen(out.resolve())
    deadline = time.perf_counter() + args.budget
    rows = []
    for step in plan:
        left = deadline - time.perf_counter()
        if left < 5:
            rows.append((step.name, "not run (budget spent)", 0.0))
            continue
        print(f"== {step.name}: {step.what}", flush=True)
        status, seconds = run_step(step, out, min(step.timeout, left))
        rows.append((step.name, status, seconds))
        print(f"   {status}, {seconds:.0f} s (log: {out / (step.name + '.log')})", flush=True)
    summary = table(rows)
    (out / "summary.md").write_text(f"# GPU validation, {datetime.date.today()}\n\n{summary}\n")
    print("\n" + summary + f"\n\nresults: {out}")
    return 0 if all(status == "ok" for _, status, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
