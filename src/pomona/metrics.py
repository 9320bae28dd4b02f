"""Scoring: macro-F1 and accuracy (training's early stopping and evaluation alike), the metrics.json of an
evaluation with a bootstrap confidence interval and per-class scores, and the confusion-matrix plot."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from .atomic import atomic_write, write_csv, write_json


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean of per-class F1 over the classes present in `y_true` or `y_pred` (scikit-learn's
    default), so a class predicted but never present still counts against the score."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return float("nan")
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of macro-F1 (images resampled with replacement)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n = len(y_true)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    scores = np.array([macro_f1(y_true[idx], y_pred[idx]) for idx in rng.integers(0, n, size=(n_boot, n))])
    alpha = (1 - level) / 2
    return float(np.quantile(scores, alpha)), float(np.quantile(scores, 1 - alpha))


def compute_metrics(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str], n_boot: int = 2000,
                    seed: int = 0) -> dict:
    """The metrics.json payload: macro_f1, macro_f1_ci95, accuracy, n, per_class, confusion_matrix."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    # a class with no photos here has no recall and no F1 (None, "n/a"), rather than a misleading 0
    per_class = {c: {"precision": float(p[i]), "recall": float(r[i]) if s[i] else None,
                     "f1": float(f[i]) if s[i] else None, "support": int(s[i])} for i, c in enumerate(classes)}
    lo, hi = bootstrap_ci(y_true, y_pred, n_boot, seed)
    return {"macro_f1": macro_f1(y_true, y_pred), "macro_f1_ci95": [lo, hi], "accuracy": accuracy(y_true, y_pred),
            "n": int(len(y_true)), "per_class": per_class, "classes": list(classes),
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist()}


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    """Counts with row-normalised colours (rows = true class), saved as PNG."""
    import matplotlib

    matrix = np.asarray(matrix)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix.sum(1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    size = max(5.0, 0.45 * len(classes) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classes) <= 30:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return Path(path)


def write_metrics(metrics: dict, out_dir: str | Path, predictions=None) -> Path:
    """Write metrics.json, confusion_matrix.png and (optionally) predictions.csv into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    plot_confusion_matrix(metrics["confusion_matrix"], metrics["classes"], out / "confusion_matrix.png",
                          f"macro-F1 {metrics['macro_f1']:.3f} (95% CI {metrics['macro_f1_ci95'][0]:.2f}-"
                          f"{metrics['macro_f1_ci95'][1]:.2f}), n={metrics['n']}")
    if predictions is not None:
        write_csv(out / "predictions.csv", predictions)
    return out


def missing_classes(metrics: dict) -> list[str]:
    """The classes without a single photo in the scored set (their recall and F1 are not defined)."""
    return [c for c, m in metrics["per_class"].items() if not m["support"]]


def fmt_score(value: float | None, width: int = 0) -> str:
    """A score with three decimals, or "n/a" when it is not defined."""
    return f"{'n/a' if value is None else f'{value:.3f}':>{width}s}"


def format_metrics(metrics: dict) -> str:
    """A plain-text per-class table for the terminal, with a warning for classes without photos."""
    lines = [f"{'class':24s} {'precision':>9s} {'recall':>7s} {'f1':>6s} {'n':>5s}"]
    for c, m in metrics["per_class"].items():
        lines.append(f"{c[:24]:24s} {m['precision']:9.3f} {fmt_score(m['recall'], 7)} {fmt_score(m['f1'], 6)} "
                     f"{m['support']:5d}")
    lo, hi = metrics["macro_f1_ci95"]
    lines.append(f"macro-F1 {metrics['macro_f1']:.3f} (95% CI {lo:.3f}-{hi:.3f})  accuracy "
                 f"{metrics['accuracy']:.3f}  n={metrics['n']}")
    missing = missing_classes(metrics)
    if missing:
        lines.append(f"warning: no photos of {', '.join(missing)} here: their recall and F1 are n/a")
    return "\n".join(lines)
