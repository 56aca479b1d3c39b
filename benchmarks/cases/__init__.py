"""Benchmark cases, one module per operator; each exposes `cases(device, dtype, quick)`."""
import importlib

OPS = [
    "criss_cross_attention",
    "interlaced_sparse_attention",
    "disentangled_non_local",
    "semantic_difference_conv2d",
    "qco",
]


def load(op: str):
    return importlib.import_module(f"benchmarks.cases.{op}")


def available_ops() -> list[str]:
    import importlib.util
    return [op for op in OPS if importlib.util.find_spec(f"benchmarks.cases.{op}") is not None]
