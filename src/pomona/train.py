"""Training as a library of small functions (the shape of flax's examples/imagenet): `create_optimizer`,
`create_scheduler`, `create_ema`, `create_loss`, `create_loaders`, `train_one_epoch`, `validate`, and `fit`, the
one epoch loop that full training (`train_and_evaluate`, below) and the frozen-feature fast path
(`features.train_head_on_features`) both run.

A run folder holds everything needed to use or continue it:
  config.json        the full resolved Config
  split.csv          path,label,group,subset of every image, absolute paths (the split is never re-drawn)
  bad_images.json    files skipped as unreadable, with the reason (kept, and added to, on --resume)
  balance.json       with --balance: counts before/after, the cache folder, time
  history.csv        one row per epoch (losses, validation macro-F1/accuracy, learning rate, speed)
  model.safetensors  the best epoch's weights (by validation macro-F1)
  run.json           classes, preprocessing, model settings and the best epoch (`pomona.checkpoint`)
  last.pt            the last epoch's full state (model, optimiser, schedule, early stopping), for --resume

Nothing is written into the run folder before everything that can be checked has been: settings, data layout,
split, every image decoded, the bad-image fraction, the model and its weights. An existing run folder is refused
unless `overwrite` (`pomona train --overwrite`), and then its old run files are removed only at that point.

Training never imports optuna or a tracker: they attach through `callbacks`, objects with an
`on_epoch_end(epoch, metrics)` method; raising from it stops the run (that is how a tuner prunes).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .atomic import write_csv, write_json
from .augment import augment_spec
from .balance import balance_training_fold, parse_mode
from .batch_augment import BatchTransform, check_device_support
from .checkpoint import (PROBE_WEIGHTS, TRAINING_STATE, check_new_run_folder, clear_run_folder,
                         load_resumable_state, load_weights, read_json_file, save_run, save_training_state,
                         save_weights)
from .config import Config, TrainConfig
from .data import DataBundle, load_split
from .datasets import DecodedImages, DeviceLoader, ImageDataset, ImageStore, RowDataset
from .distributed import SINGLE, DistContext
from .groups import prepare_run_data, write_groups
from .errors import PomonaError
from .metrics import accuracy, macro_f1
from .model import CPU_MICRO_BATCH, AppleNet, check_weights, create_model, forward_in_slices, resolve_device
from .plan import EtaAfterFirstBatches, describe_plan
from .preprocessing import Preprocessing, create_eval_transform, create_train_transform, resolve_preprocessing
from .progress import Progress, write
from .tta import average_probs, views_for


LOSS_EVERY = 25
"""Steps between two reads of the running training loss (each read waits for the device)."""


class Callback(Protocol):
    def on_epoch_end(self, epoch: int, metrics: dict) -> None: ...


class TooManyBadImages(PomonaError, RuntimeError):
    """More than `max_bad_fraction` of the images could not be read."""


@dataclass
class TrainResult:
    run_dir: Path
    kept_epoch: int
    """The epoch whose weights the run kept (the last, or with --keep best the best by validation macro-F1)."""
    kept_macro_f1: float
    """That epoch's validation macro-F1."""
    history: list[dict] = field(default_factory=list)
    bad_images: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ building blocks
def create_optimizer(model: AppleNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Two parameter groups: the head at `lr`, the backbone at `lr * backbone_lr_mult`."""
    groups = [{"params": list(model.backbone.parameters()), "lr": cfg.lr * cfg.backbone_lr_mult},
              {"params": list(model.head.parameters()), "lr": cfg.lr}]
    name = cfg.optimizer.lower()
    fused = {"fused": True} if next(model.parameters()).is_cuda and name in ("adamw", "adam") else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, alpha=0.9, eps=1e-3)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: adamw, adam, rmsprop or sgd")


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """A per-step schedule: cosine with linear warm-up, one-cycle, or constant."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total, pct_start=0.2)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if cfg.schedule == "cosine":
        warmup = int(cfg.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    raise ValueError(f"unknown schedule {cfg.schedule!r}: cosine, onecycle or constant")


def create_loss(cfg: TrainConfig, targets: list[int], num_classes: int) -> nn.Module:
    """Cross-entropy with label smoothing; with `class_weighted_loss`, weighted by inverse class frequency."""
    weight = None
    if cfg.class_weighted_loss:
        counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
        weight = torch.tensor(len(targets) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def create_ema(model: nn.Module, ema_epochs: float, steps_per_epoch: int):
    """An exponential moving average of `model` (weights and batch-norm statistics), or None when off."""
    if ema_epochs <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    decay = 1.0 - 1.0 / max(1.0, ema_epochs * steps_per_epoch)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def create_weighted_sampler(targets: list[int], num_classes: int, generator: torch.Generator,
                            ) -> torch.utils.data.WeightedRandomSampler:
    """Draws each image with weight 1 / (its class's size), with replacement: classes come out about equally
    often. It shares the loader's generator, so the per-epoch seeding covers it."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = torch.tensor(1.0 / np.maximum(counts, 1)[targets], dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(targets), replacement=True,
                                                  generator=generator)


def create_train_loader(dataset: Dataset, targets: list[int], num_classes: int, t: TrainConfig, seed: int = 0,
                        num_workers: int = 0, dist: DistContext = SINGLE) -> DataLoader:
    """The training loader of both paths (images or cached features): shuffled, or drawn by the weighted sampler,
    through its own generator, which `fit` reseeds every epoch. Workers are started anew each epoch (no
    persistent workers), so their random state, drawn from that generator, is the same for an epoch whether or
    not the run was interrupted before it. With several processes each rank gets its share of every batch."""
    generator = torch.Generator()
    drop_last = len(dataset) > t.batch_size
    if dist.enabled:
        from torch.utils.data.distributed import DistributedSampler

        if t.weighted_sampler:
            raise ValueError("--weighted-sampler is not supported with several processes; use "
                             "--class-weighted-loss or --balance")
        sampler = DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=seed, drop_last=drop_last)
    else:
        sampler = create_weighted_sampler(targets, num_classes, generator) if t.weighted_sampler else None
    return DataLoader(dataset, batch_size=max(1, t.batch_size // dist.world_size), shuffle=sampler is None,
                      sampler=sampler, drop_last=drop_last, generator=generator, num_workers=num_workers)


def create_loaders(bundle: DataBundle, images: DecodedImages, pre: Preprocessing, cfg: Config,
                   dist: DistContext = SINGLE) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders of a split; with several processes, each rank validates a disjoint shard."""
    train_frame, val_frame = bundle.subset("train"), bundle.subset("val")
    train_targets = bundle.targets(train_frame)
    train_set = ImageDataset(train_frame["path"], train_targets, images, create_train_transform(pre, augment_spec(cfg.train)))
    val_set = ImageDataset(val_frame["path"], bundle.targets(val_frame), images, create_eval_transform(pre))
    if dist.enabled:
        from torch.utils.data import Subset

        val_set = Subset(val_set, list(range(dist.rank, len(val_set), dist.world_size)))
    train_loader = create_train_loader(train_set, train_targets, len(bundle.classes), cfg.train, cfg.seed,
                                       cfg.data.num_workers, dist)
    return train_loader, DataLoader(val_set, batch_size=cfg.train.batch_size * 2, num_workers=cfg.data.num_workers)


def use_device_augment(cfg: Config, device: torch.device) -> bool:
    """Whether training decodes into an `ImageStore` and augments batches on the device (--device-augment)."""
    return cfg.train.device_augment == "on" or (cfg.train.device_augment == "auto" and device.type == "cuda")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --amp on `device` (None = full precision)."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def create_device_loaders(bundle: DataBundle, store: ImageStore, pre: Preprocessing, cfg: Config,
                          device: torch.device, dist: DistContext = SINGLE) -> tuple[DeviceLoader, DeviceLoader]:
    """The loaders of `create_loaders` for the device path: the same sampling (order, weighted sampler, ranks,
    per-epoch seeding), but of store rows, turned into model inputs on `device` (`DeviceLoader`: the uint8
    store, on the GPU when it fits, then `batch_augment` for training and the exact centre crop for validation)."""
    train_frame, val_frame = bundle.subset("train"), bundle.subset("val")
    train_targets = bundle.targets(train_frame)
    transform = BatchTransform(pre, augment_spec(cfg.train), cfg.model.channels_last)
    val_rows = RowDataset(store.rows(val_frame["path"]), bundle.targets(val_frame))
    if dist.enabled:
        from torch.utils.data import Subset

        val_rows = Subset(val_rows, list(range(dist.rank, len(val_rows), dist.world_size)))
    train_loader = create_train_loader(RowDataset(store.rows(train_frame["path"]), train_targets), train_targets,
                                       len(bundle.classes), cfg.train, cfg.seed, 0, dist)
    images = store.to_device(device)
    return (DeviceLoader(train_loader, images, store.sizes, transform.train, device, targets_on_device=True),
            DeviceLoader(DataLoader(val_rows, batch_size=cfg.train.batch_size * 2), images, store.sizes,
                         transform.eval, device))


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def freeze_batch_norm(module: nn.Module) -> None:
    """Put every batch-norm layer of `module` in eval mode: it normalises with its running statistics and keeps
    them (its affine weights still train)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def micro_batch_size(t: TrainConfig, device: torch.device) -> int:
    """`t.micro_batch`, or by default `CPU_MICRO_BATCH` on the CPU and whole batches (0) on a GPU."""
    if t.micro_batch is not None:
        return t.micro_batch
    return CPU_MICRO_BATCH if device.type == "cpu" else 0


def backward_in_slices(forward: Callable, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, size: int,
                       amp: torch.dtype | None = None, ddp: nn.Module | None = None) -> torch.Tensor:
    """Forward and backward the batch (x, y) in slices of `size` images (0 = all at once), each slice's loss
    weighted by its share of the batch (of the class weights, for a class-weighted loss): the gradients add up
    to those of the whole batch while only one slice's activations are held. Under DDP the gradients are
    reduced once, after the last slice. Returns the batch's loss, detached."""
    size = size if 0 < size < len(y) else len(y)
    weight = getattr(loss_fn, "weight", None)
    share = (weight[y] if weight is not None else torch.ones(len(y), device=y.device)).float()
    share = share / share.sum()
    total = torch.zeros((), device=y.device)
    for start in range(0, len(y), size):
        part = slice(start, start + size)
        last = start + size >= len(y)
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = loss_fn(forward(x[part]), y[part])
                loss = loss if size == len(y) else loss * share[part].sum()
            loss.backward()
        total += loss.detach().float()
    return total


def train_one_epoch(model: AppleNet, loader: DataLoader, optimizer, scheduler, loss_fn: nn.Module,
                    device: torch.device, backbone_frozen: bool, channels_last: bool = True,
                    desc: str = "train", ema=None, ddp: nn.Module | None = None, freeze_bn: bool = False,
                    amp: torch.dtype | None = None, compiled: nn.Module | None = None,
                    on_step: Callable[[int], None] | None = None, micro_batch: int = 0) -> dict:
    """One pass over `loader`; a frozen backbone stays in eval mode (its batch-norm statistics are kept), and so
    do the batch-norm layers of a fine-tuned one with `freeze_bn`.

    `ddp` is the DistributedDataParallel wrapper of `model` when training runs in several processes; `amp` the
    autocast dtype of the forward pass and loss (None = full precision); `compiled` the torch.compile'd module
    to call instead (of `model`, or of `ddp`). The loss is summed on the device and read every `LOSS_EVERY`
    steps, so the host does not wait for the device after every step. `on_step(step)` is called after each step
    (e.g. `plan.EtaAfterFirstBatches`). `micro_batch`: images per forward and backward pass
    (`backward_in_slices`) when a backbone is fine-tuned with `freeze_bn` (0 = whole batches).
    """
    forward = compiled if compiled is not None else ddp if ddp is not None else model
    model.train()
    if backbone_frozen:
        model.backbone.eval()
    elif freeze_bn:
        freeze_batch_norm(model.backbone)
    model.set_backbone_trainable(not backbone_frozen)
    total_loss, seen, start = torch.zeros((), dtype=torch.float64, device=device), 0, time.perf_counter()
    bar = Progress(loader, desc=desc, unit="batch", count=lambda batch: len(batch[1]), enabled=ddp is None)
    for step, (x, y) in enumerate(bar):
        x, y = _to_device(x, device, channels_last), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = backward_in_slices(forward, loss_fn, x, y, micro_batch if freeze_bn and not backbone_frozen else 0,
                                  amp, ddp)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += loss.detach().double() * len(y)
        seen += len(y)
        if step % LOSS_EVERY == 0:
            bar.set_postfix(loss=f"{total_loss.item() / seen:.3f}")
        if on_step is not None:
            on_step(step)
    total_loss = total_loss.item()
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "train_seconds": seconds,
            "train_images_per_s": seen / max(seconds, 1e-9)}


@torch.inference_mode()
def predict_loader(model: nn.Module, loader: DataLoader, device: torch.device, views=("identity",),
                   channels_last: bool = True, desc: str = "predict", amp: torch.dtype | None = None,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (averaged over the test-time `views`) and the loader's targets. On the CPU the model
    sees slices of `CPU_MICRO_BATCH` images: as fast, and a quarter of a batch of 32's activations."""
    model.eval()
    probs, targets = [], []

    def softmax(v: torch.Tensor) -> torch.Tensor:
        return forward_in_slices(model, v, CPU_MICRO_BATCH if device.type == "cpu" else 0).float().softmax(-1)

    for x, y in Progress(loader, desc=desc, unit="batch", count=lambda batch: len(batch[1])):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            p = average_probs(softmax, _to_device(x, device, channels_last), views)
        probs.append(p.cpu().numpy())
        targets.append(np.asarray(y))
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(probs), np.concatenate(targets)


def validate(model: nn.Module, loader: DataLoader, device: torch.device, views=("identity",),
             channels_last: bool = True, dist: DistContext = SINGLE, amp: torch.dtype | None = None) -> dict:
    """Validation loss, macro-F1 and accuracy of `model` on a labelled loader; with several processes each
    scores its shard and the predictions of all ranks are gathered before the metrics."""
    probs, y = predict_loader(model, loader, device, views, channels_last, desc="validate", amp=amp)
    if dist.enabled:
        parts = [p for p in dist.all_gather((probs, y)) if len(p[1])]
        probs, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return score_probs(probs, y)


def score_probs(probs: np.ndarray, y: np.ndarray) -> dict:
    """Validation loss, macro-F1 and accuracy from class probabilities and targets."""
    pred = probs.argmax(1)
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))
    return {"val_loss": loss, "val_macro_f1": macro_f1(y, pred), "val_accuracy": accuracy(y, pred)}


# ------------------------------------------------------------------------------------------------ the epoch loop
@dataclass
class FitResult:
    history: list[dict]
    best: dict
    """epoch, val_macro_f1 and val_loss of the kept epoch (the last, or the best with keep='best'; epoch -1 when
    no epoch ran)."""
    seconds: float


def _wrap_ddp(model: AppleNet, device: torch.device) -> nn.Module:
    """A DistributedDataParallel wrapper over the parameters that are trainable now (re-made when the backbone
    is unfrozen, so frozen weights never receive a gradient or a weight-decay step)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)


def fit(model: AppleNet, loader: DataLoader, validate_fn: Callable[[nn.Module], dict], cfg: Config,
        loss_fn: nn.Module, device: torch.device, *, run_dir: Path | None = None, callbacks: Iterable[Callback] = (),
        save_model: Callable[[int, nn.Module, dict], None] | None = None,
        save_state: Callable[[dict], None] | None = None, state: dict | None = None,
        channels_last: bool = True, start_time: float | None = None, quiet: bool = False,
        dist: DistContext = SINGLE) -> FitResult:
    """Train `model` on `loader` ("batches in, logits out") for `cfg.train.epochs` epochs.

    Every epoch: seed torch's generator and the loader's from the seed and the epoch (so epoch N draws the same
    data order, augmentation and dropout whether or not the run was interrupted before it); train, with the
    backbone frozen for the first `frozen_epochs` (always with `freeze_backbone`); score the EMA weights (or the
    weights) with `validate_fn`; write history.csv into `run_dir`; hand the resumable state to `save_state`;
    call the callbacks (an exception from one stops the run: that is how a tuner prunes). The kept weights go to
    `save_model`: those of the last epoch (`keep='last'`: nothing is chosen on the validation photos), or of the
    best one (`keep='best'`: highest macro-F1, then lowest loss; training stops after `patience` epochs without
    a better one). `state` (a saved state) continues a run where it stopped. With several processes rank 0
    alone writes, saves and calls back.
    """
    t = cfg.train
    start_time = time.perf_counter() if start_time is None else start_time
    optimizer = create_optimizer(model, t)
    scheduler = create_scheduler(optimizer, t, len(loader))
    ema = create_ema(model, t.ema_epochs, len(loader))
    history: list[dict] = []
    best = {"epoch": -1, "val_macro_f1": -1.0, "val_loss": float("inf")}
    first_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best = state["history"], state["best"]
        first_epoch = t.epochs if state["stopped"] else state["epoch"] + 1
        start_time -= history[-1]["elapsed_seconds"] if history else 0.0
    say = write if dist.is_main and not quiet else (lambda *_: None)
    amp = autocast_dtype(t.amp, device)
    ddp, ddp_frozen, compiled = None, None, None
    for epoch in range(first_epoch, t.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch + 7919 * dist.rank)
        loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
        if dist.enabled:
            loader.sampler.set_epoch(epoch)
        frozen = cfg.model.freeze_backbone or epoch < t.frozen_epochs
        if dist.enabled and frozen != ddp_frozen:
            model.set_backbone_trainable(not frozen)
            ddp, ddp_frozen, compiled = _wrap_ddp(model, device), frozen, None
        if t.compile and compiled is None:
            compiled = torch.compile(ddp if ddp is not None else model)
        eta = EtaAfterFirstBatches(len(loader), t.epochs - epoch, say) if epoch == first_epoch else None
        metrics = train_one_epoch(model, loader, optimizer, scheduler, loss_fn, device, frozen, channels_last,
                                  desc=f"epoch {epoch + 1}/{t.epochs}", ema=ema, ddp=ddp, freeze_bn=t.freeze_bn,
                                  amp=amp, compiled=compiled, on_step=eta, micro_batch=micro_batch_size(t, device))
        if dist.enabled:  # every rank's throughput adds up; the loss is averaged over ranks
            gathered = dist.all_gather((metrics["train_loss"], metrics["train_images_per_s"]))
            metrics["train_loss"] = float(np.mean([g[0] for g in gathered]))
            metrics["train_images_per_s"] = sum(g[1] for g in gathered)
        scored = model if ema is None else ema.module
        metrics.update(validate_fn(scored))
        metrics.update(epoch=epoch, lr=optimizer.param_groups[-1]["lr"], backbone_frozen=frozen,
                       elapsed_seconds=time.perf_counter() - start_time)
        history.append(metrics)
        improved = (metrics["val_macro_f1"], -metrics["val_loss"]) > (best["val_macro_f1"], -best["val_loss"])
        if t.keep == "last":
            improved = epoch == t.epochs - 1
        if improved:
            best = {"epoch": epoch, "val_macro_f1": metrics["val_macro_f1"], "val_loss": metrics["val_loss"]}
            if dist.is_main and save_model is not None:
                save_model(epoch, scored, metrics)
        say(f"epoch {epoch + 1}/{t.epochs}  loss {metrics['train_loss']:.3f}  val loss {metrics['val_loss']:.3f}  "
            f"val macro-F1 {metrics['val_macro_f1']:.3f}  acc {metrics['val_accuracy']:.3f}  "
            f"{metrics['train_images_per_s']:.1f} img/s" + ("  *" if improved and t.keep == "best" else ""))
        stop = t.keep == "best" and t.patience > 0 and epoch - best["epoch"] >= t.patience
        if dist.is_main:
            if run_dir is not None:
                write_csv(Path(run_dir) / "history.csv", pd.DataFrame(history))
            if save_state is not None:
                save_state({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                            "epoch": epoch, "history": history, "best": best, "stopped": stop})
            for cb in callbacks:
                cb.on_epoch_end(epoch, dict(metrics))
        if stop and epoch < t.epochs - 1:
            say(f"early stop: no better validation macro-F1 for {t.patience} epochs")
            break
    dist.barrier()  # rank 0's files are complete before any rank returns
    return FitResult(history, best, time.perf_counter() - start_time)


# ------------------------------------------------------------------------------------------------ a whole run
def balance_bundle(bundle: DataBundle, cfg: Config, run_dir: Path) -> tuple[DataBundle, dict]:
    """Append Augmentor-generated images for the training fold (cached outside the run folder, see
    `pomona.balance`); returns the bundle and what balance.json holds (counts before/after, cache folder, time)."""
    cache_dir = Path(cfg.balance.cache_dir) if cfg.balance.cache_dir else run_dir.resolve().parent / "balance-cache"
    bundle, result = balance_training_fold(bundle, cfg.balance, cfg.seed, cache_dir, cfg.data.max_pixels)
    write(f"balanced the training fold: {sum(result.plan.extra.values())} generated images "
          f"({'from cache ' if result.cached else ''}{result.folder})")
    return bundle, {
        "mode": cfg.balance.mode, "operations": cfg.balance.operations, "before": result.plan.counts,
        "generated": result.plan.extra, "after": result.plan.after, "folder": str(result.folder),
        "cached": result.cached, "seconds": result.seconds,
        "images_per_s": result.images_per_s if result.seconds else None, "skipped_sources": result.skipped_sources}


def check_images(bundle: DataBundle, images: DecodedImages | ImageStore, max_bad_fraction: float) -> DataBundle:
    """Decode every image once; drop unreadable ones, or stop when too many are bad."""
    bad = images.scan(list(bundle.table["path"]), desc="decoding images")
    from .index import check_readable_classes  # a class with no readable training image is an error
    check_readable_classes(bundle.table, images.bad)
    if bad and len(bad) > max_bad_fraction * len(bundle.table):
        listing = "\n".join(f"  {p}: {images.bad[p]}" for p in bad[:10])
        raise TooManyBadImages(f"{len(bad)} of {len(bundle.table)} images cannot be read (limit "
                               f"{max_bad_fraction:.0%}; set --max-bad-fraction):\n{listing}")
    for p in bad:
        write(f"skipping unreadable image {p}: {images.bad[p]}")
    return bundle.drop(bad)


def prepare_training_data(cfg: Config, bundle: DataBundle, pre: Preprocessing, run_dir: Path, balance: bool = True,
                          write_info: bool = True, dist: DistContext = SINGLE, store: bool = False,
                          ) -> tuple[DataBundle, DecodedImages | ImageStore, dict | None]:
    """The training images of a split, as both paths use them: with `cfg.balance`, the generated images appended
    to the training fold (rank 0 generates them once, the other ranks find them in the cache); then every image
    decoded once, the unreadable ones dropped. `store`: into an `ImageStore` (the device path) instead of the
    decoded-image cache. Returns the bundle, the decoded images and what balance.json holds (None without
    balancing), which goes into `run_dir` when `write_info`."""
    info = None
    if balance and parse_mode(cfg.balance.mode)[0] != "off":
        if dist.is_main:
            bundle, info = balance_bundle(bundle, cfg, run_dir)
        dist.barrier()
        if not dist.is_main:
            bundle, _ = balance_bundle(bundle, cfg, run_dir)
    if store:
        images = ImageStore(pre, cfg.data.max_pixels, cfg.data.cache_max_mb << 20)
    else:
        max_side = (cfg.data.cache_side or 2 * pre.resize_size) if cfg.train.augment else None
        images = DecodedImages(pre, cfg.data.max_pixels, cfg.data.cache_max_mb << 20, cfg.data.cache_images,
                               max_side, cfg.data.max_aspect)
    bundle = check_images(bundle, images, cfg.data.max_bad_fraction)
    if info is not None and write_info:
        write_json(run_dir / "balance.json", info)
    return bundle, images, info


def model_settings(cfg: Config) -> dict:
    """What `checkpoint` needs to rebuild the network."""
    return {"name": cfg.model.name, "out_features": cfg.model.out_features, "dropout": cfg.model.dropout}


def probe_head(model: AppleNet, bundle: DataBundle, images: DecodedImages, pre: Preprocessing, cfg: Config,
               device: torch.device, dist: DistContext = SINGLE) -> dict:
    """The linear-probe stage of LP-FT: train `model.head` on the frozen backbone's features of the training photos
    (evaluation preprocessing, and their left-right flips) with the same epoch loop, loss and sampler as training,
    for `probe_epochs`; the validation photos' features score each epoch. Returns the last epoch's metrics."""
    from torch.utils.data import TensorDataset

    from .extract import create_extractor, extract_features

    t = cfg.train
    extract, _ = create_extractor(model.backbone, pre, "torch", device, Path("."))
    train_frame, val_frame = bundle.subset("train"), bundle.subset("val")
    paths, targets = list(train_frame["path"]), bundle.targets(train_frame)
    rows = np.concatenate([extract_features(extract, paths, images, pre, view=v, desc=f"probe features ({v})")
                           for v in ("identity", "hflip")])
    rows_targets = targets * 2
    views = views_for(t.tta)
    val = {v: torch.from_numpy(extract_features(extract, list(val_frame["path"]), images, pre, view=v,
                                                desc=f"probe features, validation ({v})")) for v in views}
    val_targets = np.asarray(bundle.targets(val_frame), np.int64)
    probe = AppleNet(nn.Identity(), model.head)
    probe_cfg = Config.from_dict({**cfg.to_dict(), "train": {**cfg.train.__dict__, "epochs": t.probe_epochs,
                                                               "ema_epochs": 0.0, "frozen_epochs": 0, "keep": "last"}})
    probe_cfg.model.freeze_backbone = True
    loader = create_train_loader(TensorDataset(torch.from_numpy(rows), torch.tensor(rows_targets)), rows_targets,
                                 len(bundle.classes), probe_cfg.train, cfg.seed)
    loss_fn = create_loss(t, rows_targets, len(bundle.classes)).to(device)

    @torch.inference_mode()
    def validate_probe(scored: nn.Module) -> dict:
        if not len(val_targets):
            return {"val_loss": float("nan"), "val_macro_f1": float("nan"), "val_accuracy": float("nan")}
        scored.eval()
        probs = average_probs(lambda v: scored.head(val[v].to(device)).float().softmax(-1), None, views,
                              view=lambda _, v: v)
        return score_probs(probs.cpu().numpy(), val_targets)

    result = fit(probe, loader, validate_probe, probe_cfg, loss_fn, device, channels_last=False, quiet=True,
                 dist=SINGLE)
    last = result.history[-1] if result.history else {}
    if dist.is_main and last:
        write(f"probe ({t.probe_epochs} epochs on frozen features): val macro-F1 {last['val_macro_f1']:.3f}")
    return last


def interpolate_weights(start: dict, end: dict, alpha: float) -> dict:
    """WiSE-FT: (1 - alpha) * start + alpha * end for every floating-point tensor (others from `end`)."""
    return {k: (start[k].to(v.device, torch.float32) * (1 - alpha) + v.float() * alpha).to(v.dtype)
            if v.is_floating_point() else v for k, v in end.items()}


def train_and_evaluate(cfg: Config, run_dir: str | Path, callbacks: Iterable[Callback] = (),
                       bundle: DataBundle | None = None, resume: bool = False,
                       dist: DistContext = SINGLE, overwrite: bool = False) -> TrainResult:
    """Train `cfg` into `run_dir` and keep the last epoch (or, with `keep='best'`, the best by validation
    macro-F1); resume from last.pt if asked.

    When the backbone is fine-tuned with `head_init='probe'`, the head is first trained on the frozen backbone's
    features (`probe_head`), and with `wise_alpha < 1` the kept weights are interpolated towards those of the
    probe (WiSE-FT). A new run checks everything (data, split, images, bad-image fraction, model and weights) before
    it writes anything into `run_dir`; an existing run folder there is refused (RunFolderError) unless `overwrite`,
    and then its run files are removed just before the new ones are written. Under torchrun (`dist` with several
    ranks) every rank trains on its share of each batch; rank 0 alone writes files and calls `callbacks`.
    """
    run_dir = Path(run_dir)
    start_time = time.perf_counter()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    if use_device_augment(cfg, device):  # what the device path cannot do is refused before any work
        check_device_support(augment_spec(cfg.train), cfg.train.device_augment)
    seed_everything(cfg.seed)
    check_weights(cfg.model.name, cfg.model.weights)  # offline, a model without packaged weights fails at once
    state = None
    if resume:
        state = load_resumable_state(run_dir)
        bundle = load_split(run_dir / "split.csv", state["classes"])
    else:
        check_new_run_folder(run_dir, overwrite)
        if bundle is None:
            bundle = prepare_run_data(cfg)
        bundle = bundle.with_absolute_paths()

    model = create_model(cfg.model.name, len(bundle.classes), cfg.model.out_features, cfg.model.dropout,
                         cfg.model.weights)
    pre = resolve_preprocessing(model.backbone, cfg.model.img_size)
    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    device_augment = use_device_augment(cfg, device)
    bundle, images, balance_info = prepare_training_data(cfg, bundle, pre, run_dir, balance=not resume,
                                                         write_info=False, dist=dist, store=device_augment)
    if dist.is_main:
        write(describe_plan(bundle, cfg, device))
    bad = dict(images.bad)
    if dist.is_main:  # everything checked: only now is the run folder touched
        if resume:
            bad_path = run_dir / "bad_images.json"
            bad = {**(read_json_file(bad_path) if bad_path.is_file() else {}), **bad}
        else:
            if overwrite:
                clear_run_folder(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / "config.json")
            write_csv(run_dir / "split.csv", bundle.table)
            write_groups(run_dir, bundle.table, bundle.grouping, cfg.data)
            if balance_info is not None:
                write_json(run_dir / "balance.json", balance_info)
        write_json(run_dir / "bad_images.json", bad)

    t = cfg.train
    probed = not cfg.model.freeze_backbone and t.head_init == "probe"
    extra: dict = {"keep": t.keep, "selected_on": "val" if t.keep == "best" else None,
                   "world_size": dist.world_size}
    if probed and state is None:
        probe_metrics = probe_head(model, bundle, images, pre, cfg, device, dist)
        extra["probe_val_macro_f1"] = probe_metrics.get("val_macro_f1")
        if dist.is_main:
            save_weights(run_dir / PROBE_WEIGHTS, model)
    wise = probed and t.wise_alpha < 1.0
    if wise:
        dist.barrier()  # rank 0 has written the probe's weights
    probe_state = load_weights(run_dir / PROBE_WEIGHTS) if wise else None

    if device_augment:
        train_loader, val_loader = create_device_loaders(bundle, images, pre, cfg, device, dist)
    else:
        train_loader, val_loader = create_loaders(bundle, images, pre, cfg, dist)
    loss_fn = create_loss(t, bundle.targets(bundle.subset("train")), len(bundle.classes)).to(device)
    views, channels_last = views_for(t.tta), cfg.model.channels_last
    amp = autocast_dtype(t.amp, device)

    def validate_model(m: nn.Module) -> dict:
        return validate(m, val_loader, device, views, channels_last, dist, amp)

    def save_model(epoch: int, scored: nn.Module, metrics: dict) -> None:
        info = {**extra, "kept_epoch": epoch, "val_macro_f1": metrics["val_macro_f1"]}
        if wise:
            scored = copy.deepcopy(scored)
            scored.load_state_dict(interpolate_weights(probe_state, scored.state_dict(), t.wise_alpha))
            info.update(wise_alpha=t.wise_alpha, val_macro_f1=validate_model(scored)["val_macro_f1"])
        save_run(run_dir, scored, bundle.classes, pre, model_settings(cfg), cfg.to_dict(), info)

    def save_state(training_state: dict) -> None:
        save_training_state(run_dir / TRAINING_STATE, {**training_state, "classes": bundle.classes})

    result = fit(model, train_loader, validate_model, cfg, loss_fn, device, run_dir=run_dir, callbacks=callbacks,
                 save_model=save_model, save_state=save_state, state=state, channels_last=channels_last,
                 start_time=start_time, dist=dist)
    return TrainResult(run_dir, result.best["epoch"], result.best["val_macro_f1"], result.history,
                       bad, result.seconds)
