"""A generated toy dataset in the `folder` layout, for smoke runs of training and evaluation.

Each image is a noisy gray background (class 0) with a few rectangles and discs; a shape's
class sets its colour (plus noise), so the task is learnable in a few hundred iterations. A
one-pixel ring around every disc is labelled 255 (ignore).

    python -m segops.data.toy --out DIR [--num-classes 4] [--train 64] [--val 16] [--size 96 96]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

IGNORE_INDEX = 255


def _palette(num_classes: int) -> np.ndarray:
    rng = np.random.default_rng(1234)
    colours = rng.integers(40, 216, size=(num_classes, 3))
    colours[0] = 128
    return colours


def toy_sample(rng: np.random.Generator, num_classes: int, size=(96, 96)):
    """(image (H, W, 3) uint8, label (H, W) uint8)."""
    h, w = size
    palette = _palette(num_classes)
    label = np.zeros((h, w), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(int(rng.integers(2, 6))):
        cls = int(rng.integers(1, num_classes))
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        r = int(rng.integers(min(h, w) // 10, min(h, w) // 4))
        if rng.random() < 0.5:
            label[max(cy - r, 0):cy + r, max(cx - r, 0):cx + r] = cls
        else:
            dist = np.hypot(yy - cy, xx - cx)
            label[dist < r] = cls
            label[(dist >= r) & (dist < r + 1)] = IGNORE_INDEX
    shown = np.where(label == IGNORE_INDEX, 0, label)
    image = palette[shown] + rng.normal(0, 20, size=(h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_toy_dataset(root, num_classes: int = 4, train: int = 64, val: int = 16,
                     size=(96, 96), seed: int = 0) -> Path:
    """Write img_dir/{train,val}/*.png and ann_dir/{train,val}/*.png under `root`."""
    from PIL import Image
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        (root / "img_dir" / split).mkdir(parents=True, exist_ok=True)
        (root / "ann_dir" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label = toy_sample(rng, num_classes, size)
            Image.fromarray(image).save(root / "img_dir" / split / f"{i:05d}.png")
            Image.fromarray(label).save(root / "ann_dir" / split / f"{i:05d}.png")
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--val", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=(96, 96), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_toy_dataset(args.out, args.num_classes, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.train} train and {args.val} val samples to {args.out}")


if __name__ == "__main__":
    main()
