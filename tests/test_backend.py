"""Backend dispatch (docs/operators.md §1): precedence, errors, fallback warning, import hygiene, info."""
import subprocess
import sys
import warnings

import pytest
import torch

import segops
from segops._backend import OpBackends, requested_backend


def test_explicit_argument_beats_context_and_environment(monkeypatch):
    monkeypatch.setenv("SEGOPS_BACKEND", "cuda")
    with segops.use_backend("triton"):
        assert requested_backend("reference") == "reference"
        assert requested_backend("auto") == "triton"
    assert requested_backend("auto") == "cuda"


def test_innermost_context_wins_and_unwinds(monkeypatch):
    monkeypatch.delenv("SEGOPS_BACKEND", raising=False)
    with segops.use_backend("cpu"):
        with segops.use_backend("reference"):
            assert requested_backend() == "reference"
        assert requested_backend() == "cpu"
    assert requested_backend() == "auto"


def test_environment_variable_is_read_at_each_call(monkeypatch):
    monkeypatch.delenv("SEGOPS_BACKEND", raising=False)
    assert requested_backend() == "auto"
    monkeypatch.setenv("SEGOPS_BACKEND", "reference")
    assert requested_backend() == "reference"


def test_bad_backend_names_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="use_backend"):
        with segops.use_backend("fast"):
            pass
    monkeypatch.setenv("SEGOPS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="SEGOPS_BACKEND must be one of"):
        requested_backend()


def test_named_backend_that_cannot_run_raises():
    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run here"):
        segops.criss_cross_attention(x, x, x, backend="cuda")
    with segops.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="cannot run here"):
            segops.criss_cross_attention(x, x, x)


def test_auto_falls_back_to_reference_with_one_warning():
    op = OpBackends("dummy_op_for_test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert op.select("auto", torch.device("cpu"), torch.float32) == "reference"
        assert op.select("auto", torch.device("cpu"), torch.float32) == "reference"
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "dummy_op_for_test" in msgs[0] and "reference" in msgs[0]


def test_import_loads_no_kernels_and_touches_no_device():
    code = ("import sys, torch, segops, segops.nn, segops.models; "
            "assert not any(m.startswith('segops.triton.') for m in sys.modules), 'triton kernels imported'; "
            "assert 'segops._C' not in sys.modules, '_C loaded at import'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_info_lists_every_op_and_backend():
    from segops import info
    from segops._backend import REGISTRY
    text = info.report()
    for op in REGISTRY:
        assert op in text
    for word in ("reference", "triton", "cpu", "cuda", "torch"):
        assert word in text


def test_works_on_reference_with_one_warning_when_extension_is_missing():
    code = r"""
import importlib.abc, sys, warnings
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "segops._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import torch, segops
x = torch.randn(1, 2, 3, 4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        out = segops.criss_cross_attention(x, x, x)
assert out.shape == (1, 2, 3, 4)
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(messages) == 1 and "segops._C could not be imported" in messages[0], messages
"""
    subprocess.run([sys.executable, "-c", code], check=True)
