"""Scoring: macro-F1 and accuracy (training's early stopping and evaluation alike), the metrics.json of an
evaluation with a bootstrap confidence interval and per-class scores, and the confusion-matrix plot."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.atomic import atomic_write, write_csv, write_json


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean of per-class F1 over the classes with at least one photo in `y_true` (the one rule of
    pomona's macro-F1): a class without photos here has no F1 (the per-class table says n/a) and is not averaged
    as a 0, while predicting it for a photo of another class still costs that class its recall."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return float("nan")
    from sklearn.metrics import f1_score  # here: importing scikit-learn takes 0.7 s of every `pomona predict`

    return float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0))


def macro_f1_over(y_true, classes: Sequence[str]) -> str:
    """What `macro_f1` averaged over, in words for metrics.json and the evaluation table."""
    present = [classes[i] for i in np.unique(np.asarray(y_true, dtype=np.int64))]
    return f"the {len(present)} classes with photos here: [{', '.join(present)}]"


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95, groups: Sequence | None = None) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of macro-F1: images resampled with replacement, or, with
    `groups`, whole groups of near-duplicates (a cluster bootstrap, honest when photos come in groups)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n = len(y_true)
    if n == 0 or n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    if groups is None:
        draws = (idx for idx in rng.integers(0, n, size=(n_boot, n)))
    else:
        _, codes = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
        draws = (np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
                 for _ in range(n_boot))
    scores = np.array([macro_f1(y_true[idx], y_pred[idx]) for idx in draws])
    alpha = (1 - level) / 2
    return float(np.quantile(scores, alpha)), float(np.quantile(scores, 1 - alpha))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE: the photo-weighted mean, over `bins` equal-width bins of the top probability, of |accuracy -
    confidence| in the bin (0 = a top probability of 0.8 is right 80% of the time)."""
    probs, y = np.asarray(probs), np.asarray(y)
    if not len(y):
        return float("nan")
    confidence, correct = probs.max(1), probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * np.mean(which == b)
                     for b in range(bins) if np.any(which == b)))


def apply_temperature(view_probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities at a temperature, from those at temperature 1 (views x photos x classes, or photos x
    classes): softmax(log p / T) for each view (= softmax(logits / T)), then the mean over views, as prediction
    averages its test-time views."""
    p = np.asarray(view_probs, dtype=np.float64)
    p = p[None] if p.ndim == 2 else p
    z = np.log(np.clip(p, 1e-12, None)) / temperature
    z -= z.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).mean(0)


def fit_temperature(view_probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature (0.05-20) that minimises the negative log-likelihood of `y` under `apply_temperature`."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y)

    def nll(log_t: float) -> float:
        p = apply_temperature(view_probs, float(np.exp(log_t)))
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def compute_metrics(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str], n_boot: int = 2000,
                    seed: int = 0, groups: Sequence | None = None) -> dict:
    """The metrics.json payload: macro_f1, macro_f1_ci95, accuracy, n, per_class, confusion_matrix."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(classes)))
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    # a class with no photos here has no recall and no F1 (None, "n/a"), rather than a misleading 0
    per_class = {c: {"precision": float(p[i]), "recall": float(r[i]) if s[i] else None,
                     "f1": float(f[i]) if s[i] else None, "support": int(s[i])} for i, c in enumerate(classes)}
    lo, hi = bootstrap_ci(y_true, y_pred, n_boot, seed, groups=groups)
    return {"macro_f1": macro_f1(y_true, y_pred), "macro_f1_ci95": [lo, hi],
            "macro_f1_over": macro_f1_over(y_true, classes), "accuracy": accuracy(y_true, y_pred),
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
    over = f", over {metrics['ci_over']}" if metrics.get("ci_over") else ""
    lines.append(f"macro-F1 {metrics['macro_f1']:.3f} (95% CI {lo:.3f}-{hi:.3f}{over})  accuracy "
                 f"{metrics['accuracy']:.3f}  n={metrics['n']}")
    if "macro_f1_over" in metrics:
        lines.append(f"macro-F1 over {metrics['macro_f1_over']}")
    if metrics.get("ece") is not None:
        lines.append(f"expected calibration error {metrics['ece']:.3f} (of the probabilities scored here, "
                     f"{metrics.get('ece_bins', 15)} bins)")
    missing = missing_classes(metrics)
    if missing:
        lines.append(f"warning: no photos of {', '.join(missing)} here: their recall and F1 are n/a, "
                     "and macro-F1 is the mean over the other classes")
    return "\n".join(lines)
