"""`python -m benchmarks.run`: speed, peak memory and roofline fraction of every provider of
every op (docs/operators.md §4), or of whole models (--models).

Each (case, provider) is timed in a fresh worker process with the allocator's defaults (an OOM
or a crash becomes a row, not the end of the run; a --quick smoke run times the providers of a
case in one process); with --rounds R, the providers of a case are
timed R times in turn and each row keeps the median of its rounds, so that a few minutes of load
from elsewhere on a shared machine slow one round of every provider instead of all of one
provider's timing. A case with an anchor (SDC's plain `F.conv2d`) also times each fused provider
alternately with the anchor in one process, for a ratio that such load moves far less. Then
one more process per case, started with
the allocator settings that make the resident set honest, measures every provider's peak
memory (benchmarks/measure.py). The machine's bounds (GEMM
throughput and copy bandwidth; a GPU's data-sheet dense peak) are measured once per run. Writes
a JSON (device, versions and git sha in every row, the bounds), a markdown table (also printed)
and PNG plots; `--compare OLD.json` prints changes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

from benchmarks import cases as cases_mod
from benchmarks.common import MODES
from benchmarks.measure import MEMORY_ENV, best_bounds, machine_bounds, roofline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Data-sheet dense peaks (TFLOP/s by dtype) of GPUs: their compute bound. Bandwidth is measured.
DEVICE_PEAK_TFLOPS = {
    "H100": {"float16": 989.0, "bfloat16": 989.0, "float32": 67.0, "float64": 67.0},
    "H200": {"float16": 989.0, "bfloat16": 989.0, "float32": 67.0, "float64": 67.0},
    "A100": {"float16": 312.0, "bfloat16": 312.0, "float32": 19.5, "float64": 19.5},
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
        cpu, isa = platform.processor() or platform.machine(), None
        try:
            with open("/proc/cpuinfo") as f:
                info = f.read()
            m = re.search(r"model name\s*:\s*(.*)", info)
            cpu = m.group(1).strip() if m else cpu
            # A model name such as "AMD EPYC" hides the generation: the vector ISA and the
            # family/model numbers tell a Zen 3 (AVX2) from a Zen 5 (AVX-512) apart.
            flags = set((re.search(r"^flags\s*:\s*(.*)$", info, re.M) or [None, ""])[1].split())
            isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"),
                                                ("sse4_2", "SSE4.2")) if flag in flags), None)
            fam = re.search(r"cpu family\s*:\s*(\d+)", info)
            mod = re.search(r"^model\s*:\s*(\d+)", info, re.M)
            if fam and mod:
                env["cpu_family_model"] = f"{fam.group(1)}/{mod.group(1)}"
        except OSError:
            pass
        env["cpu_isa"] = isa
        env["device_name"] = (f"{cpu} ({isa + ', ' if isa else ''}{os.cpu_count()} cores, "
                              f"{torch.get_num_threads()} threads)")
    return env


def data_sheet_flops(device: str, device_name: str, dtype: str):
    """A GPU's dense peak FLOP/s in `dtype` from DEVICE_PEAK_TFLOPS, None if not listed (then
    the GEMM throughput is measured, as on CPU)."""
    if device != "cuda":
        return None
    for key, peaks in DEVICE_PEAK_TFLOPS.items():
        if key in device_name and dtype in peaks:
            return peaks[dtype] * 1e12
    return None


def run_worker(job: dict, timeout: float, env: dict) -> list[dict]:
    """The rows one worker process prints: one per (provider, mode), and a failed one for each
    it did not reach."""
    env = dict(env, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    expected = [(p, m) for p in job["providers"] for m in job["modes"]]
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks._worker", json.dumps(job)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"provider": p, "mode": m, "status": f"timeout after {timeout:.0f} s"}
                for p, m in expected]
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    done = {(r["provider"], r["mode"]) for r in rows}
    if proc.returncode != 0:
        why = ("killed (out of memory?)" if proc.returncode in (-9, 137)
               else f"worker exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        rows += [{"provider": p, "mode": m, "status": why} for p, m in expected if (p, m) not in done]
    return rows


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per (provider, mode) from the timed rows of interleaved rounds: each timing
    (median, p20, p80, and a model's op time) is the median over the rounds, and the rounds'
    medians are kept in `round_medians_ms`. A row fails if any of its rounds failed."""
    merged: dict = {}
    for round_rows in rounds:
        for r in round_rows:
            merged.setdefault((r["provider"], r["mode"]), []).append(r)
    rows = []
    for runs in merged.values():
        failed = [r for r in runs if r["status"] != "ok"]
        if failed or len(runs) == 1:
            rows.append(dict(failed[0] if failed else runs[0]))
            continue
        row = dict(runs[0])
        for key in ("median_ms", "p20_ms", "p80_ms", "op_ms"):
            if key in row:
                row[key] = statistics.median(r[key] for r in runs)
        row["round_medians_ms"] = [r["median_ms"] for r in runs]
        rows.append(row)
    return rows


def add_memory(rows: list[dict], job: dict, timeout: float) -> None:
    """Peak memory of the timed rows of one case, measured in one process started with the
    allocator settings of measure.MEMORY_ENV (timing ran with this process's environment)."""
    timed = list(dict.fromkeys(r["provider"] for r in rows if r["status"] == "ok"))
    if not timed:
        return
    memory = {(m["provider"], m["mode"]): m
              for m in run_worker(dict(job, phase="memory", providers=timed), timeout,
                                  dict(os.environ, **MEMORY_ENV))}
    for r in rows:
        if r["status"] == "ok":
            m = memory.get((r["provider"], r["mode"]), {})
            r["peak_bytes"] = m.get("peak_bytes")
            if m.get("status") != "ok":
                r["memory_status"] = m.get("status")


def add_paired(rows: list[dict], anchor: str | None, job: dict, timeout: float) -> None:
    """The fused providers of a case with an anchor timed again, each alternating with the
    anchor in one process (measure.time_paired): `vs_anchor_paired`. The references are left
    out (seconds a step, and not what the anchor is for)."""
    ok = {r["provider"] for r in rows if r["status"] == "ok"}
    if anchor is None or anchor not in ok:
        return
    paired = [p for p in dict.fromkeys(r["provider"] for r in rows)
              if p in ok and p != anchor and not p.startswith("reference")]
    if not paired:
        return
    result = {(m["provider"], m["mode"]): m
              for m in run_worker(dict(job, phase="paired", anchor=anchor, providers=paired),
                                  timeout, os.environ)}
    for r in rows:
        m = result.get((r["provider"], r["mode"]), {})
        if m.get("status") == "ok":
            r["vs_anchor_paired"], r["anchor_pairs"] = m["paired_ratio"], m["pairs"]


def progress(i: int, n: int, text: str, start: float) -> None:
    width = 24
    filled = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {i}/{n} {time.time() - start:5.0f}s {text[:70]:<70}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def add_cost(row: dict, case, meta_kwargs: dict) -> None:
    """The case's analytic FLOPs and minimum bytes for the row's mode."""
    if case.cost is not None:
        cost = case.cost(meta_kwargs)[row["mode"]]
        row["flops"], row["bytes"] = cost.flops, cost.bytes


def add_derived(rows: list[dict], bounds: dict, anchors: dict) -> None:
    """Against `reference`: speed-up and memory ratio; against the case's anchor provider:
    time ratio; against the machine (`bounds` by dtype): achieved throughput and the fraction
    of the roofline bound (the larger of the compute and the memory time) reached."""
    key = lambda r: (r["op"], r["case"], r["mode"], r["dtype"])  # noqa: E731
    ok = [r for r in rows if r["status"] == "ok"]
    by_provider = {(key(r), r["provider"]): r for r in ok}
    for r in ok:
        base = by_provider.get((key(r), "reference"))
        if r.get("flops") is None and base and base.get("counted_flops"):
            r["flops"], r["flops_counted"] = base["counted_flops"], True
        if base:
            r["speedup_vs_reference"] = base["median_ms"] / r["median_ms"]
            if r.get("peak_bytes") is not None and base.get("peak_bytes"):
                r["memory_ratio_vs_reference"] = r["peak_bytes"] / base["peak_bytes"]
        anchor = by_provider.get((key(r), anchors.get((r["op"], r["case"]))))
        if anchor:
            r["anchor"] = anchor["provider"]
            r["vs_anchor"] = r["median_ms"] / anchor["median_ms"]
        if r.get("op_ms") is not None:
            r["op_fraction"] = r["op_ms"] / r["median_ms"]
        secs = r["median_ms"] / 1e3
        if r.get("flops"):
            r["tflops"] = r["flops"] / secs / 1e12
        if r.get("bytes"):
            r["gbps"] = r["bytes"] / secs / 1e9
        bound = roofline(r.get("flops"), r.get("bytes"), bounds[r["dtype"]])
        if bound:
            r.update(bound, roofline_fraction=bound["bound_ms"] / r["median_ms"])


def fmt_mem(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def fmt_fraction(r: dict) -> str:
    """`37% C`: 37% of the roofline bound, which is the compute (C) or memory (M) one."""
    if r.get("roofline_fraction") is None:
        return "-"
    percent = r["roofline_fraction"] * 100
    digits = f"{percent:.0f}" if percent >= 10 else f"{percent:.2g}"
    return f"{digits}% {r['bound'][0].upper()}"


def fmt_note(r: dict) -> str:
    notes = []
    if r.get("vs_anchor") is not None and r["provider"] != r["anchor"]:
        paired = r.get("vs_anchor_paired")
        notes.append(f"{r['vs_anchor']:.2f}× {r['anchor']}"
                     + ("" if paired is None else f" (paired {paired:.2f}×)"))
    if r.get("op_fraction") is not None:
        notes.append(f"op {r['op_ms']:.0f} ms = {r['op_fraction']:.0%}")
    return ", ".join(notes) or "-"


def bounds_line(bounds: dict) -> str:
    def source(b):
        if "conv_flops_per_s" not in b:
            return b["flops_source"]
        return (f"{b['flops_source']}, best of torch.mm {b['gemm_flops_per_s'] / 1e9:.0f} and a "
                f"3x3 conv2d {b['conv_flops_per_s'] / 1e9:.0f}")
    return "; ".join(f"{dt}: GEMM {b['flops_per_s'] / 1e9:.0f} GFLOP/s ({source(b)}), "
                     f"copy {b['bytes_per_s'] / 1e9:.1f} GB/s (measured)" for dt, b in bounds.items())


def markdown(rows: list[dict], env: dict, bounds: dict, rounds: int = 1) -> str:
    timing = "median ms (p20–p80)" + (f", median of {rounds} rounds" if rounds > 1 else "")
    lines = [f"Device: {env['device_name']} · torch {env['torch']} · triton {env['triton']} · "
             f"git {env['git_sha']}", "", f"Roofline bounds: {bounds_line(bounds)}", "",
             f"| op | case | dtype | mode | provider | {timing} | speed-up vs ref | "
             "peak MiB | mem vs ref | of roofline | GFLOP/s | GB/s | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['op']} | {r['case']} | {r['dtype']} | {r['mode']} | {r['provider']} | "
        if r["status"] != "ok":
            lines.append(head + f"{r['status']} | | | | | | | | |")
            continue
        sp, mr = r.get("speedup_vs_reference"), r.get("memory_ratio_vs_reference")
        lines.append(
            head + f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}–{r['p80_ms']:.3f}) | "
            f"{'-' if sp is None else f'{sp:.2f}×'} | {fmt_mem(r.get('peak_bytes'))} | "
            f"{'-' if mr is None else f'{mr:.2f}'} | {fmt_fraction(r)} | "
            f"{'-' if 'tflops' not in r else format(r['tflops'] * 1e3, '.3g')} | "
            f"{'-' if 'gbps' not in r else format(r['gbps'], '.3g')} | {fmt_note(r)} |")
    lines += ["", "of roofline: the row's share of the time the machine's bound allows (C: compute "
              "bound, GEMM throughput; M: memory bound, copy bandwidth) for the case's FLOPs and "
              "minimum bytes; FLOPs of cases without an analytic count are counted on the "
              "reference (matrix products and convolutions). `1.10× conv2d (paired 1.12×)`: the "
              "row's median over the anchor's row, and the ratio of the two timed alternately "
              "in one process (robust to a machine whose speed drifts between rows)."]
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
        present = [r["mode"] for r in ok]
        mode = next((m for m in ("fwd+bwd", "train") if m in present), present[0] if ok else None)
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
                    v = (hit[0].get(metric) or 0) if hit else 0
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
             "| op | case | mode | provider | old ms | new ms | new/old | old of roofline | "
             "new of roofline |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = before.get(key(r))
        if b and r["status"] == "ok":
            lines.append(f"| {r['op']} | {r['case']} | {r['mode']} | {r['provider']} | "
                         f"{b['median_ms']:.3f} | {r['median_ms']:.3f} | "
                         f"{r['median_ms'] / b['median_ms']:.2f} | {fmt_fraction(b)} | "
                         f"{fmt_fraction(r)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", nargs="*", help=f"ops to run (default: all of {', '.join(cases_mod.OPS)})")
    p.add_argument("--mode", nargs="*", choices=MODES, help="operator modes (default: fwd and "
                   "fwd+bwd; bwd too with --full); models run eval and train")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--dtype", nargs="*", help="default: float32 on cpu, float16 on cuda")
    p.add_argument("--provider", nargs="*", help="only these providers")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    p.add_argument("--full", action="store_true", help="every shape of docs/operators.md §4 (default on CPU: the "
                   "first shape of each op, to stay within 10 minutes on 2 cores)")
    p.add_argument("--headline", action="store_true", help="only each op's headline cases (its "
                   "first shape: what a CPU run picks by default), on any device")
    p.add_argument("--case", nargs="+", help="only the op cases whose label contains one of "
                   "these texts (searched among every shape, as --full); with --models, the "
                   "models whose name contains one")
    p.add_argument("--models", action="store_true", help="benchmark whole models instead of ops "
                   "(256x512 input, eval forward and a train step)")
    p.add_argument("--out", help="JSON path (default: benchmarks/out/<device>_<date>.json)")
    p.add_argument("--compare", help="an earlier JSON to compare with")
    p.add_argument("--plot", help="directory for PNG plots (default: next to the JSON)")
    p.add_argument("--min-run-time", type=float, help="seconds of timing per measurement")
    p.add_argument("--timeout", type=float, default=600, help="seconds per (case, provider) worker")
    p.add_argument("--rounds", type=int, default=1, help="time the providers of each case this "
                   "many times in turn and keep each row's median round (default 1)")
    args = p.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    dtypes = args.dtype or (["float16"] if device == "cuda" else ["float32"])
    for d in dtypes:
        if not isinstance(getattr(torch, d, None), torch.dtype):
            p.error(f"--dtype {d!r} is not a torch dtype")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    modes = args.mode or (list(MODES) if args.full else ["fwd", "fwd+bwd"])
    min_run_time = args.min_run_time or (0.1 if args.quick else (0.5 if device == "cpu" else 1.0))
    env = environment(device)

    groups = []  # (case, job): a case and what its workers need; job["providers"] to run
    if args.models:
        from benchmarks.cases import models
        for dt in dtypes:
            for i, case in enumerate(models.cases(device, getattr(torch, dt), args.quick)):
                if args.case is None or any(text in case.op for text in args.case):
                    groups.append((case, dict(kind="model", op="models", index=i, dtype=dt)))
    else:
        ops = args.op or cases_mod.available_ops()
        unknown = sorted(set(ops) - set(cases_mod.OPS))
        if unknown:
            p.error(f"unknown op(s) {unknown}; known: {cases_mod.OPS}")
        for op in ops:
            module = cases_mod.load(op)
            for dt in dtypes:
                op_cases = module.cases(device, getattr(torch, dt), args.quick)
                if (device == "cpu" or args.headline) and not (args.full or args.quick
                                                                or args.case):
                    op_cases = op_cases[:getattr(module, "DEFAULT_CPU_CASES", 1)]
                for i, case in enumerate(op_cases):
                    if args.case is None or any(text in case.label for text in args.case):
                        groups.append((case, dict(kind="op", op=op, index=i, dtype=dt)))
    for case, job in groups:
        job["providers"] = [p for p in case.providers if not args.provider or p in args.provider]
        job.update(device=device, quick=args.quick, min_run_time=min_run_time,
                   modes=list(case.modes) if args.models else modes)

    # The machine's bounds, measured while no worker runs: before the first and after the last.
    bounds = {dt: machine_bounds(device, getattr(torch, dt),
                                 data_sheet_flops(device, env["device_name"], dt)) for dt in dtypes}
    rows = []
    anchors = {}
    start = time.time()
    total = sum(len(job["providers"]) for _, job in groups) * args.rounds
    done = 0
    for case, job in groups:
        meta_kwargs = case.make("meta", getattr(torch, job["dtype"])) if case.cost else {}
        anchors[(case.op, case.label)] = case.anchor
        rounds = []
        # A smoke run (--quick) times every provider of a case in one process: its numbers are
        # not results, and starting a process per provider would take most of its time.
        batches = [job["providers"]] if args.quick else [[p] for p in job["providers"]]
        for i in range(args.rounds):
            round_rows = []
            for batch in batches:
                progress(done, total, f"{case.op} {case.label} {' '.join(batch)}"
                         + (f" (round {i + 1}/{args.rounds})" if args.rounds > 1 else ""), start)
                round_rows += run_worker(dict(job, phase="time", providers=batch),
                                         args.timeout, os.environ)
                done += len(batch)
            rounds.append(round_rows)
        case_rows = merge_rounds(rounds)
        add_paired(case_rows, case.anchor, job, args.timeout)
        add_memory(case_rows, job, args.timeout)
        for r in case_rows:
            r.update(op=case.op, case=case.label, params=case.params, dtype=job["dtype"],
                     device=device, **env)
            if r["status"] == "ok":
                add_cost(r, case, meta_kwargs)
        rows += case_rows
    progress(total, total, "done", start)
    for dt in dtypes:
        bounds[dt] = best_bounds(bounds[dt], machine_bounds(
            device, getattr(torch, dt), data_sheet_flops(device, env["device_name"], dt)))
    add_derived(rows, bounds, anchors)

    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device_name"].split("(")[0]).strip("-").lower()[:40]
    tag = f"{'models_' if args.models else ''}{slug}_{datetime.date.today().isoformat()}"
    out = args.out or os.path.join(ROOT, "benchmarks", "out", f"{tag}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"environment": env, "device": device, "bounds": bounds, "rounds": args.rounds,
                   "rows": rows}, f, indent=1)
    table = markdown(rows, env, bounds, args.rounds)
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
