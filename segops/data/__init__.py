"""Datasets in the standard on-disk layouts and the training / evaluation transforms.

`build_dataset(name, root, split, num_classes=None, transform=None)` for name in DATASETS:
"cityscapes", "ade20k", "voc", "folder". Nothing is downloaded.
"""
from segops.data.datasets import DATASETS, SegmentationDataset, build_dataset
from segops.data.transforms import EvalTransform, TrainTransform

__all__ = ["DATASETS", "SegmentationDataset", "build_dataset", "TrainTransform", "EvalTransform"]
