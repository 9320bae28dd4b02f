"""The optimiser, learning-rate schedule, loss and weight average of a training run (`fit` makes them from the
settings): two parameter groups (head and backbone), per-step schedules, label smoothing and class weights, EMA."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..models.model import AppleNet


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

