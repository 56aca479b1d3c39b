"""Training augmentation (mmseg's pipeline: random resize, random crop, flip) and normalization.

The random draws of sample `index` come from a generator seeded with (seed, epoch, index), so
an epoch's batches do not depend on the data-loader workers or on where a run was resumed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from segops.data.datasets import IGNORE_INDEX

# ImageNet mean / std in RGB order, on the 0-255 scale (mmseg's data preprocessor).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def normalize(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, ImageNet-normalized."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


class EvalTransform:
    """Normalization only: the whole image at its own size."""

    def __call__(self, image: np.ndarray, label: np.ndarray, index: int = 0):
        return normalize(image), torch.from_numpy(np.ascontiguousarray(label))


class TrainTransform:
    """Random resize (a ratio in `ratio_range` of the image's own size, aspect kept), random
    crop of `crop_size` (h, w) re-drawn up to 10 times while one class covers more than
    `cat_max_ratio` of the crop's labelled pixels, horizontal flip with `flip_prob`, and
    normalization; crops smaller than `crop_size` are padded (image 0 after normalization,
    label 255). Set `epoch` before each epoch."""

    def __init__(self, crop_size, seed: int = 0, ratio_range=(0.5, 2.0),
                 cat_max_ratio: float = 0.75, flip_prob: float = 0.5) -> None:
        self.crop_size = tuple(crop_size)
        self.seed = seed
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.epoch = 0

    def _crop_box(self, rng: np.random.Generator, label: torch.Tensor):
        ch, cw = self.crop_size
        h, w = label.shape
        box = (0, 0)
        for _ in range(10):
            box = (int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1)))
            crop = label[box[0]:box[0] + ch, box[1]:box[1] + cw]
            counts = crop[crop != IGNORE_INDEX].unique(return_counts=True)[1]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return box

    def __call__(self, image: np.ndarray, label: np.ndarray, index: int = 0):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        img, lab = normalize(image), torch.from_numpy(np.ascontiguousarray(label))
        ratio = rng.uniform(*self.ratio_range)
        size = (max(1, round(lab.shape[0] * ratio)), max(1, round(lab.shape[1] * ratio)))
        img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
        lab = F.interpolate(lab[None, None].float(), size=size, mode="nearest")[0, 0].long()
        top, left = self._crop_box(rng, lab)
        ch, cw = self.crop_size
        img, lab = img[:, top:top + ch, left:left + cw], lab[top:top + ch, left:left + cw]
        if rng.random() < self.flip_prob:
            img, lab = img.flip(-1), lab.flip(-1)
        pad = (0, cw - lab.shape[1], 0, ch - lab.shape[0])
        if pad[1] or pad[3]:
            img = F.pad(img, pad, value=0.0)
            lab = F.pad(lab, pad, value=IGNORE_INDEX)
        return img.contiguous(), lab.contiguous()
