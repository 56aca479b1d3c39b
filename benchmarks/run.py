"""`python -m benchmarks.run`: speed and peak memory of every provider of every op (docs/operators.md §4).

Each (case, provider) runs in a fresh worker process (honest CPU peak memory, and an OOM or a
crash becomes a row, not the end of the run). Writes a JSON (device, versions and git sha in
every row), a markdown table (also printed) and PNG plots; `--compare OLD.json` prints changes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

from benchmarks import cases as cases_mod
from benchmarks.common import MODES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense peak numbers (TFLOP/s per dtype, memory GB/s) for the achieved-fraction columns.
DEVICE_PEAKS = {
    "H100": {"tflops": {"float16": 989.0, "bfloat16": 989.0, "float32": 67.0}, "gbps": 3350.0},
    "H200": {"tflops": {"float16": 989.0, "bfloat16": 989.0, "float32": 67.0}, "gbps": 4800.0},
    "A100": {"tflops": {"float16": 312.0, "bfloat16": 312.0, "float32": 19.5}, "gbps": 2039.0},
}


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "git_sha": git_sha()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                m = re.search(r"model name\s*:\s*(.*)", f.read())
                cpu = m.group(1).strip() if m else cpu
        except OSError:
            pass
        env["device_name"] = f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return env


def device_peak(device_name: str):
    for key, peak in DEVICE_PEAKS.items():
        if key in device_name:
            return peak
    return None


def run_worker(job: dict, timeout: float) -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks._worker", json.dumps(job)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"mode": m, "status": f"timeout after {timeout:.0f} s"} for m in job["modes"]]
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    done = {r["mode"] for r in rows}
    if proc.returncode != 0:
        why = ("killed (out of memory?)" if proc.returncode in (-9, 137)
               else f"worker exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        rows += [{"mode": m, "status": why} for m in job["modes"] if m not in done]
    return rows


def progress(i: int, n: int, text: str, start: float) -> None:
    width = 24
    filled = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {i}/{n} {time.time() - start:5.0f}s {text[:70]:<70}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def add_derived(rows: list[dict], peak) -> None:
    """Speed-up and memory ratio against `reference`, and throughput columns."""
    ref = {(r["op"], r["case"], r["mode"], r["dtype"]): r for r in rows
           if r["provider"] == "reference" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        base = ref.get((r["op"], r["case"], r["mode"], r["dtype"]))
        if base:
            r["speedup_vs_reference"] = base["median_ms"] / r["median_ms"]
            r["memory_ratio_vs_reference"] = (r["peak_bytes"] / base["peak_bytes"]
                                              if base["peak_bytes"] > 0 else None)
        factor = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[r["mode"]]
        secs = r["median_ms"] / 1e3
        if r.get("flops"):
            r["tflops"] = factor * r["flops"] / secs / 1e12
            if peak:
                r["tflops_fraction_of_peak"] = r["tflops"] / peak["tflops"].get(r["dtype"], float("nan"))
        if r.get("bytes"):
            r["gbps"] = factor * r["bytes"] / secs / 1e9
            if peak:
                r["bandwidth_fraction_of_peak"] = r["gbps"] / peak["gbps"]


def fmt_mem(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"Device: {env['device_name']} · torch {env['torch']} · triton {env['triton']} · "
             f"git {env['git_sha']}", "",
             "| op | case | dtype | mode | provider | median ms (p20–p80) | speed-up vs ref | "
             "peak MiB | mem vs ref | TFLOP/s | GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['mode']} | {r['provider']} | "
                         f"{r['status']} | | | | | |")
            continue
        sp = r.get("speedup_vs_reference")
        mr = r.get("memory_ratio_vs_reference")
        lines.append(
            f"| {r['op']} | {r['case']} | {r['dtype']} | {r['mode']} | {r['provider']} | "
            f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}–{r['p80_ms']:.3f}) | "
            f"{'-' if sp is None else f'{sp:.2f}×'} | {fmt_mem(r['peak_bytes'])} | "
            f"{'-' if mr is None else f'{mr:.2f}'} | "
            f"{r['tflops']:.2f} | " if "tflops" in r else
            f"| {r['op']} | {r['case']} | {r['dtype']} | {r['mode']} | {r['provider']} | "
            f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}–{r['p80_ms']:.3f}) | "
            f"{'-' if sp is None else f'{sp:.2f}×'} | {fmt_mem(r['peak_bytes'])} | "
            f"{'-' if mr is None else f'{mr:.2f}'} | - | ")
        lines[-1] += f"{r['gbps']:.1f} |" if "gbps" in r else "- |"
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: str, tag: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots written", file=sys.stderr)
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for op in sorted({r["op"] for r in rows}):
        ok = [r for r in rows if r["op"] == op and r["status"] == "ok"]
        mode = "fwd+bwd" if any(r["mode"] == "fwd+bwd" for r in ok) else (ok[0]["mode"] if ok else None)
        ok = [r for r in ok if r["mode"] == mode]
        if not ok:
            continue
        labels = list(dict.fromkeys(r["case"] for r in ok))
        providers = list(dict.fromkeys(r["provider"] for r in ok))
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 3 * len(labels) + 4), 4.5))
        width = 0.8 / len(providers)
        for metric, ax, ylabel in (("median_ms", axes[0], f"{mode} median time (ms)"),
                                   ("peak_bytes", axes[1], f"{mode} peak memory (MiB)")):
            for j, p in enumerate(providers):
                vals = []
                for lab in labels:
                    hit = [r for r in ok if r["case"] == lab and r["provider"] == p]
                    v = hit[0][metric] if hit else 0
                    vals.append(v / 2**20 if metric == "peak_bytes" else v)
                ax.bar([i + j * width for i in range(len(labels))], vals, width, label=p)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
            ax.set_xticklabels(labels, rotation=15, fontsize=7)
            ax.set_ylabel(ylabel)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{op} ({tag})")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{tag}_{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def compare(rows: list[dict], old_path: str) -> str:
    with open(old_path) as f:
        old = json.load(f)
    old_rows = old["rows"] if isinstance(old, dict) else old
    key = lambda r: (r["op"], r["case"], r["mode"], r["provider"], r["dtype"])  # noqa: E731
    before = {key(r): r for r in old_rows if r.get("status") == "ok"}
    lines = [f"Compared with {old_path}", "",
             "| op | case | mode | provider | old ms | new ms | new/old |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = before.get(key(r))
        if b and r["status"] == "ok":
            lines.append(f"| {r['op']} | {r['case']} | {r['mode']} | {r['provider']} | "
                         f"{b['median_ms']:.3f} | {r['median_ms']:.3f} | {r['median_ms'] / b['median_ms']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", nargs="*", help=f"ops to run (default: all of {', '.join(cases_mod.OPS)})")
    p.add_argument("--mode", nargs="*", choices=MODES, help="modes (default: fwd and fwd+bwd; "
                   "bwd too with --full)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--dtype", nargs="*", help="default: float32 on cpu, float16 on cuda")
    p.add_argument("--provider", nargs="*", help="only these providers")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    p.add_argument("--full", action="store_true", help="every shape of docs/operators.md §4 (default on CPU: the "
                   "first shape of each op, to stay within 10 minutes on 2 cores)")
    p.add_argument("--models", action="store_true", help="benchmark whole models instead of ops")
    p.add_argument("--out", help="JSON path (default: benchmarks/out/<device>_<date>.json)")
    p.add_argument("--compare", help="an earlier JSON to compare with")
    p.add_argument("--plot", help="directory for PNG plots (default: next to the JSON)")
    p.add_argument("--min-run-time", type=float, help="seconds of timing per measurement")
    p.add_argument("--timeout", type=float, default=600, help="seconds per (case, provider) worker")
    args = p.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    dtypes = args.dtype or (["float16"] if device == "cuda" else ["float32"])
    for d in dtypes:
        if not isinstance(getattr(torch, d, None), torch.dtype):
            p.error(f"--dtype {d!r} is not a torch dtype")
    modes = args.mode or (list(MODES) if args.full else ["fwd", "fwd+bwd"])
    min_run_time = args.min_run_time or (0.1 if args.quick else (0.5 if device == "cpu" else 1.0))
    env = environment(device)

    jobs = []
    if args.models:
        from benchmarks.cases import models
        for dt in dtypes:
            for i, case in enumerate(models.cases(device, getattr(torch, dt), args.quick)):
                for prov in case.providers:
                    jobs.append((case, dict(kind="model", op="models", index=i, provider=prov, dtype=dt)))
    else:
        ops = args.op or cases_mod.available_ops()
        unknown = sorted(set(ops) - set(cases_mod.OPS))
        if unknown:
            p.error(f"unknown op(s) {unknown}; known: {cases_mod.OPS}")
        for op in ops:
            module = cases_mod.load(op)
            for dt in dtypes:
                op_cases = module.cases(device, getattr(torch, dt), args.quick)
                if device == "cpu" and not (args.full or args.quick):
                    op_cases = op_cases[:getattr(module, "DEFAULT_CPU_CASES", 1)]
                for i, case in enumerate(op_cases):
                    for prov in case.providers:
                        jobs.append((case, dict(kind="op", op=op, index=i, provider=prov, dtype=dt)))
    if args.provider:
        jobs = [j for j in jobs if j[1]["provider"] in args.provider]

    rows = []
    start = time.time()
    for i, (case, job) in enumerate(jobs):
        progress(i, len(jobs), f"{case.op} {case.label} {job['provider']}", start)
        job.update(device=device, quick=args.quick, modes=modes, min_run_time=min_run_time)
        kw = case.make("meta", getattr(torch, job["dtype"])) if (case.flops or case.bytes) else {}
        for r in run_worker(job, args.timeout):
            r.update(op=case.op, case=case.label, params=case.params, provider=job["provider"],
                     dtype=job["dtype"], device=device, **env)
            if r["status"] == "ok":
                r["flops"] = case.flops(kw) if case.flops else None
                r["bytes"] = case.bytes(kw) if case.bytes else None
            rows.append(r)
    progress(len(jobs), len(jobs), "done", start)
    add_derived(rows, device_peak(env["device_name"]) if device == "cuda" else None)

    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device_name"].split("(")[0]).strip("-").lower()[:40]
    tag = f"{'models_' if args.models else ''}{slug}_{datetime.date.today().isoformat()}"
    out = args.out or os.path.join(ROOT, "benchmarks", "out", f"{tag}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"environment": env, "device": device, "rows": rows}, f, indent=1)
    table = markdown(rows, env)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    plots = plot(rows, args.plot or os.path.dirname(os.path.abspath(out)), tag)
    print(f"\nwrote {out}, {os.path.splitext(out)[0]}.md and {len(plots)} plot(s)")
    if args.compare:
        print("\n" + compare(rows, args.compare))
    failed = [r for r in rows if r["status"].startswith(("error", "worker"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
