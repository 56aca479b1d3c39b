"""The training losses named in `segops.models.loss_terms.LOSS_NAMES`, and `total_loss`.

`build_loss(term)` builds the nn.Module of one `LossTerm`; `Criterion(model.loss_terms)` holds
them all (its state_dict carries the memory banks of "pixel_contrast", so a trainer saves it
with the checkpoint) and `total_loss(model, outputs, label)` sums the weighted terms of a model,
reusing one Criterion per model.

Label convention: (N, H, W) int64 class indices, 255 = ignore. When an output is not at the
label's size, the label is resized to the output's size with nearest interpolation; a dict output
("mask_classification") gets the label at full resolution.

How the supervision of the papers maps onto these names (each model declares its terms):
- auxiliary FCN heads (mmseg configs: weight 0.4): "cross_entropy" on "aux.<i>";
- BiSeNet V1/V2 booster (context/auxiliary) heads, ICNet cascade label guidance (each branch's
  logits against the label resized to that branch), SeMask's semantic-prior maps, OCRNet's and
  ISNet's coarse soft-region logits: "cross_entropy" on the extra outputs, with the weights of
  the reference configs;
- STDC's detail head: "detail_aggregation"; DFN's border network: "border_focal";
- Mask2Former's query predictions: "mask_classification" (`MaskClassificationLoss`);
- ContrastiveSeg: "pixel_contrast" on the projection-head embedding (see `ProjectionHead`);
  its kwargs must give `num_classes` and `embed_dim` (the memory banks' shape).

Reductions: "cross_entropy" averages over the non-ignored pixels, weighted by the class weights
(PyTorch's `F.cross_entropy`, and the official code of the papers); `avg_non_ignore=False`
divides by every pixel of the label instead, mmseg's default.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models.loss_terms import LOSS_NAMES, LossTerm

IGNORE_INDEX = 255


def resize_label(label: Tensor, size) -> Tensor:
    """`label` (N, H, W) resized to `size` with nearest interpolation (unchanged if equal)."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return F.interpolate(label[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def _pixel_cross_entropy(logits: Tensor, label: Tensor, class_weight: Optional[Tensor],
                         ignore_index: int) -> Tensor:
    """Per-pixel (N, H, W) cross-entropy, class-weighted, 0 at ignored pixels."""
    weight = None if class_weight is None else class_weight.to(logits)
    return F.cross_entropy(logits, label, weight=weight, ignore_index=ignore_index,
                           reduction="none")


class CrossEntropyLoss(nn.Module):
    """Pixel-wise cross-entropy with an ignore index and optional class weights.

    `avg_non_ignore=True`: sum of weighted losses / sum of the class weights of the valid pixels;
    False: / the number of pixels (mmseg's default)."""

    def __init__(self, class_weight: Optional[Sequence[float]] = None,
                 ignore_index: int = IGNORE_INDEX, avg_non_ignore: bool = True) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.avg_non_ignore = avg_non_ignore
        self.register_buffer("class_weight", None if class_weight is None else
                             torch.tensor(class_weight, dtype=torch.float32), persistent=False)

    def _pixel_weight_total(self, label: Tensor, selected: Tensor) -> Tensor:
        """The denominator of the mean over the `selected` (bool N, H, W) pixels."""
        if not self.avg_non_ignore:
            return torch.tensor(float(label.numel()))
        if self.class_weight is None:
            return selected.sum()
        safe = torch.where(selected, label, torch.zeros_like(label))
        return (self.class_weight.to(label.device)[safe] * selected).sum()

    def forward(self, logits: Tensor, label: Tensor) -> Tensor:
        loss = _pixel_cross_entropy(logits, label, self.class_weight, self.ignore_index)
        total = self._pixel_weight_total(label, label != self.ignore_index)
        return loss.sum() / total.to(loss).clamp(min=1e-12)


class OhemCrossEntropyLoss(CrossEntropyLoss):
    """Cross-entropy over the hard pixels, chosen as mmseg's OHEMPixelSampler does.

    With `thresh`: the valid pixels whose probability of the true class is below
    max(thresh, the (min_kept * N)-th smallest such probability); without: the min_kept * N
    pixels of highest loss. The loss is averaged over the kept pixels (as the reduction of
    `CrossEntropyLoss`)."""

    def __init__(self, thresh: Optional[float] = 0.7, min_kept: int = 100000, **kwargs) -> None:
        super().__init__(**kwargs)
        if min_kept <= 1:
            raise ValueError(f"min_kept must be > 1, got {min_kept}")
        self.thresh = thresh
        self.min_kept = min_kept

    @torch.no_grad()
    def hard_pixels(self, logits: Tensor, label: Tensor) -> Tensor:
        """The bool (N, H, W) mask of the pixels the loss keeps."""
        valid = label != self.ignore_index
        batch_kept = self.min_kept * label.shape[0]
        kept = torch.zeros_like(valid)
        if self.thresh is not None:
            safe = torch.where(valid, label, torch.zeros_like(label))
            prob = logits.softmax(1).gather(1, safe[:, None])[:, 0][valid]
            sorted_prob = prob.sort().values
            threshold = self.thresh
            if sorted_prob.numel() > 0:
                threshold = max(threshold,
                                sorted_prob[min(batch_kept, sorted_prob.numel() - 1)].item())
            kept[valid] = prob < threshold
        else:
            loss = _pixel_cross_entropy(logits, label, self.class_weight, self.ignore_index)
            order = loss[valid].sort(descending=True).indices
            kept_valid = torch.zeros_like(order, dtype=torch.bool)
            kept_valid[order[:batch_kept]] = True
            kept[valid] = kept_valid
        return kept

    def forward(self, logits: Tensor, label: Tensor) -> Tensor:
        kept = self.hard_pixels(logits, label)
        loss = _pixel_cross_entropy(logits, label, self.class_weight, self.ignore_index) * kept
        total = self._pixel_weight_total(label, kept)
        return loss.sum() / total.to(loss).clamp(min=1e-12)


def _dice(prob: Tensor, targets: Tensor) -> Tensor:
    """1 - (2 |p t| + 1) / (|p| + |t| + 1) of matching rows: (M,)."""
    return 1 - (2 * (prob * targets).sum(1) + 1) / (prob.sum(1) + targets.sum(1) + 1)


def _binarize(x: Tensor, threshold: float) -> Tensor:
    return (x > threshold).to(x.dtype)


def detail_boundary_target(label: Tensor, threshold: float = 0.1) -> Tensor:
    """STDC's detail ground truth (N, 1, H, W) in {0, 1}, as mmseg's STDCHead computes it: the
    Laplacian of the label map (ignore value included, as the reference does) at strides 1, 2
    and 4, each clamped at 0, upsampled (nearest) and thresholded, fused by the fixed 1x1 conv
    (0.6, 0.3, 0.1) and thresholded again."""
    x = label[:, None].float()
    laplacian = x.new_tensor([[-1., -1., -1.], [-1., 8., -1.], [-1., -1., -1.]]).view(1, 1, 3, 3)
    levels = []
    for stride in (1, 2, 4):
        edges = F.conv2d(x, laplacian, stride=stride, padding=1).clamp(min=0)
        edges = F.interpolate(edges, size=x.shape[2:], mode="nearest")
        levels.append(_binarize(edges, threshold))
    fusion = x.new_tensor([0.6, 0.3, 0.1]).view(1, 3, 1, 1)
    return _binarize(F.conv2d(torch.cat(levels, 1), fusion), threshold)


class DetailAggregationLoss(nn.Module):
    """STDC's detail loss on a 1-channel logit map: binary cross-entropy + Dice against
    `detail_boundary_target(label)`. Dice as the official STDC code: per image,
    1 - (2 |p t| + 1) / (|p| + |t| + 1) on p = sigmoid(logits), averaged over the batch (mmseg's
    DiceLoss, given a 1-channel map, one-hot encodes the target as "label == 0", the
    complement of the boundary, so it is not followed here)."""

    def __init__(self, boundary_threshold: float = 0.1, bce_weight: float = 1.0,
                 dice_weight: float = 1.0) -> None:
        super().__init__()
        self.boundary_threshold = boundary_threshold
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight

    def forward(self, logits: Tensor, label: Tensor) -> Tensor:
        target = detail_boundary_target(label, self.boundary_threshold).to(logits)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        dice = _dice(logits.sigmoid().flatten(1), target.flatten(1))
        return self.bce_weight * bce + self.dice_weight * dice.mean()


def class_boundary(label: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(N, H, W) float in {0, 1}: 1 where a valid pixel has a valid 8-neighbour of another
    class (DFN's border network target)."""
    padded = F.pad(label[:, None].float(), (1, 1, 1, 1), mode="replicate")
    neighbours = F.unfold(padded, 3).view(label.shape[0], 9, *label.shape[1:])
    other = (neighbours != label[:, None]) & (neighbours != ignore_index)
    return (other.any(1) & (label != ignore_index)).float()


class BorderFocalLoss(nn.Module):
    """DFN's border network loss: binary focal loss (gamma 2) of a 1-channel logit map against
    `class_boundary(label)`, averaged over the non-ignored pixels. `alpha` (optional) weights
    the boundary pixels by alpha and the others by 1 - alpha."""

    def __init__(self, gamma: float = 2.0, alpha: Optional[float] = None,
                 ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, label: Tensor) -> Tensor:
        logits = logits[:, 0]
        target = class_boundary(label, self.ignore_index).to(logits)
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        prob = logits.sigmoid()
        p_true = prob * target + (1 - prob) * (1 - target)
        loss = (1 - p_true) ** self.gamma * ce
        if self.alpha is not None:
            loss = loss * (self.alpha * target + (1 - self.alpha) * (1 - target))
        valid = label != self.ignore_index
        return (loss * valid).sum() / valid.sum().clamp(min=1)


class BinaryCrossEntropyLoss(nn.Module):
    """Sigmoid cross-entropy of a 1-channel logit map against a binary mask (saliency: the
    label holds 0 / 1, ignore_index excluded), averaged over the valid pixels (GateNet's
    BCEWithLogitsLoss)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, label: Tensor) -> Tensor:
        valid = label != self.ignore_index
        if bool((label[valid] > 1).any()):
            raise ValueError("binary_cross_entropy: the label must hold 0, 1 or the ignore index, "
                             f"got values up to {int(label[valid].max())}")
        target = (label == 1).to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], target, reduction="none")
        return (loss * valid).sum() / valid.sum().clamp(min=1)


class ProjectionHead(nn.Module):
    """ContrastiveSeg's projection head ("convmlp"): 1x1 conv, BN, ReLU, 1x1 conv to
    `proj_dim`, L2-normalized over channels ("linear": one 1x1 conv)."""

    def __init__(self, in_channels: int, proj_dim: int = 256, kind: str = "convmlp") -> None:
        super().__init__()
        if kind == "linear":
            self.proj = nn.Conv2d(in_channels, proj_dim, 1)
        elif kind == "convmlp":
            self.proj = nn.Sequential(nn.Conv2d(in_channels, in_channels, 1),
                                      nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
                                      nn.Conv2d(in_channels, proj_dim, 1))
        else:
            raise ValueError(f"kind must be 'convmlp' or 'linear', got {kind!r}")

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj(x), dim=1)


class PixelContrastLoss(nn.Module):
    """ContrastiveSeg's pixel-wise contrastive loss on an L2-normalized embedding (N, D, h, w).

    Anchors (hard anchor sampling): per image and per ground-truth class with more than
    `max_views` pixels, n_view = min(max_samples // #classes, max_views) pixels, half "hard"
    (predicted as another class) and half "easy" (predicted right) where both have enough.
    Contrast set: with `memory_size` > 0, the pixel queue (`pixel_update_freq` random pixels
    per class and image) and the region queue (each class's mean embedding per image) of every
    class; else the anchors themselves. Loss: supervised contrastive (positives: same class),
    scaled by temperature / base_temperature. The queues are updated after the loss with the
    detached embedding (gathered from every process under torch.distributed, so they stay
    identical across ranks). The prediction used for hard mining is the argmax of the output
    named `predict_output` (default "out"), resized to the embedding.

    Differences from the reference code, on purpose: every class's queue takes part (the
    reference skips class 0 when it reads the queue, and class 0 when it writes it); an anchor
    is only excluded from its own positives when contrasted against the anchors.
    """

    def __init__(self, num_classes: int, embed_dim: int, memory_size: int = 5000,
                 pixel_update_freq: int = 10, temperature: float = 0.1,
                 base_temperature: float = 0.07, max_samples: int = 1024, max_views: int = 100,
                 ignore_index: int = IGNORE_INDEX, predict_output: str = "out") -> None:
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.memory_size, self.pixel_update_freq = memory_size, pixel_update_freq
        self.temperature, self.base_temperature = temperature, base_temperature
        self.max_samples, self.max_views = max_samples, max_views
        self.predict_output = predict_output
        if memory_size > 0:
            shape = (num_classes, memory_size, embed_dim)
            self.register_buffer("pixel_queue", F.normalize(torch.randn(shape), dim=2))
            self.register_buffer("segment_queue", F.normalize(torch.randn(shape), dim=2))
            self.register_buffer("pixel_queue_ptr", torch.zeros(num_classes, dtype=torch.long))
            self.register_buffer("segment_queue_ptr", torch.zeros(num_classes, dtype=torch.long))

    def extra_inputs(self, outputs: dict) -> dict:
        seg = outputs.get(self.predict_output)
        return {} if seg is None else {"predict": seg.detach().argmax(1)}

    def _sample_anchors(self, feats: Tensor, label: Tensor, predict: Tensor):
        """feats (N, P, D), label / predict (N, P) -> anchors (A, V, D), classes (A,)."""
        per_image = []
        for lab in label:
            classes, counts = lab.unique(return_counts=True)
            keep = (classes != self.ignore_index) & (counts > self.max_views)
            per_image.append(classes[keep].tolist())
        total = sum(len(c) for c in per_image)
        if total == 0:
            return None, None
        n_view = min(self.max_samples // total, self.max_views)
        anchors, anchor_classes = [], []
        for feat, lab, pred, classes in zip(feats, label, predict, per_image):
            for cls in classes:
                hard = ((lab == cls) & (pred != cls)).nonzero()[:, 0]
                easy = ((lab == cls) & (pred == cls)).nonzero()[:, 0]
                num_hard = min(len(hard), max(n_view // 2, n_view - len(easy)))
                num_easy = n_view - num_hard
                hard = hard[torch.randperm(len(hard), device=hard.device)[:num_hard]]
                easy = easy[torch.randperm(len(easy), device=easy.device)[:num_easy]]
                anchors.append(feat[torch.cat((hard, easy))])
                anchor_classes.append(cls)
        return torch.stack(anchors), torch.tensor(anchor_classes, device=feats.device)

    def _contrast(self, anchors: Tensor, anchor_classes: Tensor) -> Tensor:
        num_views = anchors.shape[1]
        anchor_feat = anchors.transpose(0, 1).reshape(-1, anchors.shape[2])
        anchor_label = anchor_classes.repeat(num_views)
        if self.memory_size > 0:
            bank = torch.cat((self.segment_queue, self.pixel_queue), 1)
            contrast_feat = bank.reshape(-1, bank.shape[2]).to(anchor_feat)
            contrast_label = torch.arange(self.num_classes, device=anchors.device)
            contrast_label = contrast_label.repeat_interleave(bank.shape[1])
        else:
            contrast_feat, contrast_label = anchor_feat, anchor_label
        logits = anchor_feat @ contrast_feat.T / self.temperature
        logits = logits - logits.max(1, keepdim=True).values.detach()
        same_class = (anchor_label[:, None] == contrast_label[None]).to(logits)
        exp = logits.exp()
        negatives = (exp * (1 - same_class)).sum(1, keepdim=True)
        positive = same_class.fill_diagonal_(0) if self.memory_size == 0 else same_class
        log_prob = logits - torch.log(exp + negatives)
        has_positive = positive.sum(1) > 0
        mean_log_prob = (positive * log_prob).sum(1)[has_positive] / positive.sum(1)[has_positive]
        return -(self.temperature / self.base_temperature) * mean_log_prob.mean()

    @torch.no_grad()
    def _enqueue(self, feats: Tensor, label: Tensor) -> None:
        """feats (N, P, D) detached, label (N, P)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            feats, label = (_all_gather_cat(t) for t in (feats, label))
        for feat, lab in zip(feats, label):
            for cls in lab.unique().tolist():
                if cls == self.ignore_index:
                    continue
                members = feat[lab == cls]
                ptr = int(self.segment_queue_ptr[cls])
                self.segment_queue[cls, ptr] = F.normalize(members.mean(0), dim=0)
                self.segment_queue_ptr[cls] = (ptr + 1) % self.memory_size
                count = min(len(members), self.pixel_update_freq)
                chosen = members[torch.randperm(len(members), device=members.device)[:count]]
                ptr = int(self.pixel_queue_ptr[cls])
                if ptr + count >= self.memory_size:
                    self.pixel_queue[cls, -count:] = F.normalize(chosen, dim=1)
                    self.pixel_queue_ptr[cls] = 0
                else:
                    self.pixel_queue[cls, ptr:ptr + count] = F.normalize(chosen, dim=1)
                    self.pixel_queue_ptr[cls] = ptr + count

    def forward(self, embedding: Tensor, label: Tensor,
                predict: Optional[Tensor] = None) -> Tensor:
        n, dim = embedding.shape[:2]
        label = resize_label(label, embedding.shape[2:]).reshape(n, -1)
        predict = label if predict is None else resize_label(predict, embedding.shape[2:])
        predict = predict.reshape(n, -1)
        feats = embedding.permute(0, 2, 3, 1).reshape(n, -1, dim)
        anchors, anchor_classes = self._sample_anchors(feats, label, predict)
        loss = (embedding.sum() * 0 if anchors is None
                else self._contrast(anchors, anchor_classes))
        if self.training and self.memory_size > 0:
            self._enqueue(feats.detach(), label)
        return loss


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """maps (R, H, W) sampled bilinearly at coords (R, P, 2), (x, y) in [0, 1] over the whole map
    (pixel centres at (j + 0.5) / W): (R, P)."""
    grid = 2 * coords[:, :, None] - 1
    return F.grid_sample(maps[:, None], grid, align_corners=False)[:, 0, :, 0]


def _pairwise_sigmoid_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the points of BCE(logits[i], targets[j]), for every pair: (Q, T)."""
    positive = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits),
                                                  reduction="none")
    negative = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits),
                                                  reduction="none")
    return (positive @ targets.T + negative @ (1 - targets).T) / logits.shape[1]


def _pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    prob = logits.sigmoid()
    overlap = 2 * prob @ targets.T
    return 1 - (overlap + 1) / (prob.sum(1)[:, None] + targets.sum(1)[None] + 1)


class MaskClassificationLoss(nn.Module):
    """Mask2Former's set criterion (facebookresearch/Mask2Former `SetCriterion` with its
    `HungarianMatcher`) on {"pred_logits" (N, Q, K+1), "pred_masks" (N, Q, h, w),
    "aux_outputs": [same, per decoder layer]} against the full-resolution label.

    Targets: per image, one binary mask per class present in the label (ignored pixels belong to
    no mask), zero-padded bottom/right to a multiple of `size_divisibility` (the model pads its
    input so; the mask logits cover the padded image). Each prediction (final and every aux) is
    matched on its own: per image, the assignment minimizing class_weight * -p(class) +
    mask_weight * BCE + dice_weight * Dice over `num_points` uniform random points shared by
    predictions and targets. Loss of one prediction: class_weight * cross-entropy of every query
    (unmatched ones to the no-object class, weighted `no_object_weight`) + mask_weight * BCE +
    dice_weight * Dice of the matched masks on `num_points` points per mask, of which
    `importance_sample_ratio` are the most uncertain (|logit| smallest) of
    `oversample_ratio * num_points` random ones, the rest uniform; BCE and Dice are summed over
    the matched masks and divided by their number in the batch (averaged over processes under
    torch.distributed). The points come from torch's generator, so the loss is deterministic
    given the seed. Returns the sum over the final and the aux predictions.
    """

    def __init__(self, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, no_object_weight: float = 0.1,
                 num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75, size_divisibility: int = 1,
                 ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.class_weight, self.mask_weight = class_weight, mask_weight
        self.dice_weight, self.no_object_weight = dice_weight, no_object_weight
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.size_divisibility, self.ignore_index = size_divisibility, ignore_index

    def targets(self, label: Tensor, dtype: torch.dtype) -> list:
        """Per image: (classes (T,), masks (T, H', W') of `dtype`), H', W' padded."""
        d = self.size_divisibility
        h, w = label.shape[-2:]
        padded = F.pad(label, [0, (d - w % d) % d, 0, (d - h % d) % d], value=self.ignore_index)
        out = []
        for lab in padded:
            classes = lab.unique()
            classes = classes[classes != self.ignore_index]
            out.append((classes, (lab[None] == classes[:, None, None]).to(dtype)))
        return out

    def matching_points(self, count: int, device) -> Tensor:
        """(1, count, 2) uniform random points shared by the queries and targets of an image."""
        return torch.rand(1, count, 2, device=device)

    def loss_points(self, mask_logits: Tensor) -> Tensor:
        """(M, num_points, 2): PointRend's importance sampling on the uncertainty -|logit|."""
        num_masks = mask_logits.shape[0]
        num_sampled = int(self.num_points * self.oversample_ratio)
        num_uncertain = int(self.importance_sample_ratio * self.num_points)
        coords = torch.rand(num_masks, num_sampled, 2, device=mask_logits.device)
        uncertainty = -point_sample(mask_logits, coords).abs()
        chosen = uncertainty.topk(num_uncertain, dim=1).indices
        coords = coords.gather(1, chosen[..., None].expand(-1, -1, 2))
        uniform = torch.rand(num_masks, self.num_points - num_uncertain, 2,
                             device=mask_logits.device)
        return torch.cat((coords, uniform.to(coords)), 1)

    @torch.no_grad()
    def match(self, class_logits: Tensor, mask_logits: Tensor, targets: list) -> list:
        """Per image: (query indices, target indices) of the minimum-cost assignment."""
        from scipy.optimize import linear_sum_assignment

        indices = []
        for logits, masks, (classes, target_masks) in zip(class_logits, mask_logits, targets):
            coords = self.matching_points(self.num_points, masks.device).to(masks)
            pred = point_sample(masks, coords.expand(len(masks), -1, -1))
            target = point_sample(target_masks, coords.expand(len(target_masks), -1, -1))
            cost = (-self.class_weight * logits.softmax(-1)[:, classes]
                    + self.mask_weight * _pairwise_sigmoid_bce(pred, target)
                    + self.dice_weight * _pairwise_dice(pred, target))
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.long, device=masks.device),
                            torch.as_tensor(cols, dtype=torch.long, device=masks.device)))
        return indices

    def _prediction_loss(self, class_logits: Tensor, mask_logits: Tensor, targets: list,
                         num_masks: float) -> Tensor:
        class_logits, mask_logits = _at_least_fp32(class_logits), _at_least_fp32(mask_logits)
        indices = self.match(class_logits, mask_logits, targets)
        n, q, k = class_logits.shape
        target_classes = torch.full((n, q), k - 1, dtype=torch.long, device=class_logits.device)
        for b, (rows, cols) in enumerate(indices):
            target_classes[b, rows] = targets[b][0][cols]
        weight = class_logits.new_ones(k)
        weight[-1] = self.no_object_weight
        loss_class = F.cross_entropy(class_logits.transpose(1, 2), target_classes, weight)
        pred = torch.cat([masks[rows] for masks, (rows, _) in zip(mask_logits, indices)])
        target = torch.cat([t[1][cols] for t, (_, cols) in zip(targets, indices)])
        if len(pred) == 0:
            return self.class_weight * loss_class + mask_logits.sum() * 0
        with torch.no_grad():
            coords = self.loss_points(pred.detach())
            point_target = point_sample(target.to(pred), coords)
        point_logits = point_sample(pred, coords)
        loss_mask = F.binary_cross_entropy_with_logits(point_logits, point_target,
                                                       reduction="none").mean(1).sum()
        loss_dice = _dice(point_logits.sigmoid(), point_target).sum()
        return (self.class_weight * loss_class
                + (self.mask_weight * loss_mask + self.dice_weight * loss_dice) / num_masks)

    def forward(self, outputs: dict, label: Tensor) -> Tensor:
        targets = self.targets(label, _at_least_fp32(outputs["pred_masks"]).dtype)
        num_masks = torch.tensor(float(sum(len(c) for c, _ in targets)))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            num_masks = num_masks.to(outputs["pred_masks"].device)
            torch.distributed.all_reduce(num_masks)
            num_masks = num_masks / torch.distributed.get_world_size()
        num_masks = max(num_masks.item(), 1.0)
        predictions = [outputs] + list(outputs.get("aux_outputs", ()))
        return sum(self._prediction_loss(p["pred_logits"], p["pred_masks"], targets, num_masks)
                   for p in predictions)


def _all_gather_cat(t: Tensor) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


_LOSSES = {"cross_entropy": CrossEntropyLoss, "ohem_cross_entropy": OhemCrossEntropyLoss,
           "detail_aggregation": DetailAggregationLoss, "border_focal": BorderFocalLoss,
           "pixel_contrast": PixelContrastLoss, "binary_cross_entropy": BinaryCrossEntropyLoss,
           "mask_classification": MaskClassificationLoss}
assert set(_LOSSES) == set(LOSS_NAMES)


def build_loss(term: LossTerm) -> nn.Module:
    """The nn.Module computing `term.loss` with `term.kwargs` (the weight is applied by the
    Criterion)."""
    return _LOSSES[term.loss](**term.kwargs)


class Criterion(nn.Module):
    """The weighted sum of a model's loss terms. `forward(outputs, label)` returns
    (total, {term output name: unweighted loss value})."""

    def __init__(self, terms: Sequence[LossTerm]) -> None:
        super().__init__()
        self.terms = list(terms)
        self.losses = nn.ModuleList(build_loss(t) for t in self.terms)

    def forward(self, outputs, label: Tensor):
        if isinstance(outputs, Tensor):
            outputs = {"out": outputs}
        total, parts = 0.0, {}
        for term, loss_fn in zip(self.terms, self.losses):
            pred = term.select(outputs)
            term_label = label  # a dict output (mask classification) takes the full label
            if isinstance(pred, Tensor):
                if pred.dtype in (torch.float16, torch.bfloat16):  # autocast: loss in fp32
                    pred = pred.float()
                term_label = resize_label(label, pred.shape[2:])
            extra = loss_fn.extra_inputs(outputs) if hasattr(loss_fn, "extra_inputs") else {}
            value = loss_fn(pred, term_label, **extra)
            parts[f"{term.output}:{term.loss}"] = value.detach()
            total = total + term.weight * value
        return total, parts


_CRITERIA: "weakref.WeakKeyDictionary[nn.Module, Criterion]" = weakref.WeakKeyDictionary()


def criterion_for(model: nn.Module) -> Criterion:
    """The Criterion of `model.loss_terms`, built once per model (kept outside the model, so its
    state_dict is unchanged)."""
    if model not in _CRITERIA:
        _CRITERIA[model] = Criterion(model.loss_terms).to(_device_of(model))
    return _CRITERIA[model]


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def total_loss(model: nn.Module, outputs, label: Tensor) -> Tensor:
    """The training loss of `model` for its train-mode `outputs` and the (N, H, W) `label`."""
    return criterion_for(model)(outputs, label)[0]
