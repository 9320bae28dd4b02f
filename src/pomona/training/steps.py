"""One epoch of training (`train_one_epoch`: forward and backward, in slices of a batch where memory asks for it)
and of validation (`predict_loader`, `validate`, `score_probs`)."""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import TrainConfig
from ..core.progress import Progress
from ..models.metrics import accuracy, macro_f1
from ..models.model import CPU_MICRO_BATCH, AppleNet, forward_in_slices
from ..models.tta import average_probs
from .distributed import SINGLE, DistContext


LOSS_EVERY = 25
"""Steps between two reads of the running training loss (each read waits for the device)."""

def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --amp on `device` (None = full precision)."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


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

