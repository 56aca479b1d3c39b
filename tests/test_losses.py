"""segops.models.losses against direct computations (fp64) and mmseg's own pixel sampler and
STDC boundary target."""
from __future__ import annotations

import itertools
import math
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from segops.models import losses
from segops.models.loss_terms import LOSS_NAMES, LossTerm

C = 5


@pytest.fixture
def mmseg():
    from tests.mmseg_reference import _registry
    _registry()  # stands in for mmcv's compiled ops, so mmseg imports


def _inputs(n=2, h=12, w=10, ignore_rows=2):
    logits = torch.randn(n, C, h, w, dtype=torch.float64)
    label = torch.randint(0, C, (n, h, w))
    label[:, :ignore_rows] = 255
    return logits, label


def _direct_ce(logits, label, class_weight=None):
    """Per-pixel loops: -w_y log softmax(logits)_y over the valid pixels, / sum of w_y."""
    total, norm = 0.0, 0.0
    n, _, h, w = logits.shape
    for b in range(n):
        for i in range(h):
            for j in range(w):
                y = int(label[b, i, j])
                if y == 255:
                    continue
                wy = 1.0 if class_weight is None else class_weight[y]
                total += -wy * torch.log_softmax(logits[b, :, i, j], 0)[y].item()
                norm += wy
    return total, norm


@pytest.mark.parametrize("class_weight", [None, [0.5, 1.0, 2.0, 1.5, 0.25]])
def test_cross_entropy_matches_direct_computation(class_weight):
    logits, label = _inputs()
    total, norm = _direct_ce(logits, label, class_weight)
    got = losses.CrossEntropyLoss(class_weight=class_weight)(logits, label)
    assert math.isclose(got.item(), total / norm, rel_tol=1e-9)
    every_pixel = losses.CrossEntropyLoss(class_weight=class_weight, avg_non_ignore=False)
    assert math.isclose(every_pixel(logits, label).item(), total / label.numel(), rel_tol=1e-9)


@pytest.mark.parametrize("thresh", [0.7, None])
def test_ohem_keeps_the_pixels_mmseg_keeps(thresh, mmseg):
    from mmseg.models.losses import CrossEntropyLoss
    from mmseg.structures.sampler import OHEMPixelSampler

    logits, label = _inputs(h=16, w=16)
    context = SimpleNamespace(ignore_index=255, loss_decode=CrossEntropyLoss())
    expected = OHEMPixelSampler(context, thresh=thresh, min_kept=40).sample(logits, label[:, None])
    ohem = losses.OhemCrossEntropyLoss(thresh=thresh, min_kept=40)
    kept = ohem.hard_pixels(logits, label)
    assert torch.equal(kept, expected.bool())
    pixel = F.cross_entropy(logits, label, ignore_index=255, reduction="none")
    assert math.isclose(ohem(logits, label).item(), (pixel[kept].sum() / kept.sum()).item(),
                        rel_tol=1e-9)


def _mmseg_detail_target(label):
    from mmengine.structures import PixelData
    from mmseg.models.decode_heads import STDCHead
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    from mmseg.structures import SegDataSample

    head = STDCHead(in_channels=4, channels=4, num_convs=1, num_classes=2, concat_input=False)
    samples = []
    for lab in label:
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=lab[None])
        samples.append(sample)
    with mock.patch.object(BaseDecodeHead, "loss_by_feat", lambda self, logits, s: s):
        out = head.loss_by_feat(torch.zeros(len(label), 1, *label.shape[1:]), samples)
    return torch.stack([s.gt_sem_seg.data for s in out])


def test_detail_boundary_target_and_loss(mmseg):
    label = torch.zeros(2, 24, 20, dtype=torch.long)
    label[0, 5:15, 4:12] = 3
    label[1, :, 10:] = 1
    label[1, 20:] = 255
    target = losses.detail_boundary_target(label)
    assert torch.equal(target.long(), _mmseg_detail_target(label))
    assert 0 < target.sum() < target.numel()

    logits = torch.randn(2, 1, 24, 20, dtype=torch.float64)
    p, t = logits.sigmoid(), target.double()
    bce = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    dice = [1 - (2 * (p[i] * t[i]).sum() + 1) / (p[i].sum() + t[i].sum() + 1) for i in range(2)]
    expected = bce + sum(dice) / 2
    assert math.isclose(losses.DetailAggregationLoss()(logits, label).item(), expected.item(),
                        rel_tol=1e-9)


def test_border_focal_loss():
    label = torch.zeros(1, 6, 7, dtype=torch.long)
    label[0, 2:4, 3:] = 2
    label[0, 0, 0] = 255
    boundary = losses.class_boundary(label)
    expected_boundary = torch.zeros(6, 7)
    for i in range(6):
        for j in range(7):
            if label[0, i, j] == 255:
                continue
            neighbours = label[0, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
            expected_boundary[i, j] = float(((neighbours != label[0, i, j])
                                             & (neighbours != 255)).any())
    assert torch.equal(boundary[0], expected_boundary)

    logits = torch.randn(1, 1, 6, 7, dtype=torch.float64)
    p, t = logits[0, 0].sigmoid(), expected_boundary.double()
    p_true = torch.where(t > 0, p, 1 - p)
    alpha_t = torch.where(t > 0, 0.25, 0.75)
    focal = -alpha_t * (1 - p_true) ** 2 * p_true.log()
    valid = label[0] != 255
    got = losses.BorderFocalLoss(alpha=0.25)(logits, label)
    assert math.isclose(got.item(), (focal[valid].sum() / valid.sum()).item(), rel_tol=1e-9)


def _direct_supcon(anchors, anchor_cls, contrast, contrast_cls, tau, base_tau, skip_self):
    """Per anchor: -(tau / base_tau) * mean over positives p of
    log(exp(a.p / tau) / (exp(a.p / tau) + sum over negatives n of exp(a.n / tau)))."""
    values = []
    for i, (a, ca) in enumerate(zip(anchors, anchor_cls)):
        sims = [(a @ c).item() / tau for c in contrast]
        neg = sum(math.exp(s) for s, cc in zip(sims, contrast_cls) if cc != ca)
        pos = [math.log(math.exp(s) / (math.exp(s) + neg))
               for k, (s, cc) in enumerate(zip(sims, contrast_cls))
               if cc == ca and not (skip_self and k == i)]
        values.append(-(tau / base_tau) * sum(pos) / len(pos))
    return sum(values) / len(values)


@pytest.mark.parametrize("memory_size", [0, 6])
def test_pixel_contrast_loss(memory_size):
    loss = losses.PixelContrastLoss(num_classes=3, embed_dim=4, memory_size=memory_size,
                                    max_views=4, max_samples=24).double()
    anchors = F.normalize(torch.randn(3, 4, 4, dtype=torch.float64), dim=2)
    classes = torch.tensor([0, 2, 1])
    got = loss._contrast(anchors, classes).item()
    flat = anchors.transpose(0, 1).reshape(-1, 4)
    flat_cls = classes.repeat(4).tolist()
    if memory_size:
        bank = torch.cat((loss.segment_queue, loss.pixel_queue), 1)
        contrast = bank.reshape(-1, 4)
        contrast_cls = torch.arange(3).repeat_interleave(2 * memory_size).tolist()
    else:
        contrast, contrast_cls = flat, flat_cls
    expected = _direct_supcon(flat, flat_cls, contrast, contrast_cls, 0.1, 0.07,
                              skip_self=memory_size == 0)
    assert math.isclose(got, expected, rel_tol=1e-9)


def test_pixel_contrast_sampling_and_queues():
    loss = losses.PixelContrastLoss(num_classes=3, embed_dim=4, memory_size=6,
                                    pixel_update_freq=2, max_views=4, max_samples=24).double()
    label = torch.tensor([[0] * 8 + [1] * 6 + [2] * 2])  # class 2: too few pixels for anchors
    predict = torch.tensor([[0] * 5 + [1] * 3 + [1] * 4 + [0] * 2 + [2] * 2])
    feats = F.normalize(torch.randn(1, 16, 4, dtype=torch.float64), dim=2)
    anchors, classes = loss._sample_anchors(feats, label, predict)
    assert classes.tolist() == [0, 1] and anchors.shape == (2, 4, 4)
    for a, cls in zip(anchors, classes):
        rows = [int((feats[0] == v).all(1).nonzero()) for v in a]
        hard = [r for r in rows if predict[0, r] != cls]
        assert all(label[0, r] == cls for r in rows) and len(set(rows)) == 4 and len(hard) == 2

    embedding = feats.view(1, 4, 4, 4).permute(0, 3, 1, 2)  # (N, D, h, w), pixel-major = feats
    loss(embedding, label.view(1, 4, 4), predict.view(1, 4, 4))
    for cls in range(3):
        members = feats[0][label[0] == cls]
        assert torch.allclose(loss.segment_queue[cls, 0], F.normalize(members.mean(0), dim=0))
        assert loss.segment_queue_ptr[cls] == 1
        assert loss.pixel_queue_ptr[cls] == 2
        queued = loss.pixel_queue[cls, :2]
        assert torch.cdist(queued, members).min(1).values.max() < 1e-12


def test_binary_cross_entropy_on_a_saliency_mask():
    torch.manual_seed(0)
    label = torch.randint(0, 2, (2, 5, 6))
    label[0, 0] = 255
    logits = torch.randn(2, 1, 5, 6, dtype=torch.float64)
    total, count = 0.0, 0
    for n in range(2):
        for i in range(5):
            for j in range(6):
                if label[n, i, j] == 255:
                    continue
                p = 1 / (1 + math.exp(-logits[n, 0, i, j].item()))
                total -= math.log(p) if label[n, i, j] == 1 else math.log(1 - p)
                count += 1
    assert math.isclose(losses.BinaryCrossEntropyLoss()(logits, label).item(), total / count,
                        rel_tol=1e-9)
    with pytest.raises(ValueError, match="0, 1 or the ignore index"):
        losses.BinaryCrossEntropyLoss()(logits, label + 1)


def test_every_loss_name_builds_and_total_loss_resizes_the_label():
    kwargs = {"pixel_contrast": dict(num_classes=C, embed_dim=8, memory_size=4, max_views=2)}
    for name in LOSS_NAMES:
        assert isinstance(losses.build_loss(LossTerm("out", name, kwargs=kwargs.get(name, {}))),
                          torch.nn.Module)

    class Model(torch.nn.Module):
        loss_terms = [LossTerm("out"), LossTerm("aux.0", weight=0.4),
                      LossTerm("detail", "detail_aggregation")]

    logits, label = _inputs(h=16, w=16)
    outputs = {"out": logits, "aux": [logits[..., ::2, ::2]], "detail": logits[:, :1, ::4, ::4]}
    small = label[..., ::2, ::2]
    smaller = label[..., ::4, ::4]
    expected = (losses.CrossEntropyLoss()(logits, label)
                + 0.4 * losses.CrossEntropyLoss()(outputs["aux"][0], small)
                + losses.DetailAggregationLoss()(outputs["detail"], smaller))
    model = Model()
    assert math.isclose(losses.total_loss(model, outputs, label).item(), expected.item(),
                        rel_tol=1e-12)
    assert losses.criterion_for(model) is losses.criterion_for(model)


def test_model_loss_terms_give_a_finite_differentiable_loss():
    from tests.train_toy import toy_fcn
    model = toy_fcn(num_classes=C).train()
    img, label = torch.randn(2, 3, 16, 16), torch.randint(0, C, (2, 16, 16))
    loss = losses.total_loss(model, model(img), label)
    loss.backward()
    assert torch.isfinite(loss) and model.decode_head.conv_seg.weight.grad.abs().sum() > 0


def _pixel_centres(h, w):
    """(1, h * w, 2) points at the pixel centres: point-sampling them reads the pixels."""
    def centres(n):
        return (torch.arange(n, dtype=torch.float64) + 0.5) / n
    ys, xs = torch.meshgrid(centres(h), centres(w), indexing="ij")
    return torch.stack((xs, ys), -1).reshape(1, -1, 2)


def _read_every_pixel(loss, h, w):
    """Make `loss` sample each pixel once, for matching and for the loss."""
    loss.matching_points = lambda count, device: _pixel_centres(h, w)
    loss.loss_points = lambda logits: _pixel_centres(h, w).expand(len(logits), -1, -1)
    return loss


def _direct_mask_terms(mask, target):
    """Mean sigmoid BCE and Dice of one mask's logits against a binary target, pixel by pixel."""
    bce, inter, p_sum, t_sum = 0.0, 0.0, 0.0, 0.0
    for x, t in zip(mask.flatten().tolist(), target.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        bce += -(t * math.log(p) + (1 - t) * math.log(1 - p))
        inter, p_sum, t_sum = inter + p * t, p_sum + p, t_sum + t
    return bce / mask.numel(), 1 - (2 * inter + 1) / (p_sum + t_sum + 1)


def _direct_mask_classification(class_logits, mask_logits, label, weights):
    """Mask2Former's set loss by brute force: every assignment of an image's classes to distinct
    queries is tried, the cheapest kept; then the class, BCE and Dice terms, summed by hand."""
    w_class, w_mask, w_dice, w_none = weights
    num_queries, num_labels = class_logits.shape[1:]
    class_loss, class_norm, mask_loss, dice_loss, num_masks = 0.0, 0.0, 0.0, 0.0, 0
    for logits, masks, lab in zip(class_logits, mask_logits, label):
        classes = sorted(c for c in lab.unique().tolist() if c != 255)
        targets = [(lab == c).double() for c in classes]
        prob = logits.softmax(-1)
        terms = {(q, t): _direct_mask_terms(masks[q], targets[t])
                 for q in range(num_queries) for t in range(len(classes))}

        def cost(queries):
            return sum(-w_class * prob[q, classes[t]].item() + w_mask * terms[q, t][0]
                       + w_dice * terms[q, t][1] for t, q in enumerate(queries))
        best = min(itertools.permutations(range(num_queries), len(classes)), key=cost)
        assigned = {q: classes[t] for t, q in enumerate(best)}
        for q in range(num_queries):
            y = assigned.get(q, num_labels - 1)
            wy = 1.0 if y in classes else w_none
            class_loss += -wy * torch.log_softmax(logits[q], 0)[y].item()
            class_norm += wy
        for t, q in enumerate(best):
            mask_loss, dice_loss = mask_loss + terms[q, t][0], dice_loss + terms[q, t][1]
        num_masks += len(classes)
    return (w_class * class_loss / class_norm
            + (w_mask * mask_loss + w_dice * dice_loss) / max(num_masks, 1))


def test_mask_classification_matches_brute_force():
    h, w = 4, 5
    class_logits = torch.randn(2, 3, 3, dtype=torch.float64)  # 3 queries, 2 classes + no-object
    mask_logits = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
    label = torch.tensor([[[0, 0, 1, 1, 1]] * 2 + [[255, 0, 0, 1, 1]] * 2,
                          [[1, 1, 255, 255, 1]] * 4])
    weights = (2.0, 5.0, 3.0, 0.1)
    loss = _read_every_pixel(losses.MaskClassificationLoss(
        class_weight=2.0, mask_weight=5.0, dice_weight=3.0, no_object_weight=0.1,
        num_points=h * w), h, w)
    outputs = {"pred_logits": class_logits, "pred_masks": mask_logits}
    expected = _direct_mask_classification(class_logits, mask_logits.detach(), label, weights)
    got = loss(outputs, label)
    assert math.isclose(got.item(), expected, rel_tol=1e-9)
    got.backward()
    assert torch.isfinite(mask_logits.grad).all() and mask_logits.grad.abs().sum() > 0
    # every intermediate prediction is matched and supervised alike
    with_aux = dict(outputs, aux_outputs=[dict(outputs), dict(outputs)])
    assert math.isclose(loss(with_aux, label).item(), 3 * expected, rel_tol=1e-9)


def test_mask_classification_sampling_and_padding():
    loss = losses.MaskClassificationLoss(num_points=50, oversample_ratio=3.0,
                                         importance_sample_ratio=1.0, size_divisibility=8)
    # importance sampling keeps the most uncertain points: |logit| is small on the left half only
    logits = torch.full((4, 16, 16), 10.0)
    logits[..., :8] = 0.01
    assert (loss.loss_points(logits)[..., 0] < 0.5).all()
    classes, masks = loss.targets(torch.tensor([[[0, 255, 2], [2, 2, 255]]]), torch.float32)[0]
    assert classes.tolist() == [0, 2] and masks.shape == (2, 8, 8)
    assert masks.sum((1, 2)).tolist() == [1.0, 3.0]
    outputs = {"pred_logits": torch.randn(2, 4, 4), "pred_masks": torch.randn(2, 4, 6, 6)}
    label = torch.randint(0, 3, (2, 12, 12))
    label[1] = 255  # an image without any class: every query is no-object
    first = loss(outputs, label)
    torch.manual_seed(0)
    again = loss(outputs, label)
    torch.manual_seed(0)
    assert torch.isfinite(first) and loss(outputs, label).item() == again.item()


def test_total_loss_hands_a_dict_output_the_full_label():
    class Model(torch.nn.Module):
        loss_terms = [LossTerm("masks", "mask_classification", kwargs=dict(num_points=16)),
                      LossTerm("out", weight=0.4)]

    logits, label = _inputs(h=16, w=16)
    masks = {"pred_logits": torch.randn(2, 3, C + 1), "pred_masks": torch.randn(2, 3, 4, 4)}
    torch.manual_seed(0)
    total = losses.total_loss(Model(), {"out": logits, "aux": [], "masks": masks}, label)
    torch.manual_seed(0)
    expected = (losses.MaskClassificationLoss(num_points=16)(masks, label)
                + 0.4 * losses.CrossEntropyLoss()(logits, label))
    assert math.isclose(total.item(), expected.item(), rel_tol=1e-12)
