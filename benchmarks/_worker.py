"""Runs providers of one case in its own process and prints one `ROW` JSON line per (provider,
mode): its time distribution (phase "time", one provider per process, or all of a case's in a
--quick smoke run), its peak memory (phase "memory", every provider of the case in one
process) or its time against the case's anchor, the two timed alternately (phase "paired").
The runner starts each phase with the allocator settings it needs (benchmarks/measure.py)."""
from __future__ import annotations

import gc
import json
import sys
import traceback

import torch


def _status(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "oom"
    traceback.print_exc(file=sys.stderr)
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def main() -> None:
    args = json.loads(sys.argv[1])
    from benchmarks import cases as cases_mod
    from benchmarks.measure import (counted_flops, make_step, peak_bytes, time_paired,
                                    time_step)
    device, dtype = args["device"], getattr(torch, args["dtype"])
    torch.manual_seed(0)
    if args["kind"] == "op":
        case = cases_mod.load(args["op"]).cases(device, dtype, args["quick"])[args["index"]]
        op_time = None
    else:
        from benchmarks.cases import models
        case = models.cases(device, dtype, args["quick"])[args["index"]]
        op_time = models.op_time

    def build(fn, mode):
        kwargs = case.make(device, dtype)
        for name in case.grad:
            kwargs[name].requires_grad_(True)
        if case.step is not None:
            return case.step(fn, kwargs, mode), kwargs
        return make_step(fn, kwargs, case.grad, mode), kwargs

    for provider in args["providers"]:
        fn = case.providers[provider]
        for mode in args["modes"]:
            row = {"provider": provider, "mode": mode}
            try:
                step, kwargs = build(fn, mode)
                if args["phase"] == "memory":
                    row["peak_bytes"] = peak_bytes(step, device)
                elif args["phase"] == "paired":
                    anchor_step, anchor_kwargs = build(case.providers[args["anchor"]], mode)
                    row.update(time_paired(anchor_step, step, device, args["min_run_time"]))
                    del anchor_step, anchor_kwargs
                else:
                    row.update(time_step(step, device, args["min_run_time"]))
                    if case.cost is None and provider == "reference":
                        row["counted_flops"] = counted_flops(step)
                    if op_time is not None:
                        row["op_ms"] = op_time(fn, kwargs, mode, device, args["min_run_time"])
                row["status"] = "ok"
                del step, kwargs
            except Exception as exc:  # reported in the table, not a crash of the whole run
                row["status"] = _status(exc)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            print("ROW " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
