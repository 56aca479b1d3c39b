"""`python -m segops.info`: which backend of which op can run here, and why not; versions."""
from __future__ import annotations

import os
import platform

import torch

import segops  # noqa: F401  (registers every op)
from segops import _ext
from segops._backend import BACKENDS, REGISTRY, triton_status


def report() -> str:
    lines = [f"segops {segops.__version__} · python {platform.python_version()} · torch {torch.__version__}"]
    try:
        import triton
        lines.append(f"triton {triton.__version__} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})")
    except ImportError:
        lines.append("triton: not installed")
    cuda = torch.cuda.is_available()
    lines.append(f"CUDA: torch built with {torch.version.cuda or 'no CUDA'}; "
                 + (f"device {torch.cuda.get_device_name()}" if cuda else "no CUDA device"))
    err = _ext.load_error()
    lines.append("segops._C: " + (err if err else f"loaded, {len(_ext.registered_kernels())} kernels"))
    lines.append(f"SEGOPS_BACKEND={os.environ.get('SEGOPS_BACKEND', '') or '(unset)'}")
    lines.append("")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    if not cuda:
        why = triton_status(torch.device("cuda"))
        lines.append("(no CUDA device: the cuda column below is what this build could do with one"
                     + ("" if why is None else f"; triton: {why}") + ")")
    width = max(len(op) for op in REGISTRY) + 2
    for device in devices + ([] if cuda else [torch.device("cuda")]):
        lines.append(f"{device.type} tensors:")
        lines.append("  " + "op".ljust(width) + "".join(b.ljust(11) for b in BACKENDS))
        reasons = []
        for op in sorted(REGISTRY):
            status = REGISTRY[op].status(device)
            lines.append("  " + op.ljust(width) + "".join(("yes" if status[b] is None else "no").ljust(11)
                                                      for b in BACKENDS))
            reasons += [f"    {op} / {b}: {status[b]}" for b in BACKENDS if status[b] is not None]
        if reasons:
            lines.append("  why not:")
            lines += reasons
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
