"""What `pomona predict` and `pomona evaluate` do with a loaded run (`loaded.load_run`): the photos a command
line names (files, quoted shell patterns, folders), predictions as CSV or JSON, submission CSVs, and scores on a
labelled table. Never imports training."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..core.atomic import write_csv, write_text
from ..data.images import IMAGE_EXTENSIONS
from ..data.index import DataLayoutError
from ..models.metrics import compute_metrics, expected_calibration_error
from .engine import Predictions
from .loaded import LoadedRun


def expand_photos(patterns: Sequence[str], folder: str | None = None) -> list[str]:
    """The photos named on a command line, in order: files as given, shell-style patterns ("photos/*.jpg",
    "**/*.png") expanded and sorted, and every image below a folder (given among the patterns, or as `folder`).
    A missing file, a pattern that matches nothing or a folder without photos raises DataLayoutError."""
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not found:
                raise DataLayoutError(f"no file matches {pattern!r}")
            paths += found
        elif Path(pattern).is_file():
            paths.append(pattern)
        elif Path(pattern).is_dir():
            paths += folder_photos(pattern)
        else:
            raise DataLayoutError(f"photo not found: {pattern}")
    if folder:
        if not Path(folder).is_dir():
            raise DataLayoutError(f"folder not found: {folder}")
        paths += folder_photos(folder)
    return paths


def folder_photos(folder: str | Path) -> list[str]:
    """The image files below `folder` (sub-folders too), sorted; DataLayoutError when there is none."""
    found = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not found:
        raise DataLayoutError(f"no photos in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)} files, sub-folders "
                              "too)")
    return found


def predictions_json(preds: Predictions, k: int = 3, min_confidence: float = 0.0) -> list[dict]:
    """One record per photo (`PredictionRecord.to_json`): path, label, probability, whether the model is sure (top
    probability at least `min_confidence`) and its verdict, the top-k, and the error of an unreadable one."""
    return [record.to_json(k) for record in preds.records(min_confidence)]


def format_predictions(preds: Predictions, fmt: str | None, k: int = 3, min_confidence: float = 0.0) -> str:
    """Predictions as CSV (`to_frame`), JSON (`predictions_json`) or, for None, one readable line per photo."""
    if fmt == "json":
        return json.dumps(predictions_json(preds, k, min_confidence), indent=2)
    if fmt == "csv":
        return preds.to_frame(k, min_confidence).to_csv(index=False)
    return "\n".join(record.to_text(k) for record in preds.records(min_confidence))


def write_predictions(preds: Predictions, out: str | Path, fmt: str | None = None, k: int = 3,
                      min_confidence: float = 0.0) -> Path:
    """Write predictions to `out`: JSON for --format json or a .json name, else CSV."""
    fmt = fmt or ("json" if Path(out).suffix.lower() == ".json" else "csv")
    return write_text(out, format_predictions(preds, fmt, k, min_confidence) + ("\n" if fmt == "json" else ""))


def write_submission(ids: Sequence[str], labels: Sequence[str], out: str | Path, id_column: str = "img_id",
                     label_column: str = "label", sample_submission: str | Path | None = None) -> Path:
    """A competition submission: one row per id in the given order; header from `sample_submission` if given."""
    if sample_submission:
        header = list(pd.read_csv(sample_submission, nrows=0).columns)
        if len(header) < 2:
            raise DataLayoutError(f"{sample_submission}: expected at least an id and a label column")
        id_column, label_column = header[0], header[1]
    return write_csv(out, pd.DataFrame({id_column: list(ids), label_column: list(labels)}))


def score_table(run: LoadedRun, table: pd.DataFrame, n_boot: int = 2000) -> tuple[dict, pd.DataFrame]:
    """Metrics of `run` on a labelled table (path, label[, group]) and its predictions (with `true_label`);
    unreadable images are left out and listed in `skipped_images`. With near-duplicate groups in the table, the CI
    of macro-F1 resamples whole groups."""
    unknown = sorted(set(table["label"]) - set(run.classes))
    if unknown:
        raise DataLayoutError(f"labels the model was not trained on: {unknown}; it knows {run.classes}")
    preds = run.predict(table["path"])
    frame = preds.to_frame().assign(true_label=list(table["label"]))
    ok = frame["error"] == ""
    index = {c: i for i, c in enumerate(run.classes)}
    y_true = np.array([index[c] for c in frame.loc[ok, "true_label"]], dtype=np.int64)
    y_pred = np.array([index[c] for c in frame.loc[ok, "label"]], dtype=np.int64)
    grouped = "group" in table and table["group"].nunique() < len(table)  # a CI over near-duplicate groups
    groups = table["group"].to_numpy()[ok.to_numpy()] if grouped else None
    metrics = compute_metrics(y_true, y_pred, run.classes, n_boot=n_boot, groups=groups)
    if grouped:
        metrics["ci_over"] = f"{len(set(groups))} near-duplicate groups"
    # the calibration of exactly what was scored (the run's temperature, members and views): an ensemble's own ECE
    members = len(run.info.get("members") or [1])
    metrics.update(ece=expected_calibration_error(preds.probs[ok.to_numpy()], y_true), ece_bins=15,
                   ece_of=f"the probabilities scored here (temperature {run.info.get('temperature', 1.0):g}, "
                          f"{members} member(s), views {list(run.views)}, engine {run.engine_name})")
    metrics["skipped_images"] = preds.bad
    return metrics, frame
