"""Predictions from a trained run: class probabilities for photos, in input order, and submission CSVs."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import DecodedImages, Preprocessing, create_eval_transform
from .engine import ONNX_FILE, EngineError, OnnxEngine, find_current_export, onnxruntime_available, predict_paths
from .evaluate import compute_metrics
from .images import BadImageError
from .index import DataLayoutError
from .train import load_run, predict_probs, resolve_device

ENGINES = ("auto", "onnx", "torch")


@dataclass
class Predictions:
    """Probabilities per input path (rows of NaN for unreadable images, listed in `bad`)."""

    paths: list[str]
    probs: np.ndarray
    classes: list[str]
    bad: dict[str, str] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return ["" if np.isnan(p[0]) else self.classes[int(p.argmax())] for p in self.probs]

    def top_k(self, k: int = 3) -> list[list[tuple[str, float]]]:
        out = []
        for p in self.probs:
            if np.isnan(p[0]):
                out.append([])
                continue
            order = np.argsort(-p)[:k]
            out.append([(self.classes[i], float(p[i])) for i in order])
        return out

    def to_frame(self, k: int = 3) -> pd.DataFrame:
        rows = []
        for path, label, top in zip(self.paths, self.labels, self.top_k(k)):
            row = {"path": path, "label": label, "probability": top[0][1] if top else float("nan")}
            for i, (c, p) in enumerate(top[1:], start=2):
                row[f"label_{i}"], row[f"probability_{i}"] = c, p
            row["error"] = self.bad.get(path, "")
            rows.append(row)
        return pd.DataFrame(rows)


class _PhotoDataset(Dataset):
    """(tensor, "") per readable photo, (zeros, reason) for an unreadable one, so a batch never fails."""

    def __init__(self, paths: list[str], images: DecodedImages, transform, size: int):
        self.paths, self.images, self.transform, self.size = paths, images, transform, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return self.transform(self.images.get(self.paths[i])), ""
        except BadImageError as e:
            return torch.zeros(3, self.size, self.size), str(e) or "unreadable"


class Predictor:
    """A run's best model loaded once, ready to predict any list of photos.

    `engine`: 'onnx' (ONNX Runtime on the run's `model.onnx`), 'torch', or 'auto' = ONNX when the run folder holds
    an up-to-date ONNX export, onnxruntime is installed and the device is the CPU, else PyTorch.
    """

    def __init__(self, run_dir: str | Path, device: str = "auto", batch_size: int = 32, tta: bool | None = None,
                 num_workers: int = 0, engine: str = "auto", threads: int | None = None):
        self.run_dir = Path(run_dir)
        self.device = resolve_device(device)
        self.info = read_run_info(self.run_dir)
        self.classes: list[str] = self.info["classes"]
        self.pre = Preprocessing.from_dict(self.info["preprocessing"])
        cfg = self.info.get("config", {})
        self.tta = cfg.get("train", {}).get("tta", True) if tta is None else tta
        self.max_pixels = cfg.get("data", {}).get("max_pixels", 64_000_000)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.engine_name = choose_engine(self.run_dir, engine, self.device)
        self.engine = OnnxEngine(self.run_dir / ONNX_FILE, threads) if self.engine_name == "onnx" else None
        self._model = None
        self._pool = None  # threads decoding photos for the ONNX engine, started on first use

    @property
    def model(self) -> torch.nn.Module:
        """The PyTorch model (loaded on first use: the ONNX engine does not need it)."""
        if self._model is None:
            model, _ = load_run(self.run_dir, str(self.device))
            self._model = model.to(memory_format=torch.channels_last)
        return self._model

    def predict(self, paths: Sequence[str | Path]) -> Predictions:
        """Class probabilities for `paths`, each decoded once; unreadable files get a row of NaN."""
        paths = [str(p) for p in paths]
        if self.engine is not None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max(2, self.num_workers), thread_name_prefix="pomona-decode")
            probs, bad = predict_paths(self.engine, paths, self.pre, len(self.classes), self.max_pixels,
                                       self.batch_size, self.tta, pool=self._pool)
            return Predictions(paths, probs, self.classes, bad)
        images = DecodedImages(self.pre, self.max_pixels, enabled=False)
        dataset = _PhotoDataset(paths, images, create_eval_transform(self.pre), self.pre.input_size)
        loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)
        probs, errors = predict_probs(self.model, loader, self.device, self.tta)
        out = np.full((len(paths), len(self.classes)), np.nan, dtype=np.float32)
        ok = errors == ""
        if len(paths):
            out[ok] = probs[ok]
        bad = {p: str(e) for p, e in zip(paths, errors) if e}
        return Predictions(paths, out, self.classes, bad)

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for a preprocessed float32 NCHW batch (see `engine.create_image_transform`)."""
        if self.engine is not None:
            return self.engine.probs(x, self.tta)
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device).contiguous(memory_format=torch.channels_last)
            p = self.model(t).float().softmax(-1)
            if self.tta:
                p = (p + self.model(torch.flip(t, dims=[3])).float().softmax(-1)) / 2
            return p.cpu().numpy()

    def evaluate(self, table: pd.DataFrame, n_boot: int = 2000) -> tuple[dict, pd.DataFrame]:
        """Metrics on a labelled table (path, label); unreadable images are left out and counted."""
        unknown = sorted(set(table["label"]) - set(self.classes))
        if unknown:
            raise DataLayoutError(f"labels the model was not trained on: {unknown}; it knows {self.classes}")
        preds = self.predict(table["path"])
        frame = preds.to_frame().assign(true_label=list(table["label"]))
        ok = frame["error"] == ""
        index = {c: i for i, c in enumerate(self.classes)}
        y_true = [index[c] for c in frame.loc[ok, "true_label"]]
        y_pred = [index[c] for c in frame.loc[ok, "label"]]
        metrics = compute_metrics(y_true, y_pred, self.classes, n_boot=n_boot)
        metrics["skipped_images"] = preds.bad
        return metrics, frame


def read_run_info(run_dir: str | Path) -> dict:
    """run.json of a finished run (classes, preprocessing, model settings, config)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished pomona run (no run.json)")
    return json.loads(path.read_text())


def choose_engine(run_dir: str | Path, requested: str = "auto", device: torch.device | None = None) -> str:
    """'onnx' or 'torch' for `requested` ('auto', 'onnx' or 'torch'); raises EngineError when ONNX is asked for
    but cannot be used."""
    if requested not in ENGINES:
        raise EngineError(f"unknown engine {requested!r}: choose from {', '.join(ENGINES)}")
    if requested == "torch":
        return "torch"
    export, why = find_current_export(run_dir, "onnx")
    usable = export is not None and onnxruntime_available() and (device is None or device.type == "cpu")
    if requested == "auto":
        return "onnx" if usable else "torch"
    if export is None:
        raise EngineError(f"--engine onnx: {why}")
    if not onnxruntime_available():
        raise EngineError("--engine onnx needs `pip install onnxruntime`")
    if device is not None and device.type != "cpu":
        raise EngineError("--engine onnx runs on the CPU; use --device cpu or --engine torch")
    return "onnx"


def write_submission(ids: Sequence[str], labels: Sequence[str], out: str | Path, id_column: str = "img_id",
                     label_column: str = "label", sample_submission: str | Path | None = None) -> Path:
    """A competition submission: one row per id in the given order; header from `sample_submission` if given."""
    if sample_submission:
        header = list(pd.read_csv(sample_submission, nrows=0).columns)
        if len(header) < 2:
            raise DataLayoutError(f"{sample_submission}: expected at least an id and a label column")
        id_column, label_column = header[0], header[1]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({id_column: list(ids), label_column: list(labels)}).to_csv(out, index=False)
    return out
