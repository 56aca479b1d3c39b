"""Train a segops model: iteration-based, poly learning rate, checkpoints with exact resume.

    python -m segops.train --model NAME --dataset folder --data-root DIR --num-classes N \
        --iters 400 --batch-size 4 --crop-size 64 64 --work-dir WORK [--resume WORK/latest.pth]
    torchrun --nproc_per_node=P -m segops.train ...   (DistributedDataParallel, batch P x B)

The loss is the model's own `loss_terms` (segops.models.losses); the optimizer and schedule
follow the model's reference config (RECIPES). The work dir receives log.jsonl (one JSON object
per logged iteration), iter_<k>.pth every --checkpoint-interval iterations and at the end, and
latest.pth. A checkpoint holds the model ("state_dict", loadable by
`segops.models.build(..., pretrained=PATH)`), the optimizer, the schedule, the loss state (memory
banks), the iteration and every process's RNG states, so `--resume` continues with the losses an
uninterrupted run would have had (given the seed; data augmentation is seeded per sample).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from segops import distributed as segdist
from segops.data import TrainTransform, build_dataset
from segops.evaluate import add_model_arguments, prepare
from segops.models.losses import Criterion


@dataclass(frozen=True)
class Recipe:
    """Optimizer and learning-rate schedule: linear warmup from lr * warmup_ratio over
    `warmup_iters`, then poly decay to `min_lr` with `power` (mmseg's PolyLR)."""

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple = (0.9, 0.999)
    power: float = 0.9
    min_lr: float = 1e-4
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    head_lr_mult: float = 1.0  # learning-rate multiplier of decode_head.* parameters
    backbone_lr_mult: float = 1.0  # learning-rate multiplier of backbone.* parameters
    no_decay_keys: tuple = ()  # no weight decay on parameters whose name contains one of these


# Swin-style backbones with UperNet / FPN heads (Swin's segmentation configs, which Focal
# Transformer and the Local-to-Global paper follow): no weight decay on these parameters.
_WINDOW_NO_DECAY = ("absolute_pos_embed", "norm", "relative_position_bias_table")
_SWIN_UPERNET = Recipe("adamw", lr=6e-5, weight_decay=0.01, power=1.0, min_lr=0.0,
                       warmup_iters=1500, no_decay_keys=_WINDOW_NO_DECAY)
# mmseg's real-time configs: linear warmup from 0.1 x lr over 1000 iterations, then poly 0.9.
_REALTIME_WARMUP = dict(warmup_iters=1000, warmup_ratio=0.1)

# Model-name prefix -> the reference config's optimizer and schedule (mmseg's configs; the
# dilated-FCN family, ICNet and anything not listed: SGD 0.01, momentum 0.9, wd 5e-4, poly 0.9).
RECIPES = {
    "segformer_": Recipe("adamw", lr=6e-5, weight_decay=0.01, power=1.0, min_lr=0.0,
                         warmup_iters=1500, head_lr_mult=10.0, no_decay_keys=("pos_block", "norm")),
    "upernet_swin": _SWIN_UPERNET,
    "upernet_focal": _SWIN_UPERNET,
    "lg-": _SWIN_UPERNET,
    "segmenter_": Recipe("sgd", lr=0.001, weight_decay=0.0),
    "sdn-segmenter_": Recipe("sgd", lr=0.001, weight_decay=0.0),
    "bisenetv1_r18-d32": Recipe("sgd", lr=0.025, **_REALTIME_WARMUP),
    "bisenetv2_": Recipe("sgd", lr=0.05, **_REALTIME_WARMUP),
    "stdc": Recipe("sgd", lr=0.01, **_REALTIME_WARMUP),
    # SeMask-FPN's configs (SeMask-Segmentation/SeMask-FPN/configs/semask_swin/ade20k)
    "semask-fpn_": Recipe("adamw", lr=1e-4, weight_decay=1e-4, power=1.0, min_lr=0.0,
                          warmup_iters=1500, no_decay_keys=_WINDOW_NO_DECAY),
    # Mask2Former's ADE20K solver (WarmupPolyLR without warmup, backbone multiplier 0.1, no decay
    # on normalization layers, embeddings and Swin's position tables); its full-model gradient
    # clipping (0.01) is not part of a Recipe.
    "semask-mask2former": Recipe("adamw", lr=1e-4, weight_decay=0.05, power=0.9, min_lr=0.0,
                                 backbone_lr_mult=0.1,
                                 no_decay_keys=_WINDOW_NO_DECAY + ("query_feat", "query_embed",
                                                                   "predictor.level_embed")),
}


def recipe_for(model_name: str) -> Recipe:
    for prefix, recipe in RECIPES.items():
        if model_name.startswith(prefix):
            return recipe
    return Recipe()


def lr_factor(recipe: Recipe, it: int, total: int) -> float:
    """The learning rate at iteration `it` divided by recipe.lr."""
    if it < recipe.warmup_iters:
        return recipe.warmup_ratio + (1 - recipe.warmup_ratio) * it / recipe.warmup_iters
    span = max(total - recipe.warmup_iters, 1)
    progress = min((it - recipe.warmup_iters) / span, 1.0)
    lr = (recipe.lr - recipe.min_lr) * (1 - progress) ** recipe.power + recipe.min_lr
    return lr / recipe.lr


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = recipe.lr * (recipe.head_lr_mult if name.startswith("decode_head.") else
                          recipe.backbone_lr_mult if name.startswith("backbone.") else 1.0)
        wd = 0.0 if any(key in name for key in recipe.no_decay_keys) else recipe.weight_decay
        groups.setdefault((lr, wd), []).append(param)
    params = [{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, betas=recipe.betas)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (after `skip` of this process's
    samples), so a resumed run sees the batches an uninterrupted one would."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(_as_tuples(state["python"]))


def parameter_fingerprint(model: nn.Module) -> list[float]:
    """The fp64 sum of each parameter: equal on every process of a healthy DDP run."""
    return [p.detach().double().sum().item() for p in model.parameters()]


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class Progress:
    """One status line (redrawn on a terminal, printed every `every` iterations otherwise)."""

    def __init__(self, total: int, start: int, every: int) -> None:
        self.total, self.start, self.every = total, start, every
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, it: int, loss: float, lr: float) -> None:
        if not self.tty and it % self.every and it != self.total:
            return
        done = it - self.start
        speed = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = int((self.total - it) / max(speed, 1e-9))
        bar = "#" * (20 * it // self.total)
        line = (f"[{bar:<20}] {it}/{self.total} loss {loss:.4f} lr {lr:.3g} "
                f"{speed:.2f} it/s eta {eta // 60}:{eta % 60:02d}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)
        if self.tty and it == self.total:
            print(file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a segops model.")
    add_model_arguments(parser)
    parser.add_argument("--split", default="train", help="the training split (VOC: a list name)")
    parser.add_argument("--iters", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--crop-size", type=int, nargs=2, required=True, metavar=("H", "W"))
    parser.add_argument("--lr", type=float, default=None,
                        help="base learning rate (default: the model's recipe)")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                        help="default: the model's recipe")
    parser.add_argument("--warmup-iters", type=int, default=None)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--resume", default=None, help="a checkpoint written by segops.train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers per process")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--checkpoint-interval", type=int, default=1000)
    return parser.parse_args(argv)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _loader(dataset, sampler, args, epoch: int) -> DataLoader:
    # A generator of its own: creating the loader's iterator must not draw from the global RNG,
    # or a resumed run (one more iterator) would drift from an uninterrupted one.
    generator = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                      num_workers=args.workers, drop_last=True, generator=generator,
                      pin_memory=torch.cuda.is_available())


def train(args: argparse.Namespace) -> list[float]:
    """Run the training `args` describes; returns the losses of the iterations it ran (this
    process's, before averaging over processes)."""
    prepare(args)
    from segops.models import build

    info = segdist.setup(args.device)
    _seed_everything(args.seed)
    recipe = recipe_for(args.model)
    overrides = {k: v for k, v in (("lr", args.lr), ("optimizer", args.optimizer),
                                   ("warmup_iters", args.warmup_iters)) if v is not None}
    recipe = replace(recipe, **overrides)

    transform = TrainTransform(args.crop_size, seed=args.seed)
    dataset = build_dataset(args.dataset, args.data_root, args.split, args.num_classes,
                            transform)
    model = build(args.model, num_classes=dataset.num_classes, backend=args.backend)
    if info.distributed and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(info.device)
    criterion = Criterion(model.loss_terms).to(info.device)
    optimizer = build_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(recipe, it, args.iters))
    scaler = torch.amp.GradScaler(enabled=args.amp and info.device.type == "cuda")

    sampler = ResumableSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                               shuffle=True, seed=args.seed, drop_last=True)
    per_epoch = len(sampler) // args.batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} training images are fewer than one batch of "
                         f"{args.batch_size} on each of {info.world_size} processes")

    start = 0
    if args.resume:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        criterion.load_state_dict(ckpt["criterion"])
        scaler.load_state_dict(ckpt["scaler"])
        start = ckpt["iter"]
        states = ckpt["rng"]
        if len(states) != info.world_size:
            raise ValueError(f"{args.resume} was written by {len(states)} processes, this run "
                             f"has {info.world_size}")
        set_rng_state(states[info.rank])

    net = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    work_dir = Path(args.work_dir)
    if info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
    log = open(work_dir / "log.jsonl", "a") if info.is_main else None
    progress = Progress(args.iters, start, args.log_interval) if info.is_main else None

    def save(it: int) -> None:
        states = segdist.all_gather_objects(rng_state())
        fingerprints = segdist.all_gather_objects(parameter_fingerprint(model))
        if info.is_main and any(f != fingerprints[0] for f in fingerprints):
            print(f"warning: parameters differ between processes at iteration {it}",
                  file=sys.stderr)
        if not info.is_main:
            return
        ckpt = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "criterion": criterion.state_dict(),
                "scaler": scaler.state_dict(), "iter": it, "rng": states,
                "parameter_fingerprints": fingerprints,
                "model": args.model, "num_classes": dataset.num_classes}
        torch.save(ckpt, work_dir / f"iter_{it}.pth")
        torch.save(ckpt, work_dir / "latest.pth")

    losses = []
    it = start
    net.train()
    criterion.train()
    t_data = time.perf_counter()
    try:
        while it < args.iters:
            epoch, done_in_epoch = divmod(it, per_epoch)
            sampler.set_epoch(epoch)
            sampler.skip = done_in_epoch * args.batch_size
            transform.epoch = epoch
            for img, label in _loader(dataset, sampler, args, epoch):
                data_time = time.perf_counter() - t_data
                img = img.to(info.device, non_blocking=True)
                label = label.to(info.device, non_blocking=True)
                with torch.autocast(info.device.type, enabled=args.amp):
                    outputs = net(img)
                loss, parts = criterion(outputs, label.long())
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                it += 1
                losses.append(loss.item())
                if it % args.log_interval == 0 or it == args.iters:
                    _log(log, progress, it, loss, parts, optimizer, data_time, info)
                if it % args.checkpoint_interval == 0 or it == args.iters:
                    save(it)
                t_data = time.perf_counter()
                if it >= args.iters:
                    break
    finally:
        if log:
            log.close()
        # DDP's reducer holds the process group; if it drops the last reference, the gloo
        # group's destructor joins its worker threads with the GIL held while a worker waits for
        # the GIL to free a finished collective's tensors: a deadlock (seen at exit). Free the
        # wrapper first, so destroy_process_group (whose destructor releases the GIL) ends it.
        del net
        gc.collect()
        segdist.cleanup()
    return losses


def _log(log, progress, it, loss, parts, optimizer, data_time, info) -> None:
    values = torch.stack([loss.detach().float()] + [v.float() for v in parts.values()])
    values = segdist.all_reduce_sum(values) / info.world_size
    if not info.is_main:
        return
    lr = optimizer.param_groups[0]["lr"]
    record = {"iter": it, "loss": values[0].item(), "lr": lr, "data_time": round(data_time, 4),
              "time": time.time()}
    record.update({k: v.item() for k, v in zip(parts, values[1:])})
    if not math.isfinite(record["loss"]):
        print(f"warning: loss is {record['loss']} at iteration {it}", file=sys.stderr)
    log.write(json.dumps(record) + "\n")
    log.flush()
    progress.update(it, record["loss"], lr)


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
