"""Segmentation datasets read from their standard on-disk layouts (images read with Pillow).

Layouts (`root` is --data-root):
- cityscapes: leftImg8bit/<split>/<city>/<name>_leftImg8bit.png with
  gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png, or, where that is missing,
  <name>_gtFine_labelIds.png mapped to the 19 train ids; 19 classes.
- ade20k: images/<training|validation>/<name>.jpg with annotations/<...>/<name>.png; 0 is
  "other" and becomes ignore, class k becomes k - 1 (reduce-zero-label); 150 classes.
- voc: JPEGImages/<id>.jpg with SegmentationClass/<id>.png (palette indices), the ids listed in
  ImageSets/Segmentation/<split>.txt; 21 classes.
- folder: img_dir/<split>/<name>.{png,jpg,jpeg} with ann_dir/<split>/<name>.png holding class
  indices; the class count comes from `num_classes`.
Labels use 255 for "ignore" everywhere. A missing directory, an image without a label or a label
value outside [0, num_classes) and not 255 raises an error naming the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE_INDEX = 255

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle")
# Cityscapes labelIds of the 19 train classes, in train-id order; every other id is ignored.
CITYSCAPES_TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31,
                              32, 33)
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _lookup_table(pairs, size: int = 256) -> np.ndarray:
    table = np.full(size, IGNORE_INDEX, dtype=np.int64)
    for src, dst in pairs:
        table[src] = dst
    return table


CITYSCAPES_ID_TO_TRAIN_ID = _lookup_table((i, t) for t, i in enumerate(CITYSCAPES_TRAIN_LABEL_IDS))
REDUCE_ZERO_LABEL = _lookup_table((v, v - 1) for v in range(1, 255))


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except OSError as err:
        raise OSError(f"cannot read image {path}: {err}") from err


def read_label(path: Path) -> np.ndarray:
    """(H, W) int64 of the PNG's values (palette indices for palette images, as VOC's)."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise OSError(f"expected a single-channel or palette PNG, got mode {img.mode}")
            return np.asarray(img).astype(np.int64)
    except OSError as err:
        raise OSError(f"cannot read label {path}: {err}") from err


class SegmentationDataset(Dataset):
    """(image, label) pairs. `label_map` (a 256-entry table) maps the stored values to class
    indices. Item i is `transform(image, label, index=i)` (default: the uint8 (3, H, W) image
    and int64 (H, W) label as tensors)."""

    def __init__(self, samples: Sequence[tuple[Path, Path]], num_classes: int,
                 class_names: Optional[Sequence[str]] = None,
                 label_map: Optional[np.ndarray] = None,
                 transform: Optional[Callable] = None) -> None:
        if not samples:
            raise ValueError("the dataset is empty")
        self.samples = list(samples)
        self.num_classes = num_classes
        self.class_names = tuple(class_names or (f"class_{i}" for i in range(num_classes)))
        self.label_map = label_map
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img_path, label_path = self.samples[index]
        image, label = read_image(img_path), read_label(label_path)
        if label.shape != image.shape[:2]:
            raise ValueError(f"label {label_path} is {label.shape[1]}x{label.shape[0]} but its "
                             f"image {img_path} is {image.shape[1]}x{image.shape[0]}")
        if self.label_map is not None:
            if label.max(initial=0) >= len(self.label_map) or label.min(initial=0) < 0:
                raise ValueError(f"label {label_path}: values outside 0..{len(self.label_map) - 1}")
            label = self.label_map[label]
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            raise ValueError(f"label {label_path} has values {np.unique(label[bad])[:5].tolist()} "
                             f"outside the {self.num_classes} classes (255 = ignore)")
        return image, label

    def __getitem__(self, index: int):
        image, label = self.load(index)
        if self.transform is not None:
            return self.transform(image, label, index=index)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(label)


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"directory not found: {path}")
    return path


def _pair(images: Sequence[Path], label_for: Callable[[Path], Path]) -> list[tuple[Path, Path]]:
    samples = []
    for img in sorted(images):
        label = label_for(img)
        if not label.is_file():
            raise FileNotFoundError(f"image {img} has no label (expected {label})")
        samples.append((img, label))
    return samples


def cityscapes(root: Path, split: str, **kw) -> SegmentationDataset:
    img_dir = _require_dir(root / "leftImg8bit" / split)
    ann_dir = _require_dir(root / "gtFine" / split)
    suffix = "_leftImg8bit.png"
    images = list(img_dir.glob(f"*/*{suffix}"))
    stems = [(img, ann_dir / img.parent.name / img.name[:-len(suffix)]) for img in images]
    have_train_ids = all(Path(f"{s}_gtFine_labelTrainIds.png").is_file() for _, s in stems)
    kind = "labelTrainIds" if have_train_ids else "labelIds"
    lookup = {img: Path(f"{stem}_gtFine_{kind}.png") for img, stem in stems}
    return SegmentationDataset(_pair(images, lookup.__getitem__), 19, CITYSCAPES_CLASSES,
                               None if have_train_ids else CITYSCAPES_ID_TO_TRAIN_ID, **kw)


def ade20k(root: Path, split: str, **kw) -> SegmentationDataset:
    sub = {"train": "training", "val": "validation"}.get(split, split)
    img_dir = _require_dir(root / "images" / sub)
    ann_dir = _require_dir(root / "annotations" / sub)
    images = [p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    return SegmentationDataset(_pair(images, lambda p: ann_dir / f"{p.stem}.png"), 150,
                               label_map=REDUCE_ZERO_LABEL, **kw)


def voc(root: Path, split: str, **kw) -> SegmentationDataset:
    list_file = _require_dir(root / "ImageSets" / "Segmentation") / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"split list not found: {list_file}")
    img_dir, ann_dir = _require_dir(root / "JPEGImages"), _require_dir(root / "SegmentationClass")
    ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    images = []
    for name in ids:
        img = img_dir / f"{name}.jpg"
        if not img.is_file():
            raise FileNotFoundError(f"{list_file} lists {name!r} but {img} does not exist")
        images.append(img)
    return SegmentationDataset(_pair(images, lambda p: ann_dir / f"{p.stem}.png"), 21,
                               VOC_CLASSES, **kw)


def folder(root: Path, split: str, num_classes: Optional[int] = None, **kw) -> SegmentationDataset:
    if num_classes is None:
        raise ValueError("the folder layout needs the class count (--num-classes)")
    img_dir = _require_dir(root / "img_dir" / split)
    ann_dir = _require_dir(root / "ann_dir" / split)
    images = [p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    return SegmentationDataset(_pair(images, lambda p: ann_dir / f"{p.stem}.png"), num_classes,
                               **kw)


DATASETS = {"cityscapes": cityscapes, "ade20k": ade20k, "voc": voc, "folder": folder}
FIXED_NUM_CLASSES = {"cityscapes": 19, "ade20k": 150, "voc": 21}


def build_dataset(name: str, root, split: str = "train", num_classes: Optional[int] = None,
                  transform: Optional[Callable] = None) -> SegmentationDataset:
    """The `split` of dataset `name` under `root`. `num_classes` is required for "folder"; for
    the others it must match the dataset's class count when given."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    known = FIXED_NUM_CLASSES.get(name)
    if known is not None and num_classes not in (None, known):
        raise ValueError(f"{name} has {known} classes, got --num-classes {num_classes}")
    root = _require_dir(Path(root))
    if name == "folder":
        return folder(root, split, num_classes, transform=transform)
    return DATASETS[name](root, split, transform=transform)
