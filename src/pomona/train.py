"""Training as a library of small functions; `train_and_evaluate` runs a whole run into a run folder.

A run folder holds everything needed to use or continue it:
  config.json        the full resolved Config
  split.csv          path,label,group,subset of every image (the split is never re-drawn)
  bad_images.json    files skipped as unreadable, with the reason
  history.csv        one row per epoch (losses, validation macro-F1/accuracy, learning rate, speed)
  model.safetensors  the best epoch's weights (by validation macro-F1)
  run.json           classes, preprocessing, model settings and the best epoch: with model.safetensors, all
                     that `predict`/`evaluate` need
  last.pt            the last epoch's full state (model, optimiser, schedule, early stopping), for --resume

Training never imports optuna or a tracker: they attach through `callbacks`, objects with an
`on_epoch_end(epoch, metrics)` method; raising from it stops the run (that is how a tuner prunes).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .balance import balance_training_fold, parse_mode
from .config import Config, TrainConfig
from .data import DataBundle, load_split, prepare_data
from .distributed import SINGLE, DistContext
from .datasets import (DecodedImages, ImageDataset, Preprocessing, create_eval_transform, create_train_transform,
                       resolve_preprocessing)
from .metrics import accuracy, macro_f1
from .model import AppleNet, create_model


class Callback(Protocol):
    def on_epoch_end(self, epoch: int, metrics: dict) -> None: ...


class TooManyBadImages(RuntimeError):
    """More than `max_bad_fraction` of the images could not be read."""


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_macro_f1: float
    history: list[dict] = field(default_factory=list)
    bad_images: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def create_optimizer(model: AppleNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Two parameter groups: the head at `lr`, the backbone at `lr * backbone_lr_mult`."""
    groups = [{"params": list(model.backbone.parameters()), "lr": cfg.lr * cfg.backbone_lr_mult},
              {"params": list(model.head.parameters()), "lr": cfg.lr}]
    name = cfg.optimizer.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
    weight = None
    if cfg.class_weighted_loss:
        counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
        weight = torch.tensor(len(targets) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def create_ema(model: nn.Module, ema_epochs: float, steps_per_epoch: int):
    """An exponential moving average of `model` (weights and batch-norm statistics), or None when off."""
    if ema_epochs <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    decay = 1.0 - 1.0 / max(1.0, ema_epochs * steps_per_epoch)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train_one_epoch(model: AppleNet, loader: DataLoader, optimizer, scheduler, loss_fn: nn.Module,
                    device: torch.device, backbone_frozen: bool, channels_last: bool = True,
                    desc: str = "train", ema=None, ddp: nn.Module | None = None) -> dict:
    """One pass over `loader`; a frozen backbone stays in eval mode (its batch-norm statistics are kept).

    `ddp` is the DistributedDataParallel wrapper of `model` when training runs in several processes.
    """
    forward = ddp or model
    model.train()
    if backbone_frozen:
        model.backbone.eval()
    model.set_backbone_trainable(not backbone_frozen)
    total_loss, seen, start = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=1.0, disable=None if ddp is None else True)
    for x, y in bar:
        x, y = _to_device(x, device, channels_last), y.to(device)
        loss = loss_fn(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += loss.item() * len(y)
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "train_seconds": seconds,
            "train_images_per_s": seen / max(seconds, 1e-9)}


@torch.inference_mode()
def predict_probs(model: nn.Module, loader: DataLoader, device: torch.device, tta: bool = False,
                  channels_last: bool = True, desc: str = "predict") -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (averaged with the left-right flip when `tta`) and the loader's targets."""
    model.eval()
    probs, targets = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=1.0, disable=None):
        x = _to_device(x, device, channels_last)
        p = model(x).float().softmax(-1)
        if tta:
            p = (p + model(torch.flip(x, dims=[3])).float().softmax(-1)) / 2
        probs.append(p.cpu().numpy())
        targets.append(np.asarray(y))
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(probs), np.concatenate(targets)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, tta: bool = False,
             channels_last: bool = True, dist: DistContext = SINGLE) -> dict:
    """Validation loss, macro-F1 and accuracy of `model` on a labelled loader; with several processes each
    scores its shard and the predictions of all ranks are gathered before the metrics."""
    probs, y = predict_probs(model, loader, device, tta, channels_last, desc="validate")
    if dist.enabled:
        parts = [p for p in dist.all_gather((probs, y)) if len(p[1])]
        probs, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return score_probs(probs, y)


def score_probs(probs: np.ndarray, y: np.ndarray) -> dict:
    """Validation loss, macro-F1 and accuracy from class probabilities and targets."""
    pred = probs.argmax(1)
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))
    return {"val_loss": loss, "val_macro_f1": macro_f1(y, pred), "val_accuracy": accuracy(y, pred)}


def create_loaders(bundle: DataBundle, images: DecodedImages, pre: Preprocessing, cfg: Config,
                   dist: DistContext = SINGLE) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders. With several processes, each rank gets its share of every training
    batch (same global batch size) and a disjoint shard of the validation images."""
    t = cfg.train
    train_frame, val_frame = bundle.subset("train"), bundle.subset("val")
    train_targets = bundle.targets(train_frame)
    train_transform = (create_train_transform(pre, t.hflip, t.vflip, t.rotate, t.crop_scale, t.color_jitter,
                                              rot90=t.rot90, elastic=t.elastic)
                       if t.augment else create_eval_transform(pre))
    train_set = ImageDataset(train_frame["path"], train_targets, images, train_transform)
    val_set = ImageDataset(val_frame["path"], bundle.targets(val_frame), images, create_eval_transform(pre))
    workers = cfg.data.num_workers
    common = dict(num_workers=workers, persistent_workers=workers > 0)
    batch = max(1, t.batch_size // dist.world_size)
    drop_last = len(train_set) > t.batch_size
    generator = torch.Generator()
    if dist.enabled:
        from torch.utils.data import Subset
        from torch.utils.data.distributed import DistributedSampler

        if t.weighted_sampler:
            raise ValueError("--weighted-sampler is not supported with several processes; use "
                             "--class-weighted-loss or --balance")
        sampler = DistributedSampler(train_set, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed,
                                     drop_last=drop_last)
        val_set = Subset(val_set, list(range(dist.rank, len(val_set), dist.world_size)))
    else:
        sampler = (create_weighted_sampler(train_targets, len(bundle.classes), generator) if t.weighted_sampler
                   else None)
    train_loader = DataLoader(train_set, batch_size=batch, shuffle=sampler is None, sampler=sampler,
                              drop_last=drop_last, generator=generator, **common)
    return train_loader, DataLoader(val_set, batch_size=t.batch_size * 2, shuffle=False, **common)


def create_weighted_sampler(targets: list[int], num_classes: int, generator: torch.Generator,
                            ) -> torch.utils.data.WeightedRandomSampler:
    """Draws each image with weight 1 / (its class's size), with replacement: classes come out about equally
    often. It shares the loader's generator, so the per-epoch seeding covers it."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = torch.tensor(1.0 / np.maximum(counts, 1)[targets], dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(targets), replacement=True,
                                                  generator=generator)


def balance_bundle(bundle: DataBundle, cfg: Config, run_dir: Path, write_info: bool = True) -> DataBundle:
    """Append Augmentor-generated images for the training fold (cached, see `pomona.balance`); writes
    balance.json (counts before/after, cache folder, time) into the run folder."""
    cache_dir = Path(cfg.balance.cache_dir) if cfg.balance.cache_dir else run_dir.resolve().parent / "balance-cache"
    bundle, result = balance_training_fold(bundle, cfg.balance, cfg.seed, cache_dir, cfg.data.max_pixels)
    info = {"mode": cfg.balance.mode, "operations": cfg.balance.operations, "before": result.plan.counts,
            "generated": result.plan.extra, "after": result.plan.after, "folder": str(result.folder),
            "cached": result.cached, "seconds": result.seconds,
            "images_per_s": result.images_per_s if result.seconds else None,
            "skipped_sources": result.skipped_sources}
    if not write_info:
        return bundle
    (run_dir / "balance.json").write_text(json.dumps(info, indent=2))
    tqdm.write(f"balanced the training fold: {sum(result.plan.extra.values())} generated images "
               f"({'from cache ' if result.cached else ''}{result.folder})")
    return bundle


def check_images(bundle: DataBundle, images: DecodedImages, max_bad_fraction: float) -> DataBundle:
    """Decode every image once; drop unreadable ones, or stop when too many are bad."""
    bad = images.scan(list(bundle.table["path"]), desc="decoding images")
    from .index import check_readable_classes  # a class with no readable training image is an error
    check_readable_classes(bundle.table, images.bad)
    if bad and len(bad) > max_bad_fraction * len(bundle.table):
        listing = "\n".join(f"  {p}: {images.bad[p]}" for p in bad[:10])
        raise TooManyBadImages(f"{len(bad)} of {len(bundle.table)} images cannot be read (limit "
                               f"{max_bad_fraction:.0%}; set --max-bad-fraction):\n{listing}")
    for p in bad:
        tqdm.write(f"skipping unreadable image {p}: {images.bad[p]}")
    return bundle.drop(bad)


def save_checkpoint(run_dir: Path, model: AppleNet, classes: list[str], pre: Preprocessing, cfg: Config,
                    extra: dict) -> None:
    """model.safetensors + run.json: a self-contained, loadable model."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(run_dir / "model.safetensors"))
    info = {"classes": classes, "preprocessing": pre.to_dict(),
            "model": {"name": cfg.model.name, "out_features": cfg.model.out_features, "dropout": cfg.model.dropout},
            "config": cfg.to_dict(), **extra}
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[AppleNet, dict]:
    """The best model of a run folder and its run.json (classes, preprocessing, config)."""
    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished pomona run (no run.json)")
    info = json.loads(info_path.read_text())
    m = info["model"]
    model = create_model(m["name"], len(info["classes"]), m["out_features"], m["dropout"], weights="none",
                         drop_path_rate=0.0)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    return model.to(device).eval(), info


def _write_history(run_dir: Path, history: list[dict]) -> None:
    pd.DataFrame(history).to_csv(run_dir / "history.csv", index=False)


def _wrap_ddp(model: AppleNet, device: torch.device) -> nn.Module:
    """A DistributedDataParallel wrapper over the parameters that are trainable now (re-made when the backbone
    is unfrozen, so frozen weights never receive a gradient or a weight-decay step)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)


def train_and_evaluate(cfg: Config, run_dir: str | Path, callbacks: Iterable[Callback] = (),
                       bundle: DataBundle | None = None, resume: bool = False,
                       dist: DistContext = SINGLE) -> TrainResult:
    """Train `cfg` into `run_dir`, keeping the best epoch by validation macro-F1; resume from last.pt if asked.

    Under torchrun (`dist` with several ranks) every rank trains on its share of each batch; rank 0 alone
    writes files and calls `callbacks`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start_time = time.perf_counter()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    seed_everything(cfg.seed)
    state = None
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise FileNotFoundError(f"nothing to resume in {run_dir} (no last.pt)")
        state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
        bundle = load_split(run_dir / "split.csv", state["classes"])
    elif bundle is None:
        bundle = prepare_data(cfg.data, cfg.seed)
    if dist.is_main:
        cfg.save(run_dir / "config.json")

    model = create_model(cfg.model.name, len(bundle.classes), cfg.model.out_features, cfg.model.dropout,
                         cfg.model.weights)
    pre = resolve_preprocessing(model.backbone, cfg.model.img_size)
    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not resume and parse_mode(cfg.balance.mode)[0] != "off":
        # Rank 0 generates the images once; the other ranks then find them in the cache.
        if dist.is_main:
            bundle = balance_bundle(bundle, cfg, run_dir)
        dist.barrier()
        if not dist.is_main:
            bundle = balance_bundle(bundle, cfg, run_dir, write_info=False)
    images = DecodedImages(pre, cfg.data.max_pixels, cfg.data.cache_max_mb << 20, cfg.data.cache_images)
    bundle = check_images(bundle, images, cfg.data.max_bad_fraction)
    if dist.is_main:
        if not resume:
            bundle.table.to_csv(run_dir / "split.csv", index=False)
        (run_dir / "bad_images.json").write_text(json.dumps(images.bad, indent=2))

    train_loader, val_loader = create_loaders(bundle, images, pre, cfg, dist)
    t = cfg.train
    optimizer = create_optimizer(model, t)
    scheduler = create_scheduler(optimizer, t, len(train_loader))
    ema = create_ema(model, t.ema_epochs, len(train_loader))
    loss_fn = create_loss(t, bundle.targets(bundle.subset("train")), len(bundle.classes)).to(device)
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

    ddp, ddp_frozen = None, None
    say = tqdm.write if dist.is_main else (lambda *_: None)
    for epoch in range(first_epoch, t.epochs):
        # Seeding every epoch makes the data order, augmentation and dropout of epoch N the same whether or not
        # the run was interrupted before it.
        torch.manual_seed(cfg.seed * 100_003 + epoch + 7919 * dist.rank)
        train_loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
        if dist.enabled:
            train_loader.sampler.set_epoch(epoch)
        frozen = cfg.model.freeze_backbone or epoch < t.frozen_epochs
        if dist.enabled and frozen != ddp_frozen:
            model.set_backbone_trainable(not frozen)
            ddp, ddp_frozen = _wrap_ddp(model, device), frozen
        metrics = train_one_epoch(model, train_loader, optimizer, scheduler, loss_fn, device, frozen,
                                  cfg.model.channels_last, desc=f"epoch {epoch + 1}/{t.epochs}", ema=ema,
                                  ddp=ddp)
        if dist.enabled:  # every rank's throughput adds up; the loss is averaged over ranks
            gathered = dist.all_gather((metrics["train_loss"], metrics["train_images_per_s"]))
            metrics["train_loss"] = float(np.mean([g[0] for g in gathered]))
            metrics["train_images_per_s"] = sum(g[1] for g in gathered)
        scored = model if ema is None else ema.module
        metrics.update(evaluate(scored, val_loader, device, t.tta, cfg.model.channels_last, dist))
        metrics.update(epoch=epoch, lr=optimizer.param_groups[-1]["lr"], backbone_frozen=frozen,
                       elapsed_seconds=time.perf_counter() - start_time)
        history.append(metrics)
        improved = (metrics["val_macro_f1"], -metrics["val_loss"]) > (best["val_macro_f1"], -best["val_loss"])
        if improved:
            best = {"epoch": epoch, "val_macro_f1": metrics["val_macro_f1"], "val_loss": metrics["val_loss"]}
            if dist.is_main:
                save_checkpoint(run_dir, scored, bundle.classes, pre, cfg,
                                {"best_epoch": epoch, "best_val_macro_f1": metrics["val_macro_f1"],
                                 "world_size": dist.world_size})
        say(f"epoch {epoch + 1}/{t.epochs}  loss {metrics['train_loss']:.3f}  "
                   f"val loss {metrics['val_loss']:.3f}  val macro-F1 {metrics['val_macro_f1']:.3f}  "
                   f"acc {metrics['val_accuracy']:.3f}  {metrics['train_images_per_s']:.1f} img/s"
                   + ("  *" if improved else ""))
        stop = t.patience > 0 and epoch - best["epoch"] >= t.patience
        if dist.is_main:
            _write_history(run_dir, history)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                        "epoch": epoch, "history": history, "best": best,
                        "classes": bundle.classes, "stopped": stop}, run_dir / "last.pt.tmp")
            os.replace(run_dir / "last.pt.tmp", run_dir / "last.pt")
            for cb in callbacks:
                cb.on_epoch_end(epoch, dict(metrics))
        if stop and epoch < t.epochs - 1:
            say(f"early stop: no better validation macro-F1 for {t.patience} epochs")
            break
    dist.barrier()  # rank 0's files are complete before any rank returns
    return TrainResult(run_dir, best["epoch"], best["val_macro_f1"], history, dict(images.bad),
                       time.perf_counter() - start_time)
