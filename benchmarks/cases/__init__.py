"""Benchmark cases, one module per operator module of segops/ops (same file stem); each exposes
`cases(device, dtype, quick)`. The list of modules comes from the op descriptions (OpSpec)."""
import importlib
import importlib.util

from segops.ops._spec import SPECS

# The segops/ops module of each description: "qco" covers qco_1d, qco_2d, texture_reconstruct.
OPS = sorted({spec.function.__module__.rsplit(".", 1)[1] for spec in SPECS.values()})


def load(op: str):
    return importlib.import_module(f"benchmarks.cases.{op}")


def available_ops() -> list[str]:
    return [op for op in OPS if importlib.util.find_spec(f"benchmarks.cases.{op}") is not None]
