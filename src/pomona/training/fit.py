"""`fit`, the one epoch loop that full training (`train.train_and_evaluate`) and the frozen-feature fast path
(`features.train_head_on_features`) both run: seeding per epoch, the frozen epochs, EMA, validation, the kept
weights, early stopping, history.csv, the resumable state and the callbacks.

What a run does around the loop (where it writes, what it saves, who it tells, where it starts) is a `FitPlan`.
Training never imports optuna or a tracker: they attach through its `callbacks`, objects with an
`on_epoch_end(epoch, metrics)` method; raising from it stops the run (that is how a tuner prunes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import Config
from ..core.atomic import write_csv
from ..core.progress import write
from ..inference.runfiles import RunFolder
from ..models.model import AppleNet
from .distributed import SINGLE, DistContext
from .optim import create_ema, create_optimizer, create_scheduler
from .plan import EtaAfterFirstBatches
from .steps import autocast_dtype, micro_batch_size, train_one_epoch


class Callback(Protocol):
    def on_epoch_end(self, epoch: int, metrics: dict) -> None: ...


@dataclass(frozen=True)
class FitPlan:
    """How `fit` runs its loop beyond the model, the data and the settings: what it writes, saves and reports, and
    where it starts. The default prints a line per epoch and writes, saves and calls back nothing."""

    run_dir: Path | None = None
    """The run folder history.csv is written into after every epoch (None: nowhere)."""
    callbacks: Iterable[Callback] = ()
    """Told `on_epoch_end(epoch, metrics)` after every epoch; raising stops the run (how a tuner prunes)."""
    save_model: Callable[[int, nn.Module, dict], None] | None = None
    """Called with (epoch, scored model, metrics) whenever the kept epoch changes: the kept weights go here."""
    save_state: Callable[[dict], None] | None = None
    """Given the resumable state (model, optimiser, schedule, EMA, history, early stopping) after every epoch."""
    state: dict | None = None
    """A state `save_state` was given: the run continues where it stopped."""
    channels_last: bool = True
    """Batches go to the model in channels-last memory format (images; off for features)."""
    start_time: float | None = None
    """`time.perf_counter()` when the run started (default: when `fit` starts): `elapsed_seconds` counts from it."""
    quiet: bool = False
    """No line per epoch."""
    dist: DistContext = SINGLE
    """The processes under torchrun: every one trains; rank 0 alone writes, saves and calls back."""


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
        loss_fn: nn.Module, device: torch.device, plan: FitPlan = FitPlan()) -> FitResult:
    """Train `model` on `loader` ("batches in, logits out") for `cfg.train.epochs` epochs, as `plan` says.

    Every epoch: seed torch's generator and the loader's from the seed and the epoch (so epoch N draws the same
    data order, augmentation and dropout whether or not the run was interrupted before it); train, with the
    backbone frozen for the first `frozen_epochs` (always with `freeze_backbone`); score the EMA weights (or the
    weights) with `validate_fn`; write history.csv into `plan.run_dir`; hand the resumable state to
    `plan.save_state`; call the callbacks (an exception from one stops the run: that is how a tuner prunes). The
    kept weights go to `plan.save_model`: those of the last epoch (`keep='last'`: nothing is chosen on the
    validation photos), or of the best one (`keep='best'`: highest macro-F1, then lowest loss; training stops
    after `patience` epochs without a better one). `plan.state` (a saved state) continues a run where it stopped.
    With several processes rank 0 alone writes, saves and calls back.
    """
    t, state, dist = cfg.train, plan.state, plan.dist
    start_time = time.perf_counter() if plan.start_time is None else plan.start_time
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
    say = write if dist.is_main and not plan.quiet else (lambda *_: None)
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
        metrics = train_one_epoch(model, loader, optimizer, scheduler, loss_fn, device, frozen,
                                  plan.channels_last, desc=f"epoch {epoch + 1}/{t.epochs}", ema=ema, ddp=ddp,
                                  freeze_bn=t.freeze_bn, amp=amp, compiled=compiled, on_step=eta,
                                  micro_batch=micro_batch_size(t, device))
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
            if dist.is_main and plan.save_model is not None:
                plan.save_model(epoch, scored, metrics)
        say(f"epoch {epoch + 1}/{t.epochs}  loss {metrics['train_loss']:.3f}  val loss {metrics['val_loss']:.3f}  "
            f"val macro-F1 {metrics['val_macro_f1']:.3f}  acc {metrics['val_accuracy']:.3f}  "
            f"{metrics['train_images_per_s']:.1f} img/s" + ("  *" if improved and t.keep == "best" else ""))
        stop = t.keep == "best" and t.patience > 0 and epoch - best["epoch"] >= t.patience
        if dist.is_main:
            if plan.run_dir is not None:
                write_csv(RunFolder(plan.run_dir).history, pd.DataFrame(history))
            if plan.save_state is not None:
                plan.save_state({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(),
                                 "ema": ema.state_dict() if ema is not None else None,
                                 "epoch": epoch, "history": history, "best": best, "stopped": stop})
            for cb in plan.callbacks:
                cb.on_epoch_end(epoch, dict(metrics))
        if stop and epoch < t.epochs - 1:
            say(f"early stop: no better validation macro-F1 for {t.patience} epochs")
            break
    dist.barrier()  # rank 0's files are complete before any rank returns
    return FitResult(history, best, time.perf_counter() - start_time)

