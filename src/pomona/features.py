"""The frozen-backbone fast path: backbone features computed once, cached on disk, and heads trained on them.

With a frozen backbone (the original system's recipe) every epoch of `train_and_evaluate` runs the same backbone
over the same images. Here the pooled features of every training and validation image (and of the validation
images' left-right flips, for test-time augmentation) are computed once, in batches, with ONNX Runtime on CPU
(measured ~2-4x faster than eager PyTorch there) or PyTorch, and kept in `CACHE/<model>-<key>.npz`, keyed by the
model name, the backbone's weights, the preprocessing and the image list (paths, sizes, modification times).
`train_head_on_features` then trains the same `Head`, with the same optimiser, schedule, loss, seeding, data order
and early stopping as `train_and_evaluate`, on those features: one trial takes seconds instead of minutes.

What it gives up: the cached features are of the un-augmented images (validation preprocessing), exactly as in the
original system, which froze the backbone and cached nothing augmented. Random crops, flips and rotations of the
training images are therefore not applied on this path; `--no-augment` makes the full path match it (a test checks
that both then give the same macro-F1 for the same head settings). Images that a balancing step wrote to disk are
ordinary training images here: they are in the image list, so their features are cached once like the others.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .config import Config
from .data import DataBundle
from .datasets import DecodedImages, ImageDataset, Preprocessing, create_eval_transform, resolve_preprocessing
from .model import AppleNet, create_backbone, create_model
from .train import (Callback, TrainResult, check_images, create_ema, create_loss, create_optimizer, create_scheduler,
                    resolve_device, score_probs, seed_everything, train_one_epoch)

FEATURE_FORMAT = 1  # bump when the way features are computed changes, so old caches are not reused


@dataclass
class FeatureSet:
    """Backbone features of a split: training rows, validation rows (and their flips), targets, classes."""

    train: np.ndarray
    train_targets: np.ndarray
    val: np.ndarray
    val_flipped: np.ndarray | None
    val_targets: np.ndarray
    classes: list[str]
    key: str
    seconds: float = 0.0
    """Time spent computing them (0 when read from the cache)."""
    from_cache: bool = False
    engine: str = ""


@dataclass
class FeatureTrainResult(TrainResult):
    """A `TrainResult` plus the best epoch's validation probabilities (for a confusion matrix)."""

    val_probs: np.ndarray | None = None


def resolve_engine(engine: str, device: torch.device) -> str:
    """auto -> onnx on CPU when onnxruntime is installed, else torch."""
    if engine not in ("auto", "onnx", "torch"):
        raise ValueError(f"unknown feature engine {engine!r}: auto, onnx or torch")
    if engine == "auto":
        if device.type != "cpu":
            return "torch"
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "torch"
        return "onnx"
    return engine


def _file_signature(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def feature_key(model_name: str, backbone: nn.Module, pre: Preprocessing, bundle: DataBundle, tta: bool) -> str:
    """sha256 of everything the features depend on: model, weights, preprocessing, images (and their order)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FEATURE_FORMAT, "model": model_name, "pre": pre.to_dict(), "tta": tta,
                         "classes": bundle.classes}, sort_keys=True).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for subset in ("train", "val"):
        frame = bundle.subset(subset)
        h.update(json.dumps([subset, [_file_signature(p) for p in frame["path"]], list(frame["label"])]).encode())
    return h.hexdigest()


def create_extractor(backbone: nn.Module, pre: Preprocessing, engine: str, device: torch.device,
                     workdir: Path) -> tuple[Callable[[torch.Tensor], np.ndarray], str]:
    """A function batch -> pooled features, on ONNX Runtime (exported once) or PyTorch; falls back to PyTorch,
    with a message, when the ONNX export or session fails."""
    backbone = backbone.eval()
    if engine == "onnx":
        try:
            return _onnx_extractor(backbone, pre, workdir), "onnx"
        except Exception as e:  # exporter and runtime raise many types
            tqdm.write(f"ONNX Runtime unavailable for this backbone ({type(e).__name__}: {str(e)[:200]}); "
                       "using PyTorch")
    model = backbone.to(device).to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(x: torch.Tensor) -> np.ndarray:
        return model(x.to(device).contiguous(memory_format=torch.channels_last)).float().cpu().numpy()

    return run, "torch"


def _onnx_extractor(backbone: nn.Module, pre: Preprocessing, workdir: Path) -> Callable[[torch.Tensor], np.ndarray]:
    import warnings

    import onnxruntime as ort

    path = workdir / "backbone.onnx"
    example = torch.zeros(2, 3, pre.input_size, pre.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(backbone.cpu(), example, str(path), dynamo=False, input_names=["x"],
                          output_names=["features"], dynamic_axes={"x": {0: "batch"}, "features": {0: "batch"}},
                          opset_version=17)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {"x": x.numpy()})[0]

    return run


def extract_features(extract: Callable[[torch.Tensor], np.ndarray], paths: list[str], images: DecodedImages,
                     pre: Preprocessing, batch_size: int = 32, flip: bool = False, desc: str = "features",
                     ) -> np.ndarray:
    """Features of `paths` under the validation preprocessing (left-right flipped when `flip`)."""
    loader = DataLoader(ImageDataset(paths, None, images, create_eval_transform(pre)), batch_size=batch_size)
    out = []
    for x, _ in tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=1.0, disable=None):
        out.append(extract(torch.flip(x, dims=[3]) if flip else x))
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


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
                     ) -> tuple[FeatureSet, DataBundle]:
    """The cached features of `bundle` for `cfg`'s backbone, computing and saving them on a miss.

    Returns the features and the bundle without unreadable images (as `train_and_evaluate` would drop them).
    """
    cache_dir = Path(cache_dir)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)  # as train_and_evaluate does: with --weights none, every worker gets one backbone
    backbone = create_backbone(cfg.model.name, cfg.model.weights, num_classes=0).eval()
    pre = resolve_preprocessing(backbone, cfg.model.img_size)
    images = DecodedImages(pre, cfg.data.max_pixels, cfg.data.cache_max_mb << 20, cfg.data.cache_images)
    bundle = check_images(bundle, images, cfg.data.max_bad_fraction)
    key = feature_key(cfg.model.name, backbone, pre, bundle, cfg.train.tta)
    path = cache_dir / f"{cfg.model.name}-{key[:20]}.npz"
    train_frame, val_frame = bundle.subset("train"), bundle.subset("val")
    targets = (np.asarray(bundle.targets(train_frame), np.int64), np.asarray(bundle.targets(val_frame), np.int64))
    with _locked(cache_dir / ".lock"):
        if path.is_file():
            with np.load(path) as z:
                flipped = z["val_flipped"] if "val_flipped" in z.files else None
                return FeatureSet(z["train"], targets[0], z["val"], flipped, targets[1], bundle.classes, key,
                                  from_cache=True, engine=str(z["engine"])), bundle
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            extract, used = create_extractor(backbone, pre, resolve_engine(engine, device), device, Path(tmp))
            batch = max(cfg.train.batch_size, 32)
            train = extract_features(extract, list(train_frame["path"]), images, pre, batch, desc="train features")
            val = extract_features(extract, list(val_frame["path"]), images, pre, batch, desc="val features")
            flipped = (extract_features(extract, list(val_frame["path"]), images, pre, batch, flip=True,
                                        desc="flipped val features") if cfg.train.tta else None)
        arrays = {"train": train, "val": val, "engine": np.array(used)}
        if flipped is not None:
            arrays["val_flipped"] = flipped
        tmp_path = path.with_suffix(".tmp.npz")
        np.savez(tmp_path, **arrays)
        os.replace(tmp_path, path)
        seconds = time.perf_counter() - start
    return FeatureSet(train, targets[0], val, flipped, targets[1], bundle.classes, key, seconds, False, used), bundle


@torch.inference_mode()
def predict_feature_probs(head: nn.Module, features: np.ndarray, flipped: np.ndarray | None,
                          device: torch.device, batch_size: int = 1024) -> np.ndarray:
    """Softmax of the head on features, averaged with the flipped images' when given (= flip TTA)."""
    head.eval()
    out = []
    for i in range(0, len(features), batch_size):
        p = head(torch.from_numpy(features[i:i + batch_size]).to(device)).float().softmax(-1)
        if flipped is not None:
            p = (p + head(torch.from_numpy(flipped[i:i + batch_size]).to(device)).float().softmax(-1)) / 2
        out.append(p.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def create_head_model(cfg: Config, num_classes: int) -> AppleNet:
    """The head `create_model` would build for `cfg`, initialised identically (same seed, same random draws
    before it), on an identity backbone: the fast path's model."""
    seed_everything(cfg.seed)
    full = create_model(cfg.model.name, num_classes, cfg.model.out_features, cfg.model.dropout, weights="none")
    return AppleNet(nn.Identity(), full.head)


def train_head_on_features(cfg: Config, features: FeatureSet, callbacks: Iterable[Callback] = (),
                           run_dir: str | Path | None = None) -> FeatureTrainResult:
    """`train_and_evaluate` for a frozen backbone, on cached features: same head, optimiser, schedule, loss,
    per-epoch seeding, data order, EMA and early stopping; callbacks get the same per-epoch metrics.

    Writes history.csv and the best epoch's validation probabilities (val_probs.npy) into `run_dir` when given;
    no weights (retrain the chosen settings with `pomona train`).
    """
    start_time = time.perf_counter()
    device = resolve_device(cfg.device)
    t = cfg.train
    model = create_head_model(cfg, len(features.classes)).to(device)
    train_set = TensorDataset(torch.from_numpy(features.train), torch.from_numpy(features.train_targets))
    loader = DataLoader(train_set, batch_size=t.batch_size, shuffle=True, drop_last=len(train_set) > t.batch_size,
                        generator=torch.Generator())
    optimizer = create_optimizer(model, t)
    scheduler = create_scheduler(optimizer, t, len(loader))
    ema = create_ema(model, t.ema_epochs, len(loader))
    loss_fn = create_loss(t, features.train_targets.tolist(), len(features.classes)).to(device)
    history: list[dict] = []
    best = {"epoch": -1, "val_macro_f1": -1.0, "val_loss": float("inf")}
    best_probs = None
    for epoch in range(t.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
        metrics = train_one_epoch(model, loader, optimizer, scheduler, loss_fn, device, backbone_frozen=True,
                                  channels_last=False, desc=f"epoch {epoch + 1}/{t.epochs}", ema=ema)
        scored = model if ema is None else ema.module
        probs = predict_feature_probs(scored.head, features.val, features.val_flipped if t.tta else None, device)
        metrics.update(score_probs(probs, features.val_targets))
        metrics.update(epoch=epoch, lr=optimizer.param_groups[-1]["lr"], backbone_frozen=True,
                       elapsed_seconds=time.perf_counter() - start_time)
        history.append(metrics)
        if (metrics["val_macro_f1"], -metrics["val_loss"]) > (best["val_macro_f1"], -best["val_loss"]):
            best = {"epoch": epoch, "val_macro_f1": metrics["val_macro_f1"], "val_loss": metrics["val_loss"]}
            best_probs = probs
        if run_dir is not None:
            _write_progress(Path(run_dir), history, best_probs)
        for cb in callbacks:
            cb.on_epoch_end(epoch, dict(metrics))
        if t.patience > 0 and epoch - best["epoch"] >= t.patience:
            break
    return FeatureTrainResult(Path(run_dir) if run_dir else Path("."), best["epoch"], best["val_macro_f1"], history,
                              seconds=time.perf_counter() - start_time, val_probs=best_probs)


def _write_progress(run_dir: Path, history: list[dict], best_probs: np.ndarray | None) -> None:
    import pandas as pd

    run_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(history).to_csv(run_dir / "history.csv", index=False)
    if best_probs is not None:
        np.save(run_dir / "val_probs.npy", best_probs)
