"""The frozen-backbone fast path: backbone features computed once, cached on disk, and heads trained on them.

With a frozen backbone (the original system's recipe) every epoch of `train_and_evaluate` runs the same backbone
over the same images. Here the pooled features of every training and validation image (and of the validation
images' test-time views, e.g. their left-right flips) are computed once, in batches, with ONNX Runtime on CPU
(measured ~2-4x faster than eager PyTorch there) or PyTorch, and kept in `CACHE/<model>-<key>.npz`, keyed by the
model name, the backbone's weights, the preprocessing, the views and the image list (paths, sizes, modification
times). `train_head_on_features` then runs training's own epoch loop (`fit.fit`) on those features: the same
head, optimiser, schedule, loss (class weights included), sampler (the weighted sampler included), seeding, data
order, EMA and early stopping. One trial takes seconds instead of minutes.

What it honours and what it cannot: images a `--balance` step generates are ordinary training images here (they
are added to the image list before the features are computed, as full training adds them before training).
The cached features are of the un-augmented images (validation preprocessing), exactly as in the original
system, which froze the backbone and cached nothing augmented: random crops, flips and rotations cannot be applied
on this path, and `prepare_features` says so when they are switched on. `--no-augment` makes the full path match
it (a test checks that both then give the same history for the same head settings).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..config import Config
from ..core.atomic import atomic_write
from ..core.progress import write
from ..data.bundle import DataBundle
from ..data.preprocessing import Preprocessing, resolve_preprocessing
from ..inference.runfiles import RunFolder
from ..models.model import AppleNet, create_backbone, create_model, resolve_device
from ..models.tta import average_probs, views_for
from .extract import create_extractor, extract_features, resolve_engine
from .fit import Callback, FitPlan, fit
from .loaders import create_train_loader
from .optim import create_loss
from .steps import score_probs
from .train import TrainResult, prepare_training_data, seed_everything

FEATURE_FORMAT = 2  # bump when the way features are computed changes, so old caches are not reused


@dataclass
class FeatureSet:
    """Backbone features of a split: training rows and their targets, validation rows per test-time view (the
    image itself is view 'identity') and their targets, the classes."""

    train: np.ndarray
    train_targets: np.ndarray
    val_views: dict[str, np.ndarray]
    val_targets: np.ndarray
    classes: list[str]
    key: str
    seconds: float = 0.0
    """Time spent computing them (0 when read from the cache)."""
    from_cache: bool = False
    engine: str = ""

    @property
    def val(self) -> np.ndarray:
        return self.val_views["identity"]


@dataclass
class FeatureTrainResult(TrainResult):
    """A `TrainResult` plus the best epoch's validation probabilities (for a confusion matrix)."""

    val_probs: np.ndarray | None = field(default=None)


def _file_signature(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def feature_key(model_name: str, backbone: nn.Module, pre: Preprocessing, bundle: DataBundle,
                views: tuple[str, ...]) -> str:
    """sha256 of everything the features depend on: model, weights, preprocessing, views, images (and order)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FEATURE_FORMAT, "model": model_name, "pre": pre.to_dict(), "views": list(views),
                         "classes": bundle.classes}, sort_keys=True).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for subset in ("train", "val"):
        frame = bundle.subset(subset)
        h.update(json.dumps([subset, [_file_signature(p) for p in frame["path"]], list(frame["label"])]).encode())
    return h.hexdigest()


@contextmanager
def _locked(path: Path):
    """An exclusive lock file, so that workers sharing a cache compute each feature set once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_features(cfg: Config, bundle: DataBundle, cache_dir: str | Path, engine: str = "auto",
                     run_dir: str | Path | None = None) -> tuple[FeatureSet, DataBundle]:
    """The cached features of `bundle` for `cfg`'s backbone, computing and saving them on a miss.

    As full training does, the training fold is first balanced (`cfg.balance`; balance.json goes into `run_dir`,
    the images are cached next to it, or next to `cache_dir`) and unreadable images are dropped; returns the
    features and that bundle.
    """
    cache_dir = Path(cache_dir)
    device = resolve_device(cfg.device)
    if cfg.train.augment:
        write("fast path: heads train on cached features of un-augmented images, as in the original system (its "
              "backbone was frozen); crops, flips and rotations are not applied (--fast-path off applies them)")
    seed_everything(cfg.seed)  # as train_and_evaluate does: with --weights none, every worker gets one backbone
    backbone = create_backbone(cfg.model.name, cfg.model.weights, num_classes=0).eval()
    pre = resolve_preprocessing(backbone, cfg.model.img_size)
    bundle, images, _ = prepare_training_data(cfg, bundle, pre, Path(run_dir or cache_dir),
                                              write_info=bool(run_dir))
    views = views_for(cfg.train.tta)
    key = feature_key(cfg.model.name, backbone, pre, bundle, views)
    path = cache_dir / f"{cfg.model.name}-{key[:20]}.npz"
    train_frame, val_frame = bundle.subset("train"), bundle.subset("val")
    targets = (np.asarray(bundle.targets(train_frame), np.int64), np.asarray(bundle.targets(val_frame), np.int64))
    with _locked(cache_dir / ".lock"):
        if path.is_file():
            with np.load(path) as z:
                return FeatureSet(z["train"], targets[0], {v: z[f"val_{v}"] for v in views}, targets[1],
                                  bundle.classes, key, from_cache=True, engine=str(z["engine"])), bundle
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            extract, used = create_extractor(backbone, pre, resolve_engine(engine, device), device, Path(tmp))
            batch = max(cfg.train.batch_size, 32)
            train = extract_features(extract, list(train_frame["path"]), images, pre, batch, desc="train features")
            val_views = {v: extract_features(extract, list(val_frame["path"]), images, pre, batch, view=v,
                                             desc=f"val features ({v})") for v in views}
        arrays = {"train": train, "engine": np.array(used), **{f"val_{v}": a for v, a in val_views.items()}}
        atomic_write(path, lambda tmp_path: _save_npz(tmp_path, arrays))
        seconds = time.perf_counter() - start
    return FeatureSet(train, targets[0], val_views, targets[1], bundle.classes, key, seconds, False, used), bundle


def _save_npz(path: str, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@torch.inference_mode()
def predict_feature_probs(head: nn.Module, features: dict[str, np.ndarray], views: Iterable[str],
                          device: torch.device, batch_size: int = 1024) -> np.ndarray:
    """Softmax of the head on features, averaged over the test-time `views` (whose features are computed)."""
    head.eval()
    views = tuple(views)
    n = len(features[views[0]])

    def probs(rows: torch.Tensor) -> torch.Tensor:
        return head(rows.to(device)).float().softmax(-1)

    def view(i: int, v: str) -> torch.Tensor:
        return torch.from_numpy(features[v][i:i + batch_size])

    out = [average_probs(probs, i, views, view=view).cpu().numpy() for i in range(0, n, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def create_head_model(cfg: Config, num_classes: int) -> AppleNet:
    """The head `create_model` would build for `cfg`, initialised identically (same seed, same random draws
    before it), on an identity backbone: the fast path's model."""
    seed_everything(cfg.seed)
    full = create_model(cfg.model.name, num_classes, cfg.model.out_features, cfg.model.dropout, weights="none")
    return AppleNet(nn.Identity(), full.head)


def train_head_on_features(cfg: Config, features: FeatureSet, callbacks: Iterable[Callback] = (),
                           run_dir: str | Path | None = None) -> FeatureTrainResult:
    """`train_and_evaluate` for a frozen backbone, on cached features: the same epoch loop (`fit.fit`), loader
    (shuffle or weighted sampler) and loss (class weights); callbacks get the same per-epoch metrics.

    Writes history.csv and the best epoch's validation probabilities (val_probs.npy) into `run_dir` when given;
    no weights (retrain the chosen settings with `pomona train`).
    """
    start_time = time.perf_counter()
    device = resolve_device(cfg.device)
    run_dir = Path(run_dir) if run_dir is not None else None
    model = create_head_model(cfg, len(features.classes)).to(device)
    targets = features.train_targets.tolist()
    dataset = TensorDataset(torch.from_numpy(features.train), torch.from_numpy(features.train_targets))
    loader = create_train_loader(dataset, targets, len(features.classes), cfg.train, cfg.seed)
    loss_fn = create_loss(cfg.train, targets, len(features.classes)).to(device)
    views = views_for(cfg.train.tta)
    latest: dict[str, np.ndarray] = {}

    def validate(scored: AppleNet) -> dict:
        latest["probs"] = predict_feature_probs(scored.head, features.val_views, views, device)
        return score_probs(latest["probs"], features.val_targets)

    def save_model(epoch: int, scored: nn.Module, metrics: dict) -> None:
        latest["best"] = latest["probs"]
        if run_dir is not None:
            atomic_write(RunFolder(run_dir).val_probs, lambda tmp: _save_npy(tmp, latest["best"]))

    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    plan = FitPlan(run_dir=run_dir, callbacks=callbacks, save_model=save_model, channels_last=False,
                   start_time=start_time, quiet=True)
    result = fit(model, loader, validate, cfg, loss_fn, device, plan)
    return FeatureTrainResult(run_dir or Path("."), result.best["epoch"], result.best["val_macro_f1"], result.history,
                              seconds=result.seconds, val_probs=latest.get("best"))


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
