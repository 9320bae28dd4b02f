"""`pomona doctor`: check labelled photos before training, and say what to fix.

One pass over the photos (`--data` or `--csv/--images`, and optionally a `--test-data` folder) finds:

- **Duplicates.** A file's SHA-256, its perceptual hash (imagehash's pHash, and that of its mirror image) and the
  frozen Lite0 features that `pomona.data.groups` uses. Two photos are one picture when they are the same file, or
  share a pHash (`PHASH_COPY`) and their features are close; near-duplicates when their cosine distance is below
  `groups.DUPLICATE_FACTOR` (1/3) of the grouping cut (the test of `groups.cross_set_duplicates`):
  - a `--test-data` photo that duplicates a `--data` photo (*test leak*, the worst finding: the model trains on
    the photo it is scored on, and the score is flattered);
  - near-identical photos under two labels (*label conflict*: if they show one apple, a label is wrong; if
    not, the photos do not tell the two varieties apart);
  - within a class, copies of one picture (*duplicate*: the same file, or the same pHash with features within
    the duplicate cut); each copy is one row naming the earlier photo it copies, and a class most of whose
    photos are copies (video or turntable frames) gets a warning. Photos of one shelf that are merely alike
    are not listed: they are what the near-duplicate groups are for.
- **Groups.** The near-duplicate groups that splits and folds keep whole (`groups.near_duplicate_groups`, with the
  same cut), their number and sizes, and a warning for a class that lives in one or two groups: no split can hold
  out another shelf of it, so its validation score is optimistic.
- **Suspect labels.** Confident learning (cleanlab's `find_label_issues`, ranked by self-confidence) on
  out-of-fold probabilities: those of a cross-validation run (`--run RUN`, its `oof.csv`), or else of a logistic
  regression on the frozen features, fitted with group-aware folds (`StratifiedGroupKFold` on the groups, each
  class cut into at least `--folds` groups as `pomona train --folds` does), so that no photo is scored by a model
  that trained on its near-duplicates.
- **Image quality.** Unreadable files (what training would skip), tiny photos, extreme aspect ratios, blur
  (variance of the Laplacian over that of the grey levels), too dark or too bright; each relative to the
  collection's median, so that a set of small or white-background photos is not flagged as a whole.
- **Outliers.** Photos whose mean distance to their `OUTLIER_K` nearest neighbours is far above the
  collection's (robust z-score of its logarithm above `OUTLIER_Z`): not like the others.
- **Balance.** Photos per class and per group, and what `pomona train --balance max` would generate.

Written into the output folder: `report.html` (self-contained: small JPEG thumbnails embedded, each pair side
by side), `issues.csv` (one row per finding, worst kinds first), `summary.json`, `groups.csv` (path, label, set,
group) and, with `keep_features`, `features.npy` (one row per row of groups.csv).

Here: the whole check (`doctor`), the groups, the suspect labels and the balance. The checks that look at the
photos themselves (one pass per photo, pHashes, neighbours; duplicates, test leaks, quality, outliers) are
`pomona.curation.doctor_checks`, where PHASH_COPY, OUTLIER_K and the other thresholds live; the page is
`pomona.curation.doctor_page`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import PomonaError
from ..core.progress import write
from ..data.groups import DUPLICATE_FACTOR, GROUPING_MODEL, choose_threshold, normalize, split_clumped
from ..inference.runfiles import RunFolder
from .doctor_checks import (ISSUE_COLUMNS, KINDS, copy_warnings, duplicate_findings, issue_row, leak_findings,
                            neighbours, outlier_findings, photo_stats, quality_findings)
from .doctor_page import doctor_page

FEW_GROUPS = 2
"""A class whose photos fall into at most this many near-duplicate groups is warned about."""
LOGISTIC_C = 0.1
"""Inverse regularisation of the out-of-fold logistic regression on standardised frozen features."""


@dataclass
class DoctorResult:
    out: Path
    issues: pd.DataFrame
    """One row per finding (ISSUE_COLUMNS), worst kinds first, then highest score."""
    summary: dict
    """What summary.json holds."""
    groups: pd.DataFrame
    """path, label, set, group of every photo (groups.csv)."""
    suspects: pd.DataFrame
    """The suspect labels, most suspect first: row (of the data table), path, label, suggested, confidence, p_label."""


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


# ------------------------------------------------------------------------------------------- groups
def find_groups(features: np.ndarray, labels: np.ndarray, paths: list[str], cut: float):
    """`groups.near_duplicate_groups` of the photos, at the cut `cut` (`groups.choose_threshold`, computed once
    for every set)."""
    from ..data.groups import capture_times, near_duplicate_groups

    return near_duplicate_groups(features, labels, [Path(p).name for p in paths], capture_times(paths), cut)


def group_warnings(labels: np.ndarray, groups: np.ndarray) -> list[str]:
    frame = pd.DataFrame({"label": labels, "group": groups})
    per_class = frame.groupby("label")["group"].nunique()
    return [f"{label}: its {int((labels == label).sum())} photos fall into {n} near-duplicate group(s): no split or "
            "fold can hold out another shelf or session of it, so its validation score is optimistic. Add photos "
            "of it from other shelves, sessions or days" for label, n in per_class.items() if n <= FEW_GROUPS]


# ------------------------------------------------------------------------------------------- suspect labels
def out_of_fold_probs(features: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, folds: int = 5,
                      seed: int = 0) -> np.ndarray:
    """Out-of-fold class probabilities of a logistic regression on standardised frozen features, stratified
    folds that keep each group whole (StratifiedGroupKFold)."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probs = np.full((len(y), n_classes), 1.0 / n_classes)
    n_splits = min(folds, len(np.unique(groups)))
    if n_splits < 2:
        return probs
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class with fewer photos than folds: sklearn warns, the folds are fine
        for train, held in splitter.split(features, y, groups):
            if len(np.unique(y[train])) < 2:
                continue
            model = make_pipeline(StandardScaler(), LogisticRegression(C=LOGISTIC_C, max_iter=2000))
            model.fit(features[train], y[train])
            probs[held] = 0.0
            probs[np.ix_(held, model[-1].classes_)] = model.predict_proba(features[held])
    return probs


def oof_from_run(run_dir: str | Path, paths: list[str], classes: list[str]) -> np.ndarray:
    """The out-of-fold probabilities of a cross-validation run (RUN/oof.csv, averaged over repeats) for `paths`
    and `classes` (renormalised over them); rows of NaN for photos the run did not score."""
    run_dir = Path(run_dir)
    oof_path = RunFolder(run_dir).oof
    if not oof_path.is_file():
        raise PomonaError(f"{run_dir} has no oof.csv: give a cross-validation run (pomona train --folds K), or "
                          "leave out --run for a quick out-of-fold model on frozen features")
    oof = pd.read_csv(oof_path)
    have = [c.removeprefix("prob_") for c in oof.columns if c.startswith("prob_")]
    unknown = sorted(set(classes) - set(have))
    if unknown:
        raise PomonaError(f"{oof_path} has no probabilities for {unknown} (the run's classes: {have}): give a run "
                          "trained on these classes")
    oof["key"] = [str(Path(p).resolve()) for p in oof["path"]]
    mean = oof.groupby("key")[[f"prob_{c}" for c in classes]].mean()
    mean = mean.div(mean.sum(axis=1).replace(0, np.nan), axis=0)
    return mean.reindex([str(Path(p).resolve()) for p in paths]).to_numpy(dtype=np.float64)


def suspect_labels(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Rows whose label confident learning doubts, most suspect first (cleanlab's `find_label_issues`, ranked by
    self-confidence: the out-of-fold probability of the given label)."""
    from cleanlab.filter import find_label_issues

    if probs.shape[1] < 2 or len(np.unique(y)) < 2:
        return np.zeros(0, np.int64)
    return np.asarray(find_label_issues(y, probs, return_indices_ranked_by="self_confidence", n_jobs=1),
                      dtype=np.int64)


# ------------------------------------------------------------------------------------------- balance
def balance_summary(labels: np.ndarray, groups: np.ndarray) -> dict:
    """Photos and groups per class, and what `--balance max` would generate."""
    from ..data.balance import plan_balance

    frame = pd.DataFrame({"label": labels, "group": groups})
    counts = frame["label"].value_counts().sort_index()
    sizes = frame.groupby(["label", "group"]).size()
    plan = plan_balance({c: int(n) for c, n in counts.items()}, "max")
    per_class = {c: {"photos": int(counts[c]), "groups": int(sizes[c].size), "largest_group": int(sizes[c].max()),
                     "median_group": float(sizes[c].median()), "balance_max_adds": int(plan.extra.get(c, 0))}
                 for c in counts.index}
    return {"per_class": per_class, "imbalance": round(float(counts.max() / counts.min()), 2),
            "balance_max_adds": int(sum(plan.extra.values())),
            "note": "`pomona train --balance max` balances the training fold after the split: about "
                    "(1 - --val-fraction) of these numbers, or (K-1)/K of them per fold with --folds K"}


# ------------------------------------------------------------------------------------------- the whole check
def doctor(table: pd.DataFrame, out: str | Path, test: pd.DataFrame | None = None, run: str | Path | None = None,
           device: str = "auto", max_pixels: int = 64_000_000, folds: int = 5, seed: int = 0, show: int = 40,
           keep_features: bool = False, features: np.ndarray | None = None) -> DoctorResult:
    """Check the labelled photos of `table` (path, label) and, if given, a test table; write report.html,
    issues.csv, summary.json and groups.csv into `out`. `run`: a cross-validation run whose oof.csv gives the
    out-of-fold probabilities. `features`: the grouping features of the table's photos then the test's (computed
    when not given)."""
    from ..core.atomic import write_csv, write_json, write_text
    from ..training.grouping import compute_grouping_features

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sets = {"data": table.reset_index(drop=True)}
    if test is not None and len(test):
        sets["test"] = test.reset_index(drop=True)
    all_paths = [p for t in sets.values() for p in t["path"]]
    if features is None:
        features = compute_grouping_features(all_paths, device, max_pixels)
    features = np.asarray(features, dtype=np.float32)
    if len(features) != len(all_paths):
        raise ValueError(f"{len(features)} feature rows for {len(all_paths)} photos")
    write(f"checking {len(sets['data'])} photos" + (f" and {len(sets['test'])} test photos" if "test" in sets else ""))
    stats_all = photo_stats(all_paths, max_pixels)

    issues: list[dict] = []
    info: dict[str, dict] = {}
    offset = 0
    cut = None
    group_frames = []
    for name, frame in sets.items():
        n = len(frame)
        stats = stats_all.iloc[offset:offset + n].reset_index(drop=True)
        feats = features[offset:offset + n]
        offset += n
        paths, labels = list(frame["path"]), frame["label"].to_numpy(dtype=object)
        ok = np.flatnonzero(stats["error"].to_numpy() == "")
        if not len(ok):
            raise PomonaError(f"none of the {n} photos of {name} could be read (e.g. {paths[0]}: "
                              f"{stats['error'][0]})")
        issues += quality_findings(paths, labels, stats, name)
        nb = neighbours(feats[ok], labels[ok])
        if cut is None:  # the grouping cut of --data, used for every set
            cut = choose_threshold(feats[ok], labels[ok])
        ok_paths = [paths[i] for i in ok]
        x = normalize(feats[ok])
        issues += duplicate_findings(ok_paths, labels[ok], stats.iloc[ok].reset_index(drop=True), x, nb, cut, name)
        issues += outlier_findings(ok_paths, labels[ok], nb, name)
        grouping = find_groups(feats[ok], labels[ok], ok_paths, cut)
        groups = np.array([f"unreadable/{i}" for i in range(n)], dtype=object)
        groups[ok] = grouping.groups
        group_frames.append(pd.DataFrame({"path": paths, "label": labels, "set": name, "group": groups}))
        info[name] = {"frame": frame, "stats": stats, "ok": ok, "features": feats, "labels": labels,
                      "grouping": grouping, "paths": paths}

    data = info["data"]
    ok, labels = data["ok"], data["labels"]
    grouping = data["grouping"]
    warnings_ = group_warnings(labels[ok], grouping.groups) + copy_warnings(issues, labels)

    leaks = leak_findings(info["test"], data, cut) if "test" in info else []
    issues += leaks

    # suspect labels
    classes = sorted(set(labels))
    y = np.array([classes.index(c) for c in labels])
    if run:
        probs = oof_from_run(run, data["paths"], classes)
        source = f"the out-of-fold probabilities of {run} (oof.csv)"
    else:
        probs = np.full((len(labels), len(classes)), np.nan)
        groups = split_clumped(grouping, labels[ok], data["features"][ok], folds).groups
        probs[ok] = out_of_fold_probs(data["features"][ok], y[ok], groups, len(classes), folds, seed)
        source = (f"a logistic regression on frozen {GROUPING_MODEL} features, {folds} stratified folds keeping "
                  "near-duplicate groups whole")
    scored = np.flatnonzero(~np.isnan(probs).any(1))
    ranked = scored[suspect_labels(y[scored], probs[scored])] if len(scored) else scored
    if run and len(scored) < len(ok):
        warnings_.append(f"{run}/oof.csv scores {len(scored)} of the {len(ok)} readable photos (matched by "
                         "path): suspects are looked for among those only")
    suspects = pd.DataFrame({"row": ranked, "path": [data["paths"][i] for i in ranked], "label": labels[ranked],
                             "suggested": [classes[k] for k in probs[ranked].argmax(1)],
                             "confidence": probs[ranked].max(1), "p_label": probs[ranked, y[ranked]]})
    for r in suspects.itertuples():
        issues.append(issue_row(r.path, "suspect label", 1 - r.p_label, f"check the label: the out-of-fold model says "
                                f"{r.suggested} ({r.confidence:.0%}), {r.label} only {r.p_label:.0%}",
                                label=r.label, suggested=r.suggested, confidence=round(float(r.confidence), 4),
                                detail=source))

    frame = pd.DataFrame(issues, columns=ISSUE_COLUMNS)
    frame["order"] = frame["kind"].map({k: i for i, k in enumerate(KINDS)})
    frame = frame.sort_values(["order", "score"], ascending=[True, False], kind="stable").drop(columns="order")
    frame = frame.reset_index(drop=True)
    counts = {k: int((frame["kind"] == k).sum()) for k in KINDS}
    group_table = pd.concat(group_frames, ignore_index=True)
    gsum = grouping.summary()
    summary = {
        "photos": {name: len(v["frame"]) for name, v in info.items()},
        "classes": classes, "findings": counts,
        "groups": {**gsum, "per_class": {c: int(n) for c, n in pd.Series(grouping.groups).groupby(
            labels[ok]).nunique().items()}},
        "duplicate_cut": round(float(cut) * DUPLICATE_FACTOR, 4),
        "suspects": {"method": "cleanlab.filter.find_label_issues, ranked by self-confidence", "probabilities": source,
                     "scored": int(len(scored))},
        "balance": balance_summary(labels[ok], grouping.groups), "warnings": warnings_,
        "test_leaks": len(leaks), "seconds": round(time.perf_counter() - start, 1),
        "files": ["report.html", "issues.csv", "summary.json", "groups.csv"] + (["features.npy"] if keep_features
                                                                                else []),
    }
    write_csv(out / "issues.csv", frame)
    write_csv(out / "groups.csv", group_table)
    write_json(out / "summary.json", summary)
    if keep_features:
        from ..core.atomic import atomic_write

        atomic_write(out / "features.npy", lambda tmp: _save_npy(tmp, features))
    write_text(out / "report.html", doctor_page(frame, summary, suspects, show))
    return DoctorResult(out, frame, summary, group_table, suspects)
