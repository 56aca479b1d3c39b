"""Evaluate a segmentation model: mIoU, per-class IoU and accuracy, pixel accuracy.

    python -m segops.evaluate --model NAME --checkpoint PATH --dataset folder --data-root DIR \
        --num-classes N [--split val] [--mode whole|slide --crop-size H W --stride H W] \
        [--out FILE.json]

Under `torchrun --nproc_per_node=P -m segops.evaluate ...` each process evaluates a shard of the
images and the confusion matrices are summed. Metrics are in percent; classes absent from both
the labels and the predictions have IoU NaN (null in the JSON) and are left out of the means.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segops import BACKENDS
from segops import distributed as segdist
from segops.data import DATASETS, EvalTransform, build_dataset
from segops.data.datasets import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction;
    pixels labelled 255 are left out."""
    valid = label != IGNORE_INDEX
    index = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def metrics_from_confusion(confusion: torch.Tensor, class_names: Sequence[str]) -> dict:
    cm = confusion.double()
    true_pos = cm.diag()
    gt_total, pred_total = cm.sum(1), cm.sum(0)
    union = gt_total + pred_total - true_pos
    iou = true_pos / union  # 0/0 = NaN: the class is in neither the labels nor the predictions
    acc = true_pos / gt_total

    def percent(x: torch.Tensor) -> Optional[float]:
        return None if math.isnan(x.item()) else 100.0 * x.item()

    return {
        "mIoU": percent(iou.nanmean()),
        "mAcc": percent(acc.nanmean()),
        "aAcc": percent(true_pos.sum() / cm.sum()),
        "per_class": {name: {"IoU": percent(iou[i]), "Acc": percent(acc[i])}
                      for i, name in enumerate(class_names)},
        "num_pixels": int(confusion.sum()),
    }


def format_table(results: dict) -> str:
    def cell(v):
        return "   nan" if v is None else f"{v:6.2f}"

    width = max(len("class"), *(len(n) for n in results["per_class"]))
    lines = [f"{'class':<{width}}     IoU     Acc"]
    for name, m in results["per_class"].items():
        lines.append(f"{name:<{width}}  {cell(m['IoU'])}  {cell(m['Acc'])}")
    lines.append(f"mIoU {cell(results['mIoU'])}  mAcc {cell(results['mAcc'])}  "
                 f"aAcc {cell(results['aAcc'])}")
    return "\n".join(lines)


def slide_logits(model: nn.Module, img: torch.Tensor, num_classes: int, crop_size,
                 stride) -> torch.Tensor:
    """mmseg's slide inference: logits of overlapping `crop_size` windows every `stride`,
    averaged where windows overlap (a window past the border is shifted back inside)."""
    n, _, h, w = img.shape
    (ch, cw), (sh, sw) = crop_size, stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    logits = img.new_zeros((n, num_classes, h, w))
    count = img.new_zeros((1, 1, h, w))
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, max(h - ch, 0)), min(c * sw, max(w - cw, 0))
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            logits[:, :, y1:y2, x1:x2] += model(img[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


@torch.no_grad()
def evaluate(model: nn.Module, dataset, device: torch.device, mode: str = "whole",
             crop_size=None, stride=None, amp: bool = False,
             rank: int = 0, world_size: int = 1) -> dict:
    """Metrics of `model` on `dataset` (items: normalized image, label); process `rank` of
    `world_size` takes images rank, rank + world_size, ... and the confusion matrices are
    summed over processes."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and (crop_size is None or stride is None):
        raise ValueError("slide mode needs crop_size and stride")
    model.eval()
    num_classes = dataset.num_classes
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for index in range(rank, len(dataset), world_size):
        img, label = dataset[index]
        img, label = img[None].to(device), label.to(device)
        with torch.autocast(device.type, enabled=amp):
            if mode == "slide":
                logits = slide_logits(model, img, num_classes, crop_size, stride)
            else:
                logits = model(img)
        if logits.shape[2:] != label.shape:
            logits = F.interpolate(logits.float(), size=label.shape, mode="bilinear",
                                   align_corners=False)
        confusion += confusion_matrix(logits.argmax(1)[0], label, num_classes)
    return metrics_from_confusion(segdist.all_reduce_sum(confusion).cpu(), dataset.class_names)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with segops.train."""
    parser.add_argument("--model", required=True, help="a name of segops.models.list_models()")
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--num-classes", type=int, default=None,
                        help="class count (required for the folder layout)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--backend", default="auto", choices=("auto",) + tuple(BACKENDS))
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per process (torch.set_num_threads)")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="import MODULE first (to register more models)")


def prepare(args: argparse.Namespace) -> None:
    """Apply --threads and --import."""
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.imports:
        importlib.import_module(name)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Evaluate a segops model (mIoU).")
    add_model_arguments(parser)
    parser.add_argument("--checkpoint", required=True,
                        help="a segops.train checkpoint or a state_dict file")
    parser.add_argument("--split", default="val")
    parser.add_argument("--mode", default="whole", choices=("whole", "slide"))
    parser.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--out", help="write the metrics to this JSON file")
    args = parser.parse_args(argv)
    prepare(args)
    from segops.models import build

    info = segdist.setup(args.device)
    try:
        dataset = build_dataset(args.dataset, args.data_root, args.split, args.num_classes,
                                transform=EvalTransform())
        model = build(args.model, num_classes=dataset.num_classes, backend=args.backend,
                      pretrained=args.checkpoint).to(info.device)
        results = evaluate(model, dataset, info.device, args.mode, args.crop_size, args.stride,
                           args.amp, info.rank, info.world_size)
        results.update(model=args.model, checkpoint=str(args.checkpoint), split=args.split,
                       mode=args.mode, num_images=len(dataset))
        if info.is_main:
            print(format_table(results))
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        segdist.cleanup()
    return results


if __name__ == "__main__":
    main()
