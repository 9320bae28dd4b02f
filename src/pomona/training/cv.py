"""Cross-validation (`pomona train --folds K [--repeats R]`): an honest score, a calibrated temperature and a
bagged ensemble from one command.

All labelled photos (--data, and --val-data if given) are split into K stratified folds (whole near-duplicate
groups per fold with --group-by), R times with different seeds. Each fold's model trains on the other K-1 folds
with the run's recipe, keeps its last epoch (no choice looks at the fold it is scored on) and predicts that fold
once, so every photo gets one out-of-fold prediction per repeat from a model that never saw it.

The run folder:
  folds/<r>-<k>/    each fold's own run folder (usable alone)
  folds.csv         path, label, group, repeat, fold of every photo
  oof.csv           the out-of-fold predictions: path, label, predicted, repeat, fold, one probability per class
  cv.json           oof_macro_f1 with its bootstrap CI (over photos, or over groups with --group-by), per-fold
                    and per-class F1, the temperature fitted on the out-of-fold predictions and the expected
                    calibration error before and after it (after: cross-fitted, each fold scored at a
                    temperature fitted on the other folds), the time
  run.json          the ensemble: the K x R fold models as members, their probabilities averaged, at the
                    fitted temperature; `pomona predict/evaluate/export/serve RUN` use it as any run
  eval/             metrics.json, predictions.csv and confusion_matrix.png of the out-of-fold predictions
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ..config import Config
from ..core.atomic import write_csv, write_json
from ..core.errors import PomonaError
from ..core.progress import write
from ..core.runtime import release_memory
from ..data.bundle import DataBundle, Grouper, group_photos, index_data, thin_training_frames
from ..data.groups import describe_given_groups, write_groups
from ..data.index import index_folder
from ..inference.loaded import load_run
from ..inference.records import PredictionRecord
from ..inference.runfiles import RunFolder
from ..inference.runfolder import save_ensemble
from ..models.metrics import (apply_temperature, bootstrap_ci, compute_metrics, expected_calibration_error,
                              fit_temperature, macro_f1, write_metrics)
from ..models.tta import views_for
from .fit import Callback
from .grouping import auto_grouper
from .selftrain import index_unlabeled, self_train
from .train import train_and_evaluate

@dataclass
class CVResult:
    run_dir: Path
    cv: dict
    """What cv.json holds."""
    oof: pd.DataFrame


def labelled_table(cfg: Config, folds: int = 2, grouper: Grouper | None = None) -> tuple[pd.DataFrame, dict]:
    """Every labelled photo of the run (--data or --csv, and --val-data) with its near-duplicate group, and how
    the groups were found (groups.json). With `--group-by auto` every class is cut into at least `folds` groups
    (see `groups.split_clumped`)."""
    table = index_data(cfg.data)
    if cfg.data.val_data:
        table = pd.concat([table, index_folder(cfg.data.val_data, cfg.data.group_by)], ignore_index=True)
    if table["path"].map(lambda p: str(Path(p).resolve())).duplicated().any():
        raise PomonaError("--val-data holds photos that are also in --data")
    table, grouping = group_photos(table.reset_index(drop=True), cfg.data.group_by, grouper, folds)
    return table, grouping or describe_given_groups(table, cfg.data)


def assign_folds(table: pd.DataFrame, folds: int, repeat: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of every row: stratified by label, whole groups per fold, shuffled by seed + repeat."""
    from sklearn.model_selection import StratifiedGroupKFold

    if folds < 2:
        raise PomonaError(f"--folds needs at least 2 folds, not {folds}")
    groups_per_class = table.groupby("label")["group"].nunique()
    few = groups_per_class[groups_per_class < folds]
    if len(few):
        raise PomonaError(f"--folds {folds}: these classes have fewer photo groups than folds: "
                          f"{few.to_dict()}; use --folds {max(2, int(few.min()))} or fewer")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
    fold = np.full(len(table), -1)
    for k, (_, held_out) in enumerate(splitter.split(table, table["label"], table["group"])):
        fold[held_out] = k
    return fold


def fold_bundle(table: pd.DataFrame, fold: np.ndarray, k: int, classes: list[str], every_nth: int) -> DataBundle:
    """Fold `k` held out as the validation subset, the others for training (thinned like a plain run's)."""
    split = table.assign(subset=np.where(fold == k, "val", "train"))
    if every_nth > 1:
        split = thin_training_frames(split, every_nth)
    return DataBundle(split.reset_index(drop=True), classes)


def predict_views(run_dir: Path, paths: list[str], views: tuple[str, ...], device: str) -> np.ndarray:
    """Probabilities of a fold model for `paths`, one array per test-time view (views x photos x classes)."""
    return np.stack([load_run(run_dir, device=device, engine="torch", tta=[v]).predict(paths).probs for v in views])


def ensemble_scores(y: np.ndarray, repeat_probs: list[np.ndarray], groups: np.ndarray | None,
                    n_boot: int = 2000) -> tuple[float, list[float]]:
    """Macro-F1 of the out-of-fold predictions, averaged over repeats, and its bootstrap CI."""
    preds = [p.argmax(1) for p in repeat_probs]
    score = float(np.mean([macro_f1(y, p) for p in preds]))
    if len(preds) == 1:
        return score, list(bootstrap_ci(y, preds[0], n_boot, groups=groups))
    # several repeats: resample photos (or groups) once, score every repeat on the same draw
    codes = np.unique(groups if groups is not None else np.arange(len(y)), return_inverse=True)[1]
    members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    rng = np.random.default_rng(0)
    draws = [np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
             for _ in range(n_boot)]
    scores = [np.mean([macro_f1(y[d], p[d]) for p in preds]) for d in draws]
    return score, [float(np.quantile(scores, 0.025)), float(np.quantile(scores, 0.975))]


def calibration(y: np.ndarray, view_probs: np.ndarray, fold: np.ndarray, photo: np.ndarray) -> dict:
    """The temperature fitted on all out-of-fold predictions, and ECE before and after (each fold at the
    temperature fitted on the other folds, so the 'after' is not measured on the photos it was fitted on).

    `photo` names the photo of each row (an index into the labelled table). With several repeats a photo has a
    row in every repeat: the temperature for a fold is fitted on the rows of other photos only, never on another
    repeat's row of a photo that the fold scores."""
    before = expected_calibration_error(apply_temperature(view_probs, 1.0), y)
    photo = np.asarray(photo)
    crossed = np.zeros(view_probs.shape[1:])
    for k in np.unique(fold):
        out = fold == k
        fit = ~np.isin(photo, photo[out])  # every row (of every repeat) of the photos this fold scores is left out
        t = fit_temperature(view_probs[:, fit], y[fit])
        crossed[out] = apply_temperature(view_probs[:, out], t)
    return {"temperature": fit_temperature(view_probs, y), "ece_before": before,
            "ece_after": expected_calibration_error(crossed, y), "ece_bins": 15}


def train_folds(cfg: Config, run_dir: str | Path, folds: int = 5, repeats: int = 1,
                callbacks: Iterable[Callback] = ()) -> CVResult:
    """Cross-validate `cfg` into `run_dir` (see the module docstring)."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    table, grouping = labelled_table(cfg, folds, auto_grouper(cfg.device, cfg.data.max_pixels))
    classes = sorted(table["label"].unique())
    if len(classes) < 2:
        raise PomonaError(f"need at least two classes to train, found {classes}")
    unlabeled = index_unlabeled(cfg.data.unlabeled, table["path"]) if cfg.data.unlabeled else None
    fold_cfg = replace(cfg, train=replace(cfg.train, keep="last", patience=0))
    cfg.save(folder.config)
    views = views_for(cfg.train.tta)
    y = np.array([classes.index(c) for c in table["label"]])
    assignments, oof_rows, per_fold, members = [], [], [], []
    repeat_probs, repeat_view_probs = [], []
    for r in range(repeats):
        fold = assign_folds(table, folds, r, cfg.seed)
        assignments.append(table.assign(repeat=r, fold=fold))
        view_probs = np.zeros((len(views), len(table), len(classes)))
        for k in range(folds):
            fold_dir = folder.fold(r, k)
            bundle = fold_bundle(table, fold, k, classes, cfg.data.train_every_nth)
            write(f"fold {k + 1}/{folds}" + (f" of repeat {r + 1}/{repeats}" if repeats > 1 else "") +
                  f": {len(bundle.subset('train'))} training photos, {len(bundle.subset('val'))} held out")
            fold_start = time.perf_counter()

            def train_one(b: DataBundle, folder: Path):
                return train_and_evaluate(replace(fold_cfg, seed=cfg.seed + 1000 * r + k), folder, callbacks,
                                          bundle=b, overwrite=True)  # a fold's folder holds at most its teacher

            if unlabeled:
                self_train(train_one, bundle, unlabeled, fold_dir, cfg.train.pseudo_threshold,
                           cfg.train.self_train_rounds, cfg.device)
            else:
                train_one(bundle, fold_dir)
            held_out = np.flatnonzero(fold == k)
            view_probs[:, held_out] = predict_views(fold_dir, list(table["path"][held_out]), views, cfg.device)
            score = macro_f1(y[held_out], view_probs[:, held_out].mean(0).argmax(1))
            per_fold.append({"repeat": r, "fold": k, "n": int(len(held_out)), "macro_f1": score,
                             "seconds": time.perf_counter() - fold_start})
            members.append(fold_dir)
            write(f"fold {k + 1}/{folds}: held-out macro-F1 {score:.3f}")
            gc.collect()  # the fold's model, optimiser and decoded photos: back to the OS before the next fold
            release_memory()
        probs = view_probs.mean(0)
        repeat_probs.append(probs)
        repeat_view_probs.append(view_probs)
        frame = pd.DataFrame({"path": table["path"], "label": table["label"],
                              "predicted": np.asarray(classes)[probs.argmax(1)], "repeat": r, "fold": fold})
        oof_rows.append(pd.concat([frame, pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes])], axis=1))
    oof = pd.concat(oof_rows, ignore_index=True)
    grouped = grouping["by"] != "none"
    groups = table["group"].to_numpy() if grouped else None
    score, ci = ensemble_scores(y, repeat_probs, groups)
    calib = calibration(np.tile(y, repeats), np.concatenate(repeat_view_probs, axis=1),
                        np.concatenate([a["fold"].to_numpy() + folds * r for r, a in enumerate(assignments)]),
                        np.tile(np.arange(len(table)), repeats))
    per_class = compute_metrics(y, repeat_probs[0].argmax(1), classes, n_boot=0)["per_class"]
    cv = {"folds": folds, "repeats": repeats, "n_photos": int(len(table)), "classes": classes,
          "oof_macro_f1": score, "oof_macro_f1_ci95": ci,
          "ci_over": f"{table['group'].nunique()} near-duplicate groups" if grouped else "photos",
          "grouping": grouping,
          "oof_accuracy": float(np.mean([np.mean(p.argmax(1) == y) for p in repeat_probs])),
          "oof_macro_f1_per_repeat": [macro_f1(y, p.argmax(1)) for p in repeat_probs],
          "per_fold": per_fold, "per_class_f1": {c: v["f1"] for c, v in per_class.items()}, **calib,
          "views": list(views), "self_training": bool(unlabeled), "seconds": time.perf_counter() - start,
          "selected_on": None, "ensemble_ece": "measured only on --test-data (RUN/test/metrics.json)",
          "note": "every photo is predicted by the fold model that never saw it; each fold model kept its last "
                  "epoch, so no choice looked at the photos it is scored on"}
    write_csv(folder.folds, pd.concat(assignments, ignore_index=True))
    write_groups(run_dir, table, grouping, cfg.data)
    write_csv(folder.oof, oof)
    write_json(folder.cv, cv)
    save_ensemble(run_dir, members, calib["temperature"], {"folds": folds, "repeats": repeats,
                                                          "oof_macro_f1": score, "keep": "last",
                                                          "selected_on": None})
    write_oof_evaluation(folder.eval_dir, oof[oof["repeat"] == 0], classes, groups, cv)
    return CVResult(run_dir, cv, oof)


def write_oof_evaluation(out: Path, oof: pd.DataFrame, classes: list[str], groups, cv: dict) -> None:
    """eval/ of a cross-validated run: the metrics, predictions and confusion matrix of the out-of-fold
    predictions (first repeat), in the layout `pomona evaluate` writes."""
    index = {c: i for i, c in enumerate(classes)}
    probs = oof[[f"prob_{c}" for c in classes]].to_numpy()
    metrics = compute_metrics([index[c] for c in oof["label"]], probs.argmax(1), classes, groups=groups)
    by = cv["grouping"]["by"]
    folds = (f"folds of whole near-duplicate groups ({cv['grouping']['n_groups']} groups, --group-by {by})"
             if by != "none" else "random folds (--group-by none: near-duplicates on both sides, optimistic)")
    metrics.update(scored_on="out-of-fold predictions, " + folds, selected_on=None, temperature=cv["temperature"],
                   ece_before=cv["ece_before"], ece_after=cv["ece_after"], skipped_images={})
    frame = pd.DataFrame([PredictionRecord.of(p, classes, path=path).to_row(3, verdict=False)
                          for path, p in zip(oof["path"], probs)])
    frame["true_label"] = oof["label"].to_numpy()
    write_metrics(metrics, out, frame)
