"""Runs one (case, provider) in its own process and prints one JSON line per mode."""
from __future__ import annotations

import json
import sys
import traceback

import torch


def main() -> None:
    args = json.loads(sys.argv[1])
    from benchmarks import cases as cases_mod
    from benchmarks.measure import make_step, measure
    dtype = getattr(torch, args["dtype"])
    torch.manual_seed(0)
    kind = args["kind"]
    if kind == "op":
        case = cases_mod.load(args["op"]).cases(args["device"], dtype, args["quick"])[args["index"]]
    else:
        from benchmarks.cases import models
        case = models.cases(args["device"], dtype, args["quick"])[args["index"]]
    fn = case.providers[args["provider"]]
    for mode in args["modes"]:
        row = {"mode": mode}
        try:
            kwargs = case.make(args["device"], dtype)
            for name in case.grad:
                kwargs[name].requires_grad_(True)
            step = make_step(fn, kwargs, case.grad, mode)
            row.update(measure(step, args["device"], args["min_run_time"]))
            row["status"] = "ok"
            del step, kwargs
        except torch.OutOfMemoryError:
            row["status"] = "oom"
        except Exception as exc:  # reported in the table, not a crash of the whole run
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            traceback.print_exc(file=sys.stderr)
        if args["device"] == "cuda":
            torch.cuda.empty_cache()
        print("ROW " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
