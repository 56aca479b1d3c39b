"""segops.train and segops.evaluate on a generated toy set in the folder layout, with the tiny
test-only model of tests/train_toy.py: exact resume, a 2-process torchrun (gloo) run, and the
evaluation numbers against a hand-computed confusion matrix."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from segops import evaluate as seg_eval
from segops import train as seg_train
from segops.data.toy import make_toy_dataset
from tests.utils import zoo_models

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), num_classes=NUM_CLASSES, train=8,
                            val=4, size=(24, 24), seed=0)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _common(root) -> list[str]:
    return ["--import", "tests.train_toy", "--model", "toy_fcn", "--dataset", "folder",
            "--data-root", str(root), "--num-classes", str(NUM_CLASSES), "--threads", "1"]


def _train_args(root, work_dir, iters, *extra) -> list[str]:
    return _common(root) + ["--iters", str(iters), "--batch-size", "2", "--crop-size", "16", "16",
                            "--work-dir", str(work_dir), "--workers", "0", "--log-interval", "1",
                            *extra]


def test_resume_continues_exactly(toy_root, tmp_path, one_thread):
    # 4 batches per epoch: the run crosses an epoch and the resume starts mid-epoch.
    full = seg_train.train(seg_train.parse_args(
        _train_args(toy_root, tmp_path / "full", 6, "--checkpoint-interval", "3")))
    resumed = seg_train.train(seg_train.parse_args(
        _train_args(toy_root, tmp_path / "resumed", 6,
                    "--resume", str(tmp_path / "full" / "iter_3.pth"))))
    assert len(full) == 6 and all(math.isfinite(v) for v in full)
    assert resumed == full[3:]
    a = torch.load(tmp_path / "full" / "latest.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "latest.pth", weights_only=True)
    assert a["iter"] == b["iter"] == 6
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    records = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == list(range(1, 7))
    assert {"loss", "lr", "out:cross_entropy", "aux.0:cross_entropy"} <= set(records[0])

    out = tmp_path / "eval.json"
    results = seg_eval.main(_common(toy_root) + ["--checkpoint", str(tmp_path / "full" / "latest.pth"),
                                                 "--out", str(out)])
    assert json.loads(out.read_text())["mIoU"] == pytest.approx(results["mIoU"])
    assert results["num_images"] == 4 and len(results["per_class"]) == NUM_CLASSES


class _PredictionDataset:
    """Images whose channel 0 is the predicted class map; `_OneHot` turns it into logits."""

    num_classes = 4
    class_names = ("a", "b", "c", "d")

    def __init__(self, preds, labels):
        self.items = list(zip(preds, labels))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        pred, label = self.items[i]
        return pred[None].float().expand(3, -1, -1), label


class _OneHot(nn.Module):
    def forward(self, img):
        return nn.functional.one_hot(img[:, 0].long(), 4).permute(0, 3, 1, 2).float()


def test_evaluation_matches_a_hand_computed_confusion_matrix():
    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 3, (5, 7), generator=g) for _ in range(3)]  # class 3 never predicted
    labels = [torch.randint(0, 4, (5, 7), generator=g) for _ in range(3)]
    labels[0][0] = 255
    labels = [torch.where(lab == 3, 255, lab) for lab in labels]  # class 3 absent: IoU NaN
    counts = [[0] * 4 for _ in range(4)]
    for pred, label in zip(preds, labels):
        for p, t in zip(pred.flatten().tolist(), label.flatten().tolist()):
            if t != 255:
                counts[t][p] += 1
    iou = []
    for c in range(3):
        tp = counts[c][c]
        fn = sum(counts[c]) - tp
        fp = sum(counts[r][c] for r in range(4)) - tp
        iou.append(100 * tp / (tp + fp + fn))
    total = sum(map(sum, counts))
    dataset = _PredictionDataset(preds, labels)
    for mode, kw in (("whole", {}), ("slide", {"crop_size": (3, 4), "stride": (2, 3)})):
        results = seg_eval.evaluate(_OneHot(), dataset, torch.device("cpu"), mode, **kw)
        assert results["mIoU"] == pytest.approx(sum(iou) / 3, rel=1e-12)
        assert [results["per_class"][n]["IoU"] for n in "abc"] == pytest.approx(iou, rel=1e-12)
        assert results["per_class"]["d"]["IoU"] is None
        assert results["aAcc"] == pytest.approx(100 * sum(counts[c][c] for c in range(4)) / total)
        assert results["num_pixels"] == total
    table = seg_eval.format_table(results)
    assert "mIoU" in table and "nan" in table


def _torchrun(module: str, args: list[str], nproc: int = 2, timeout: float = 300) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", "-m", module, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGABRT makes every process print its Python stacks (faulthandler): a hang says where.
        os.killpg(proc.pid, signal.SIGABRT)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun {module} did not finish in {timeout} s:\n{out[-6000:]}")
    assert proc.returncode == 0, out[-6000:]


def test_torchrun_two_processes_gloo(toy_root, tmp_path, one_thread):
    work = tmp_path / "ddp"
    _torchrun("segops.train", _train_args(toy_root, work, 30, "--lr", "0.05",
                                          "--checkpoint-interval", "30"))
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == list(range(1, 31))  # one writer
    loss = [r["loss"] for r in records]
    assert all(math.isfinite(v) for v in loss)
    assert sum(loss[-5:]) < 0.8 * sum(loss[:5])
    ckpt = torch.load(work / "iter_30.pth", weights_only=True)
    assert len(ckpt["rng"]) == 2
    rank0, rank1 = ckpt["parameter_fingerprints"]
    assert rank0 == rank1

    eval_args = _common(toy_root) + ["--checkpoint", str(work / "latest.pth")]
    _torchrun("segops.evaluate", eval_args + ["--out", str(tmp_path / "ddp.json")])
    single = seg_eval.main(eval_args)
    gathered = json.loads((tmp_path / "ddp.json").read_text())
    assert gathered["num_pixels"] == single["num_pixels"] == 4 * 24 * 24 - _ignored(toy_root)
    assert gathered["per_class"] == single["per_class"]


def _ignored(root: Path) -> int:
    from segops.data.datasets import read_label
    return sum(int((read_label(p) == 255).sum()) for p in (root / "ann_dir" / "val").iterdir())


# The models without an explicit recipe: mmseg's default SGD schedule is their reference
# (ICNet, the dilated-FCN family, ...) or the only one documented for them.
DEFAULT_RECIPE_MODELS = ("ann_", "bisenetv1_xception39", "ccnet_", "danet_", "deeplabv3",
                         "dfanet-", "dfnet-", "dnl_", "fcn_", "fpn_", "gun", "hyperseg-",
                         "icnet_", "isanet_", "nonlocal_", "ocnet_", "ocrnet_", "pspnet_",
                         "rgpnet", "sdn-fcn_", "sdn-fpn_", "stlnet_", "psanet_", "isnet_",
                         "gald_", "dgcnet_", "dfn_", "gatenet_", "acfnet_", "hmanet_",
                         "reconet_", "ordnet_", "gpsnet_", "ocnet-")


def test_every_model_gets_a_recipe():
    names = zoo_models()
    for prefix in seg_train.RECIPES:
        assert any(name.startswith(prefix) for name in names), f"no model for {prefix!r}"
    for name in names:
        explicit = [prefix for prefix in seg_train.RECIPES if name.startswith(prefix)]
        assert len(explicit) <= 1, (name, explicit)
        if not explicit:
            assert name.startswith(DEFAULT_RECIPE_MODELS), f"{name}: no recipe"
            assert seg_train.recipe_for(name) == seg_train.Recipe()


def test_mask2former_recipe_scales_the_backbone_lr():
    model = nn.ModuleDict({"backbone": nn.ModuleDict({"proj": nn.Linear(2, 2),
                                                      "norm": nn.LayerNorm(2)}),
                           "sem_seg_head": nn.Linear(2, 2)})
    recipe = seg_train.recipe_for("semask-mask2former-msfapn_swin-l")
    groups = {(g["lr"], g["weight_decay"]): len(g["params"])
              for g in seg_train.build_optimizer(model, recipe).param_groups}
    assert groups == {(1e-5, 0.05): 2, (1e-5, 0.0): 2, (1e-4, 0.05): 2}
