"""A whole training run, `train_and_evaluate`. Training is a library of small functions (the shape of flax's
examples/imagenet): `optim.create_optimizer`, `create_scheduler`, `create_ema`, `create_loss`;
`loaders.create_loaders`; `steps.train_one_epoch`, `validate`; and `fit.fit`, the one epoch loop that full
training (here) and the frozen-feature fast path (`features.train_head_on_features`) both run.

A run folder holds everything needed to use or continue it:
  config.json        the full resolved Config
  split.csv          path,label,group,subset of every image, absolute paths (the split is never re-drawn)
  bad_images.json    files skipped as unreadable, with the reason (kept, and added to, on --resume)
  balance.json       with --balance: counts before/after, the cache folder, time
  history.csv        one row per epoch (losses, validation macro-F1/accuracy, learning rate, speed)
  model.safetensors  the best epoch's weights (by validation macro-F1)
  run.json           classes, preprocessing, model settings and the best epoch (`pomona.inference.runfolder`)
  last.pt            the last epoch's full state (model, optimiser, schedule, early stopping), for --resume

Nothing is written into the run folder before everything that can be checked has been: settings, data layout,
split, every image decoded, the bad-image fraction, the model and its weights. An existing run folder is refused
unless `overwrite` (`pomona train --overwrite`), and then its old run files are removed only at that point.

Training never imports optuna or a tracker: they attach through `callbacks` (`fit.Callback`).
"""


from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..core.atomic import write_csv, write_json
from ..core.errors import PomonaError
from ..core.progress import write
from ..data.augment import augment_spec
from ..data.balance import balance_training_fold, parse_mode
from ..data.batch_augment import check_device_support
from ..data.bundle import DataBundle, load_split
from ..data.groups import write_groups
from ..data.preprocessing import Preprocessing, resolve_preprocessing
from ..inference.runfiles import RunFolder
from ..inference.runfolder import (check_new_run_folder, clear_run_folder, load_weights, save_run,
                                   save_training_state, save_weights)
from ..models.model import AppleNet, check_weights, create_model, resolve_device
from ..models.tta import average_probs, views_for
from .datasets import DecodedImages, ImageStore
from .distributed import SINGLE, DistContext
from .fit import Callback, FitPlan, fit
from .grouping import prepare_run_data
from .loaders import create_device_loaders, create_loaders, create_train_loader, use_device_augment
from .optim import create_loss
from .plan import describe_plan
from .steps import autocast_dtype, score_probs, validate


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

# ------------------------------------------------------------------------------------------------ a whole run
def balance_bundle(bundle: DataBundle, cfg: Config, run_dir: Path) -> tuple[DataBundle, dict]:
    """Append Augmentor-generated images for the training fold (cached outside the run folder, see
    `pomona.data.balance`); returns the bundle and what balance.json holds (counts before/after, cache folder, time)."""
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
    from ..data.index import check_readable_classes  # a class with no readable training image is an error
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
        write_json(RunFolder(run_dir).balance, info)
    return bundle, images, info


def model_settings(cfg: Config) -> dict:
    """What `inference.runfolder` records to rebuild the network (run.json `model`)."""
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

    result = fit(probe, loader, validate_probe, probe_cfg, loss_fn, device,
                 FitPlan(channels_last=False, quiet=True, dist=SINGLE))
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
    folder = RunFolder(run_dir)
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
        state = folder.read_training_state()
        bundle = load_split(folder.split, state["classes"])
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
            bad = {**folder.read_bad_images(), **bad}
        else:
            if overwrite:
                clear_run_folder(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(folder.config)
            write_csv(folder.split, bundle.table)
            write_groups(run_dir, bundle.table, bundle.grouping, cfg.data)
            if balance_info is not None:
                write_json(folder.balance, balance_info)
        write_json(folder.bad_images, bad)

    t = cfg.train
    probed = not cfg.model.freeze_backbone and t.head_init == "probe"
    extra: dict = {"keep": t.keep, "selected_on": "val" if t.keep == "best" else None,
                   "world_size": dist.world_size}
    if probed and state is None:
        probe_metrics = probe_head(model, bundle, images, pre, cfg, device, dist)
        extra["probe_val_macro_f1"] = probe_metrics.get("val_macro_f1")
        if dist.is_main:
            save_weights(folder.probe, model)
    wise = probed and t.wise_alpha < 1.0
    if wise:
        dist.barrier()  # rank 0 has written the probe's weights
    probe_state = load_weights(folder.probe) if wise else None

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
        save_training_state(folder.last, {**training_state, "classes": bundle.classes})

    plan = FitPlan(run_dir=run_dir, callbacks=callbacks, save_model=save_model, save_state=save_state, state=state,
                   channels_last=channels_last, start_time=start_time, dist=dist)
    result = fit(model, train_loader, validate_model, cfg, loss_fn, device, plan)
    return TrainResult(run_dir, result.best["epoch"], result.best["val_macro_f1"], result.history,
                       bad, result.seconds)
