"""The training losses every registered model declares: each term builds and names an output of
the model's train-mode forward (run on the meta device), and a few real models of different loss
kinds give a finite loss and finite gradients."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

from segops import models
from segops.models import losses

BATCH, SIZE, NUM_CLASSES = 2, 64, 4


def _forward_kind(model: torch.nn.Module) -> tuple:
    """Models with the same segmentor class and loss terms produce their train-mode outputs with
    the same code (variants differ in backbone, head or width), so one forward covers them."""
    return type(model).__name__, tuple((t.output, t.loss) for t in model.loss_terms)


def _meta_train_outputs(model: torch.nn.Module) -> dict:
    with warnings.catch_warnings():  # "no fused backend for meta tensors": the reference runs
        warnings.simplefilter("ignore")
        return model.train()(torch.empty(BATCH, 3, SIZE, SIZE, device="meta"))


def test_every_model_declares_losses_on_its_train_outputs():
    """Every model is built on the meta device and its terms built; the train-mode forward (slow
    on meta: its shape functions run in Python) runs for the smallest model of each kind."""
    smallest = {}
    for name in models.list_models():
        with torch.device("meta"):
            model = models.build(name)
        assert model.loss_terms, name
        for term in model.loss_terms:
            assert isinstance(losses.build_loss(term), torch.nn.Module), (name, term)
        size = sum(p.numel() for p in model.parameters())
        key = _forward_kind(model)
        if key not in smallest or size < smallest[key][0]:
            smallest[key] = (size, name)
    for _, name in smallest.values():
        with torch.device("meta"):
            model = models.build(name)
        outputs = _meta_train_outputs(model)
        assert isinstance(outputs, dict), name
        for term in model.loss_terms:
            pred = term.select(outputs)
            if isinstance(pred, Tensor):
                assert pred.dim() == 4 and pred.shape[0] == BATCH, (name, term.output)
            else:
                assert {"pred_logits", "pred_masks"} <= set(pred), (name, term.output)


@pytest.fixture
def single_thread():
    """Tiny real forwards: a second thread only costs synchronisation (much on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name, kwargs", [
    ("bisenetv2_fcn", {}),  # cross-entropy on the logits and four auxiliary heads
    ("icnet_r18-d8", {}),  # cascade label guidance: branch logits at three resolutions
    ("ocrnet_hr18s", {}),  # OCR's coarse soft-region logits, HRNet
    ("stdc1", {}),  # OHEM cross-entropy and the detail aggregation loss
    # mask classification + semantic prior; the Swin-T backbone keeps it cheap
    ("semask-mask2former-msfapn_swin-l", {"variant": "t"}),
])
def test_real_train_step_gives_finite_loss_and_gradients(name, kwargs, single_thread):
    model = models.build(name, num_classes=NUM_CLASSES, **kwargs).train()
    img = torch.randn(BATCH, 3, SIZE, SIZE)
    label = torch.randint(0, NUM_CLASSES, (BATCH, SIZE, SIZE))
    label[:, :4] = 255
    loss = losses.total_loss(model, model(img), label)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and loss.item() > 0
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
