"""Shared pieces of the benchmarks: the reference baseline and table printing."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from pomona.data.preprocessing import create_eval_transform, resolve_preprocessing
from pomona.models.metrics import macro_f1
from pomona.models.model import create_backbone
from pomona.training.datasets import DecodedImages, ImageDataset


@torch.inference_mode()
def _features(model, pre, paths, batch_size=32) -> np.ndarray:
    images = DecodedImages(pre, enabled=False)
    loader = DataLoader(ImageDataset(paths, None, images, create_eval_transform(pre)), batch_size=batch_size)
    return np.concatenate([model(x.contiguous(memory_format=torch.channels_last)).numpy() for x, _ in loader])


def frozen_features_baseline(train: pd.DataFrame, val: pd.DataFrame, name: str = "tf_efficientnet_lite0") -> dict:
    """The reference figure of the brief: frozen ImageNet Lite0 features at 224 px + logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    model = create_backbone(name, "package").eval().to(memory_format=torch.channels_last)
    pre = resolve_preprocessing(model)
    x_train, x_val = _features(model, pre, list(train["path"])), _features(model, pre, list(val["path"]))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)).fit(x_train, train["label"])
    pred = clf.predict(x_val)
    labels = sorted(set(train["label"]))
    index = {c: i for i, c in enumerate(labels)}
    return {"macro_f1": macro_f1([index[c] for c in val["label"]], [index[c] for c in pred]),
            "accuracy": float(np.mean(pred == val["label"].to_numpy())), "seconds": time.perf_counter() - start}


def report_against_reference(rows: list[dict], columns: list[str], out) -> str:
    """Add F1 and time ratios to the first (reference) row, print the table, save results.md/.json in `out`."""
    import json
    from pathlib import Path

    for r in rows:
        r["f1_vs_ref"] = r["macro_f1"] / rows[0]["macro_f1"]
        r["time_vs_ref"] = r["seconds"] / rows[0]["seconds"]
    text = print_table(rows, columns)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    return text


def print_table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns), "-|-".join("-" * widths[c] for c in columns)]
    lines += [" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def frozen_features_cv(table: pd.DataFrame, fold: np.ndarray, sets: dict[str, pd.DataFrame],
                       name: str = "tf_efficientnet_lite0", groups=None) -> dict:
    """The reference on a cross-validation: frozen ImageNet features at 224 px + logistic regression, trained on
    each fold's other folds (out-of-fold macro-F1 with a bootstrap CI, over `groups` when given) and on all photos
    (macro-F1 on each of `sets`, photos of another source)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pomona.models.metrics import bootstrap_ci

    model = create_backbone(name, "package").eval().to(memory_format=torch.channels_last)
    pre = resolve_preprocessing(model)
    x = _features(model, pre, list(table["path"]))
    labels = np.asarray(table["label"])
    oof = np.empty(len(labels), dtype=object)

    def fit(rows):
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)).fit(x[rows], labels[rows])

    for k in np.unique(fold):
        oof[fold == k] = fit(fold != k).predict(x[fold == k])
    classes = sorted(set(labels))
    y, y_oof = [classes.index(c) for c in labels], [classes.index(c) for c in oof]
    lo, hi = bootstrap_ci(np.array(y), np.array(y_oof), groups=None if groups is None else np.asarray(groups))
    row = {"oof_f1": macro_f1(y, y_oof), "oof_ci": f"{lo:.2f}-{hi:.2f}"}
    everything = fit(np.ones(len(labels), bool))
    for set_name, frames in sets.items():
        pred = everything.predict(_features(model, pre, list(frames["path"])))
        yt, pt = [classes.index(c) for c in frames["label"]], [classes.index(c) for c in pred]
        tlo, thi = bootstrap_ci(np.array(yt), np.array(pt))
        row.update({f"{set_name}_f1": macro_f1(yt, pt), f"{set_name}_ci": f"{tlo:.2f}-{thi:.2f}"})
    return row
