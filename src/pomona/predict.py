"""What `pomona predict` and `pomona evaluate` do with a loaded run (`checkpoint.load_run`): the photos a command
line names (files, quoted shell patterns, folders), predictions as CSV or JSON, submission CSVs, and scores on a
labelled table. Never imports training."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .atomic import write_csv, write_text
from .checkpoint import LoadedRun
from .engine import Predictions
from .images import IMAGE_EXTENSIONS
from .index import DataLayoutError
from .metrics import compute_metrics


def expand_photos(patterns: Sequence[str], folder: str | None = None) -> list[str]:
    """The photos named on a command line, in order: files as given, shell-style patterns ("photos/*.jpg",
    "**/*.png") expanded and sorted, and every image below `folder`. A missing file or a pattern that matches
    nothing raises DataLayoutError."""
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not found:
                raise DataLayoutError(f"no file matches {pattern!r}")
            paths += found
        elif Path(pattern).is_file():
            paths.append(pattern)
        else:
            raise DataLayoutError(f"photo not found: {pattern}")
    if folder:
        if not Path(folder).is_dir():
            raise DataLayoutError(f"folder not found: {folder}")
        paths += sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return paths


def predictions_json(preds: Predictions, k: int = 3) -> list[dict]:
    """One record per photo: path, label, probability, the top-k, and the error of an unreadable one."""
    return [{"path": path, "label": top[0][0] if top else None, "probability": top[0][1] if top else None,
             "top": [{"label": c, "probability": p} for c, p in top], **({"error": preds.bad[path]}
                                                                        if path in preds.bad else {})}
            for path, top in zip(preds.paths, preds.top_k(k))]


def format_predictions(preds: Predictions, fmt: str | None, k: int = 3) -> str:
    """Predictions as CSV (`to_frame`), JSON (`predictions_json`) or, for None, one readable line per photo."""
    if fmt == "json":
        return json.dumps(predictions_json(preds, k), indent=2)
    if fmt == "csv":
        return preds.to_frame(k).to_csv(index=False)
    return "\n".join(f"{path}: " + ("  ".join(f"{c} {p:.1%}" for c, p in top) if top else
                                    f"unreadable: {preds.bad[path]}")
                     for path, top in zip(preds.paths, preds.top_k(k)))


def write_predictions(preds: Predictions, out: str | Path, fmt: str | None = None, k: int = 3) -> Path:
    """Write predictions to `out`: JSON for --format json or a .json name, else CSV."""
    fmt = fmt or ("json" if Path(out).suffix.lower() == ".json" else "csv")
    return write_text(out, format_predictions(preds, fmt, k) + ("\n" if fmt == "json" else ""))


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
    """Metrics of `run` on a labelled table (path, label) and its predictions (with `true_label`); unreadable
    images are left out and listed in `skipped_images`."""
    unknown = sorted(set(table["label"]) - set(run.classes))
    if unknown:
        raise DataLayoutError(f"labels the model was not trained on: {unknown}; it knows {run.classes}")
    preds = run.predict(table["path"])
    frame = preds.to_frame().assign(true_label=list(table["label"]))
    ok = frame["error"] == ""
    index = {c: i for i, c in enumerate(run.classes)}
    y_true = np.array([index[c] for c in frame.loc[ok, "true_label"]], dtype=np.int64)
    y_pred = np.array([index[c] for c in frame.loc[ok, "label"]], dtype=np.int64)
    metrics = compute_metrics(y_true, y_pred, run.classes, n_boot=n_boot)
    metrics["skipped_images"] = preds.bad
    return metrics, frame
