"""segops.data: each on-disk layout from a tiny generated dataset, the label mappings, the
errors that name the offending file, and the training transform."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segops.data import EvalTransform, TrainTransform, build_dataset
from segops.data.datasets import CITYSCAPES_TRAIN_LABEL_IDS

H, W = 6, 8


def _save(path: Path, array: np.ndarray, palette: bool = False) -> Path:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array.astype(np.uint8))
    if palette:
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        img.putdata(array.astype(np.uint8).ravel().tolist())
    img.save(path)
    return path


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _label(values) -> np.ndarray:
    return np.resize(np.asarray(values, dtype=np.uint8), (H, W))


def test_folder_layout(tmp_path):
    label = _label([0, 1, 2, 255])
    _save(tmp_path / "img_dir/train/b.png", _image(0))
    _save(tmp_path / "img_dir/train/a.jpg", _image(1))
    _save(tmp_path / "ann_dir/train/a.png", label)
    _save(tmp_path / "ann_dir/train/b.png", label)
    ds = build_dataset("folder", tmp_path, "train", num_classes=3)
    assert len(ds) == 2 and ds.samples[0][0].name == "a.jpg"
    img, lab = ds[1]
    assert img.shape == (3, H, W) and img.dtype == torch.uint8
    assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(_image(0)))
    assert torch.equal(lab, torch.from_numpy(label.astype(np.int64)))
    with pytest.raises(ValueError, match="num-classes"):
        build_dataset("folder", tmp_path, "train")


def test_cityscapes_layout_train_ids_and_label_ids(tmp_path):
    stem = "aachen_000000_000019"
    _save(tmp_path / f"leftImg8bit/val/aachen/{stem}_leftImg8bit.png", _image(0))
    label_ids = _label([7, 26, 0, 33, 1, 255])
    _save(tmp_path / f"gtFine/val/aachen/{stem}_gtFine_labelIds.png", label_ids)
    _, lab = build_dataset("cityscapes", tmp_path, "val")[0]
    expected = np.full((H, W), 255)
    for train_id, label_id in enumerate(CITYSCAPES_TRAIN_LABEL_IDS):
        expected[label_ids == label_id] = train_id
    assert torch.equal(lab, torch.from_numpy(expected))
    assert set(lab.unique().tolist()) == {0, 13, 18, 255}

    train_ids = _label([3, 18, 255])
    _save(tmp_path / f"gtFine/val/aachen/{stem}_gtFine_labelTrainIds.png", train_ids)
    ds = build_dataset("cityscapes", tmp_path, "val", num_classes=19)
    assert torch.equal(ds[0][1], torch.from_numpy(train_ids.astype(np.int64)))
    assert ds.class_names[13] == "car"


def test_ade20k_layout_reduces_zero_label(tmp_path):
    _save(tmp_path / "images/training/x.jpg", _image(0))
    _save(tmp_path / "annotations/training/x.png", _label([0, 1, 150, 7]))
    _, lab = build_dataset("ade20k", tmp_path, "train")[0]
    assert torch.equal(lab, torch.from_numpy(_label([255, 0, 149, 6]).astype(np.int64)))


def test_voc_layout_reads_palette_indices(tmp_path):
    (tmp_path / "ImageSets/Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("2007_000032\n")
    _save(tmp_path / "JPEGImages/2007_000032.jpg", _image(0))
    label = _label([0, 15, 20, 255])
    _save(tmp_path / "SegmentationClass/2007_000032.png", label, palette=True)
    ds = build_dataset("voc", tmp_path, "val")
    assert ds.num_classes == 21
    assert torch.equal(ds[0][1], torch.from_numpy(label.astype(np.int64)))


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="img_dir"):
        build_dataset("folder", tmp_path, "train", num_classes=3)
    _save(tmp_path / "img_dir/train/a.png", _image(0))
    (tmp_path / "ann_dir/train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"a\.png has no label"):
        build_dataset("folder", tmp_path, "train", num_classes=3)
    _save(tmp_path / "ann_dir/train/a.png", _label([0, 3]))
    ds = build_dataset("folder", tmp_path, "train", num_classes=3)
    with pytest.raises(ValueError, match=r"ann_dir/train/a\.png has values \[3\]"):
        ds[0]
    with pytest.raises(ValueError, match="has 19 classes"):
        build_dataset("cityscapes", tmp_path, "train", num_classes=5)
    with pytest.raises(ValueError, match="dataset must be one of"):
        build_dataset("coco", tmp_path)


def test_train_transform_crop_flip_pad_and_determinism():
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    label = np.tile(np.arange(30) % 4, (20, 1)).astype(np.int64)
    image[..., 0] = label * 50  # the image encodes the label, so misaligned crops would show
    transform = TrainTransform((16, 16), seed=3, ratio_range=(1.0, 1.0))
    decode = EvalTransform()
    for index in range(6):
        img, lab = transform(image, label, index=index)
        assert img.shape == (3, 16, 16) and lab.shape == (16, 16)
        recovered = torch.round((img[0] * 58.395 + 123.675) / 50).long()
        assert torch.equal(recovered, lab)
        again = transform(image, label, index=index)
        assert torch.equal(again[0], img) and torch.equal(again[1], lab)
    steps = {int(transform(image, label, index=i)[1][0, 1] - transform(image, label, index=i)[1][0, 0]) % 4
             for i in range(12)}
    assert steps == {1, 3}  # +1 along a row unflipped, -1 flipped: both happen

    small = TrainTransform((32, 40), seed=0, ratio_range=(1.0, 1.0))
    img, lab = small(image, label, index=0)
    assert img.shape == (3, 32, 40) and (lab[20:] == 255).all() and (lab[:, 30:] == 255).all()
    assert (img[:, 20:] == 0).all()
    img, lab = decode(image, label)
    assert img.shape == (3, 20, 30) and torch.equal(lab, torch.from_numpy(label))
