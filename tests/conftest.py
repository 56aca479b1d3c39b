"""Test tiers: reference/cpu always; Triton on a GPU, or on CPU under TRITON_INTERPRET=1; cuda on a GPU.

TRITON_INTERPRET must be set before any @triton.jit function is created, so it is set here, at
collection time, when no GPU is present (the kernels are imported lazily by segops).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_report_header(config):
    from segops import _ext
    kernels = _ext.registered_kernels()
    return [f"segops: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
            f"segops._C kernels: {len(kernels)}, "
            f"SEGOPS_REQUIRE_BACKENDS={os.environ.get('SEGOPS_REQUIRE_BACKENDS', '')}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
