"""`report.html`: one self-contained page per run folder (images embedded), openable offline.

It opens on the results: a summary (model, image size, date, scores), the confusion matrix, per-class F1 ("n/a"
for a class without validation photos) and the worst misclassified photos with their top-3; then training curves
(kept and unfreeze epochs marked), the data summary, the configuration (collapsed, only the settings that differ
from the defaults), skipped bad images, and for a `pomona tune` folder the best trial and Optuna's plots
(`plots/*.png`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.atomic import write_text
from ..inference.records import ranking_of_row
from ..inference.runfiles import RunFolder
from ..models.metrics import fmt_score, missing_classes

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f4;color:#1d2a1d}
header{background:#2f5d34;color:#fff;padding:18px 28px}header h1{margin:0;font-size:1.5em}
header p{margin:4px 0 0;opacity:.85}main{padding:12px 28px 40px;max-width:1200px}
section{background:#fff;border-radius:10px;padding:14px 20px;margin:16px 0;box-shadow:0 1px 3px #0002}
h2{margin:.2em 0 .6em;font-size:1.15em;color:#2f5d34}table{border-collapse:collapse;font-size:.9em}
td,th{padding:3px 10px;border-bottom:1px solid #e3e6e0;text-align:left}th{background:#eef2ea}
.kpi{display:inline-block;margin:0 28px 8px 0}.kpi b{display:block;font-size:1.6em;color:#2f5d34}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery>img{width:120px;height:120px;object-fit:cover}.card{width:190px;font-size:.8em}
.card img{width:190px;height:190px;object-fit:cover;border-radius:6px}.bad{color:#a33}
details pre{background:#f3f3f3;padding:8px;border-radius:6px;overflow:auto;max-height:400px}
img.plot{max-width:100%}
"""
"""The style of report.html; the pages of `pomona doctor` and `pomona suggest` (`doctor_page`) add to it."""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_uri(path: Path) -> str:
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def thumbnail(path: str, size: int = 190) -> str | None:
    """A JPEG data URI of the photo, shrunk to fit 2 x `size` pixels; None when it cannot be read."""
    from PIL import Image

    from ..data.images import BadImageError, load_image

    try:
        img = load_image(path)
    except BadImageError:
        return None
    img.thumbnail((size * 2, size * 2), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def unfreeze_epoch(history: pd.DataFrame) -> int | None:
    """The first epoch (0-based) trained with the backbone unfrozen after frozen ones, if any."""
    if "backbone_frozen" not in history:
        return None
    frozen = history["backbone_frozen"].astype(str).str.lower().eq("true").to_numpy()
    after = [i for i in range(1, len(frozen)) if frozen[i - 1] and not frozen[i]]
    return int(history["epoch"].iloc[after[0]]) if after else None


def best_row(history: pd.DataFrame) -> int:
    """The row of the best epoch, by training's rule: highest validation macro-F1, then lowest loss."""
    return int(history.sort_values(["val_macro_f1", "val_loss"], ascending=[False, True], kind="stable").index[0])


def plot_curves(history: pd.DataFrame, kept: int | None = None) -> str:
    """Loss and validation scores per epoch; the kept epoch (default: the best by macro-F1) and the unfreeze
    epoch are marked."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    x = history["epoch"] + 1
    best = (kept if kept is not None else int(history["epoch"][best_row(history)])) + 1
    unfrozen = unfreeze_epoch(history)
    for ax in (a, b):
        ax.axvline(best, color="#c9a227", lw=1.5, label=f"kept epoch ({best})")
        if unfrozen is not None:
            ax.axvline(unfrozen + 1, color="#777", ls=":", lw=1.5, label=f"backbone unfrozen ({unfrozen + 1})")
    a.plot(x, history["train_loss"], "o-", label="train")
    a.plot(x, history["val_loss"], "o-", label="validation")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(x, history["val_macro_f1"], "o-", color="#2f5d34", label="macro-F1")
    b.plot(x, history["val_accuracy"], "s--", color="#9a6", label="accuracy")
    b.set_ylim(0, 1.02)
    b.set_xlabel("epoch")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return _png(fig)


def plot_per_class_f1(per_class: dict) -> str:
    """Per-class F1 bars; a class without photos gets no bar and "n/a"."""
    plt = _plt()
    names = list(per_class)
    f1 = [per_class[c]["f1"] for c in names]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.2))
    ax.barh(names, [v or 0.0 for v in f1],
            color=["#2f5d34" if (v or 0) >= 0.8 else "#c9a227" if (v or 0) >= 0.5 else "#a33" for v in f1])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("F1")
    for i, v in enumerate(f1):
        ax.text(min((v or 0.0) + 0.01, 0.93), i, "n/a" if v is None else f"{v:.2f}", va="center", fontsize=8)
    return _png(fig)


def plot_class_counts(split: pd.DataFrame) -> str:
    plt = _plt()
    counts = split.groupby(["label", "subset"]).size().unstack(fill_value=0)
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(counts) + 1.2))
    left = np.zeros(len(counts))
    for subset, color in [("train", "#2f5d34"), ("val", "#9ac48f")]:
        if subset in counts:
            ax.barh(counts.index, counts[subset], left=left, color=color, label=subset)
            left += counts[subset].to_numpy()
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.legend()
    return _png(fig)


def html_table(rows: list[list], header: list[str]) -> str:
    """An HTML table of `rows` under `header`, every cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def worst_misclassified(predictions: pd.DataFrame, n: int = 12) -> pd.DataFrame:
    """Wrong predictions, most confident first."""
    wrong = predictions[(predictions["error"].fillna("") == "") & (predictions["label"] != predictions["true_label"])]
    return wrong.sort_values("probability", ascending=False).head(n)


def build_report(run_dir: str | Path, eval_dir: str | Path | None = None, title: str | None = None,
                 out: str | Path | None = None) -> Path:
    """Write `out` (default `run_dir/report.html`) from the files of a run and of an evaluation folder (default
    run_dir/eval)."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    if not folder.config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a pomona run folder (no {folder.config.name})")
    eval_dir = Path(eval_dir) if eval_dir else folder.eval_dir
    parts: list[str] = []

    def section(key: str, heading: str, body: str) -> None:
        parts.append(f'<section id="{key}"><h2>{html.escape(heading)}</h2>{body}</section>')

    metrics = _read_json(eval_dir / "metrics.json")
    config = _read_json(folder.config) or {}
    section("summary", "Summary", _summary(run_dir, config, metrics))

    if metrics:
        cm = eval_dir / "confusion_matrix.png"
        if cm.is_file():
            section("confusion", "Confusion matrix", f'<img class="plot" alt="confusion matrix" src="{_file_uri(cm)}">')
        pc = metrics["per_class"]
        missing = missing_classes(metrics)
        warning = (f'<p class="bad">Warning: no validation photos of {html.escape(", ".join(missing))}: their recall '
                   "and F1 are not defined (n/a), not zero.</p>" if missing else "")
        section("per-class", "Per-class F1", warning
                + f'<img class="plot" alt="per-class F1" src="{plot_per_class_f1(pc)}">'
                + html_table([[c, f"{m['precision']:.3f}", fmt_score(m["recall"]), fmt_score(m["f1"]), m["support"]]
                              for c, m in pc.items()], ["class", "precision", "recall", "F1", "n"]))

    if (eval_dir / "predictions.csv").is_file():
        preds = pd.read_csv(eval_dir / "predictions.csv", keep_default_na=False)
        cards = []
        if "true_label" in preds:
            for r in worst_misclassified(preds).itertuples():
                uri = thumbnail(r.path)
                tops = "<br>".join(f"{html.escape(c)} {p:.0%}" for c, p in ranking_of_row(r._asdict())[:3])
                img = f'<img alt="{html.escape(Path(r.path).name)}" src="{uri}">' if uri else ""
                cards.append(f'<div class="card">{img}'
                             f"<div><b>true: {html.escape(r.true_label)}</b><br>{tops}<br>"
                             f"<small>{html.escape(Path(r.path).name)}</small></div></div>")
        body = f'<div class="gallery">{"".join(cards)}</div>' if cards else "<p>No misclassified images.</p>"
        section("worst", "Worst misclassified images", body)

    split = folder.read_split()
    if split is not None:
        counts = split.groupby(["label", "subset"]).size().unstack(fill_value=0)
        body = (f"<p>{len(split)} images, {split['label'].nunique()} classes, {split['group'].nunique()} groups; "
                f"train {int((split['subset'] == 'train').sum())}, validation "
                f"{int((split['subset'] == 'val').sum())}.</p>"
                f'<img class="plot" alt="class counts" src="{plot_class_counts(split)}">'
                + html_table([[c, *[int(v) for v in r]] for c, r in counts.iterrows()], ["class", *counts.columns]))
        section("data", "Data", body)

    if folder.groups_info.is_file():
        section("groups", "Near-duplicate groups", _groups_section(folder))

    history = folder.read_history()
    if history is not None:
        best, unfrozen = best_row(history), unfreeze_epoch(history)
        info = _read_json(folder.run_info) or {}
        kept = info.get("kept_epoch", info.get("best_epoch"))  # older runs kept their best epoch
        kept_row = history.index[history["epoch"] == kept][0] if kept in set(history["epoch"]) else best
        selected = info.get("selected_on") or ("keep" not in info and "best_epoch" in info)
        curves = plot_curves(history, int(history["epoch"][kept_row]))
        section("curves", "Training curves",
                f'<img class="plot" alt="training curves" src="{curves}">'
                f"<p>Kept epoch {int(history['epoch'][kept_row]) + 1} of {len(history)}: validation macro-F1 "
                f"{history['val_macro_f1'][kept_row]:.3f}"
                + (" (chosen as the highest on these same photos: optimistic)" if selected else
                   " (the last epoch: no choice looked at the validation photos)")
                + f"; the highest over epochs was {history['val_macro_f1'][best]:.3f} (a maximum over epochs on "
                f"the same photos, not a score to quote)"
                + (f"; backbone unfrozen from epoch {unfrozen + 1}" if unfrozen is not None else "")
                + f"; {history['elapsed_seconds'].iloc[-1]:.0f} s in all.</p>")

    changed, total = config_changes(config)
    section("config", "Configuration",
            f"<details><summary>{len(changed)} of {total} settings differ from the defaults (all of them: "
            "config.json)</summary>" + (html_table(changed, ["setting", "value", "default"]) if changed else
                                         "<p>Every setting is at its default.</p>") + "</details>")

    bad = _read_json(folder.bad_images) or {}
    if bad or folder.bad_images.is_file():
        section("bad-images", "Skipped unreadable images",
                html_table([[p, why] for p, why in bad.items()], ["file", "reason"]) if bad else "<p>None.</p>")

    tuning_plots = sorted((run_dir / "plots").glob("*.png"))
    best = _read_json(run_dir / "best.json")
    if tuning_plots or best:
        head = (f"<p>Best trial {best['best_trial']}: validation macro-F1 {best['best_val_macro_f1']:.3f} (the "
                f"maximum over trials and epochs on the validation photos: selected on them, optimistic); trials "
                + ", ".join(f"{n} {state}" for state, n in best["trials"].items() if n) + "</p>"
                + html_table([[k, v] for k, v in best["params"].items()], ["setting", "value"]) if best else "")
        section("tuning", "Hyperparameter search", head + "".join(
            f'<h3>{html.escape(p.stem.replace("_", " "))}</h3>'
            f'<img class="plot" alt="{html.escape(p.stem)}" src="{_file_uri(p)}">' for p in tuning_plots))

    name = title or f"pomona run {run_dir.name}"
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(name)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{CSS}</style></head>"
            f"<body><header><h1>{html.escape(name)}</h1><p>{html.escape(str(run_dir))}</p></header>"
            f"<main>{''.join(parts)}</main></body></html>")
    return write_text(Path(out) if out else folder.report, page)


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def config_changes(config: dict) -> tuple[list[list], int]:
    """The settings of a run's config.json that differ from `pomona.config.Config()`'s, as [setting, value,
    default] rows, and how many settings there are in all."""
    from ..config import Config

    given, default = _flat(config), _flat(Config().to_dict())
    rows = [[k, v, default.get(k, "")] for k, v in given.items() if k not in default or default[k] != v]
    return rows, len(given)


def _groups_section(folder: RunFolder, examples: int = 3, per_group: int = 6) -> str:
    """How the photos were grouped (groups.json), the group sizes per class, and the largest groups as
    thumbnails (groups.csv)."""
    info = _read_json(folder.groups_info) or {}
    body = (f"<p>{info.get('n_groups', '?')} groups, by <b>{html.escape(str(info.get('by', '?')))}</b>: "
            f"{html.escape(str(info.get('method') or info.get('note') or ''))}. A group stays on one side of every "
            "split and fold, so a validation or out-of-fold score is a score on photos of sessions the model never "
            "saw.</p>")
    body += "".join(f'<p class="bad">Warning: {html.escape(w)}</p>' for w in info.get("warnings", []))
    if not folder.groups.is_file():
        return body
    table = pd.read_csv(folder.groups, dtype=str, keep_default_na=False)
    sizes = table.groupby("group").size()
    per_class = table.groupby("label").agg(photos=("path", "size"), groups=("group", "nunique"))
    largest = table.groupby("label")["group"].agg(lambda g: int(g.value_counts().max()))
    body += html_table([[c, int(r.photos), int(r.groups), int(largest[c])] for c, r in per_class.iterrows()],
                       ["class", "photos", "groups", "largest group"])
    body += (f"<p>Group sizes: {int((sizes == 1).sum())} single photos, {int(((sizes > 1) & (sizes <= 5)).sum())} "
             f"of 2-5, {int((sizes > 5).sum())} of more than 5 (largest {int(sizes.max())}).</p>")
    for group in sizes[sizes > 1].sort_values(ascending=False).index[:examples]:
        paths = table.loc[table["group"] == group, "path"].head(per_group)
        thumbs = "".join(f'<img alt="{html.escape(Path(p).name)}" src="{uri}">' for p in paths
                         if (uri := thumbnail(p, 120)))
        body += (f"<h3>{html.escape(group)} ({int(sizes[group])} photos)</h3>"
                 f'<div class="gallery">{thumbs}</div>')
    return body


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _summary(run_dir: Path, config: dict, metrics: dict | None) -> str:
    """Model, image size and date of the run, then the evaluation's scores."""
    folder = RunFolder(run_dir)
    info = folder.read_run_info(check=False) if folder.run_info.is_file() else {}
    model = info.get("model", {}).get("name") or config.get("model", {}).get("name", "?")
    size = info.get("preprocessing", {}).get("input_size") or config.get("model", {}).get("img_size") or "?"
    stamp = next((p for p in (folder.run_info, folder.config) if p.is_file()), None)
    date = time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp.stat().st_mtime)) if stamp else "?"
    members = len(info.get("members", [])) > 1
    facts = [("model", model + (f" (ensemble of {len(info['members'])})" if members else "")),
             ("image size", f"{size} px"), ("date", date)]
    kept = info.get("kept_epoch", info.get("best_epoch"))
    if kept is not None:
        how = "best by validation macro-F1" if info.get("keep", "best") == "best" else "the last"
        facts.append(("kept epoch", f"{kept + 1} ({how})"))
    body = "<p>" + " &middot; ".join(f"{html.escape(k)}: <b>{html.escape(str(v))}</b>" for k, v in facts) + "</p>"
    if metrics:
        lo, hi = metrics["macro_f1_ci95"]
        if metrics.get("scored_on"):
            chosen = ("the kept epoch was chosen on them: optimistic" if metrics.get("selected_on")
                      else "nothing was selected on them")
            body += f"<p>Scored on {html.escape(str(metrics['scored_on']))} ({chosen}).</p>"
        body += (f'<div class="kpi"><b>{metrics["macro_f1"]:.3f}</b>macro-F1 (95% CI {lo:.2f}-{hi:.2f})</div>'
                 f'<div class="kpi"><b>{metrics["accuracy"]:.3f}</b>accuracy</div>'
                 f'<div class="kpi"><b>{metrics["n"]}</b>images evaluated</div>')
    return body
