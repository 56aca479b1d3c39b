"""Compile tier, smoke size: one configuration of every Triton kernel compiled for sm_90 in fp16.

The full matrix (every configuration the launchers pick at the test and canonical GPU shapes,
fp16/bf16/fp32, sm_80 and sm_90) is scripts/check_triton_compile.py, run by CI. The script runs
in its own process: compiling needs Triton's JIT functions, which TRITON_INTERPRET (set by
conftest.py on a machine without a GPU) replaces by interpreted ones.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_triton_compile.py"


def _kernels() -> set:
    """(module, kernel) of every @triton.jit kernel (a function named *_kernel) of segops/triton."""
    return {(path.stem, name) for path in (ROOT / "segops" / "triton").glob("*.py")
            for name in re.findall(r"^def (\w+_kernel)\(", path.read_text(), re.M)}


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia")
    report = tmp_path_factory.mktemp("compile") / "report.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--dtype", "fp16",
                           "--shapes", "gpu", "--one-per-kernel", "--report", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return proc, report.read_text() if report.exists() else ""


def test_every_kernel_compiles_for_sm90_without_spills(smoke_report):
    proc, _ = smoke_report
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_the_launchers_reach_every_kernel(smoke_report):
    """Each kernel is launched at some canonical GPU shape, so the tier cannot miss one."""
    _, text = smoke_report
    reported = set(re.findall(r"^\| (\w+) \| (\w+_kernel) \|", text, re.M))
    assert reported == _kernels()
