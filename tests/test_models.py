"""segops.models registry: every registered model builds, one registration idiom, and the
backend chosen at build time (`build(..., backend=...)` / `run_on_backend`)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import segops
from segops import models
from segops._backend import requested_backend


@pytest.mark.parametrize("name", models.list_models())
def test_every_registered_model_builds(name):
    with torch.device("meta"):
        model = models.build(name)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_register_model_presets_and_overrides():
    calls = []

    def factory(depth=1, num_classes=2):
        calls.append((depth, num_classes))
        return nn.Conv2d(1, num_classes, 1)

    models.register_model("_test_factory-d3", factory, depth=3)
    try:
        models.build("_test_factory-d3")
        models.build("_test_factory-d3", num_classes=5, depth=4)  # the caller's kwargs win
        assert calls == [(3, 2), (4, 5)]
        with pytest.raises(ValueError, match="registered twice"):
            models.register_model("_test_factory-d3", factory)
    finally:
        models.registry._MODELS.pop("_test_factory-d3")
    with pytest.raises(ValueError, match="unknown model"):
        models.build("fcn_r34-d8")


class _Probe(nn.Module):
    """Records the backend segops ops would be asked for inside the forward."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.fail = fail
        self.seen = []

    def forward(self, x):
        self.seen.append(requested_backend())
        if self.fail:
            raise RuntimeError("boom")
        return self.conv(x)


def test_run_on_backend_scopes_the_forward_only():
    probe = models.run_on_backend(_Probe(), "reference")
    keys = set(_Probe().state_dict())
    x = torch.randn(1, 1, 2, 2)
    probe(x)
    with segops.use_backend("cpu"):  # the model's own choice is the innermost context
        probe(x)
    assert probe.seen == ["reference", "reference"]
    assert requested_backend() == "auto"  # nothing leaks out of the forward
    assert set(probe.state_dict()) == keys  # no wrapper, no prefix
    # copies and pickles keep the choice
    for clone in (copy.deepcopy(probe), pickle.loads(pickle.dumps(probe))):
        clone.seen = []
        clone(x)
        assert clone.seen == ["reference"]
    with pytest.raises(ValueError, match="backend"):
        models.run_on_backend(_Probe(), "gpu")


def test_run_on_backend_leaves_the_context_when_forward_raises():
    probe = models.run_on_backend(_Probe(fail=True), "reference")
    with pytest.raises(RuntimeError, match="boom"):
        probe(torch.randn(1, 1, 2, 2))
    assert requested_backend() == "auto"


def test_build_backend_reaches_the_segops_layers():
    model = models.build("ccnet_r50-d8", depth=18, backend="reference").eval()
    seen = []
    model.decode_head.cca.register_forward_pre_hook(
        lambda module, args: seen.append(requested_backend()))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen == ["reference", "reference"]  # two recurrences
    auto = models.build("ccnet_r50-d8", depth=18)
    assert set(auto.state_dict()) == set(model.state_dict())
    assert not auto._forward_pre_hooks
