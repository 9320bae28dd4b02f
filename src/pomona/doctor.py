"""`pomona doctor`: check labelled photos before training, and say what to fix.

One pass over the photos (`--data` or `--csv/--images`, and optionally a `--test-data` folder) finds:

- **Duplicates.** A file's SHA-256, its perceptual hash (imagehash's pHash, and that of its mirror image) and the
  frozen Lite0 features that `pomona.groups` uses. Two photos are one picture when they are the same file, or
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
"""

from __future__ import annotations

import hashlib
import html
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import PomonaError
from .groups import (DUPLICATE_FACTOR, GROUPING_MODEL, choose_threshold, cross_set_duplicates, normalize,
                     split_clumped)
from .progress import Progress, write

PHASH_COPY = 2
"""Two photos whose 64-bit pHashes differ in at most this many bits, the one or the other mirrored left-right, are
one picture when their features are close too: within SAME_PICTURE_FACTOR grouping cuts for test leaks and
label conflicts (`same_picture`), within the duplicate cut for copies within a class. Resized, re-compressed and
flipped copies keep their pHash; a cropped copy does not, and is found only when its features are within the
duplicate cut."""
SAME_PICTURE_FACTOR = 1.5
"""See `same_picture`: on the grocery photos a flipped copy shrunk to 40% and re-compressed at quality 30-60 lies
at about the grouping cut; different fruits360 frames that share a pHash lie at 2 cuts and more."""
STATS_SIDE = 256
"""Blur and brightness are measured on the photo resized to this square, so that resolution does not matter."""
BLUR_FACTOR = 10.0
"""Blurred: sharpness (variance of the Laplacian over the variance of the grey levels) below 1/BLUR_FACTOR of
the collection's median."""
EXPOSURE_FACTOR = 0.3
"""Too dark: mean brightness below this fraction of the collection's median; too bright: the headroom to white
(255 - brightness) below this fraction of the median headroom."""
DARKEST, BRIGHTEST = 20.0, 240.0
"""Mean brightness (0-255) below or above which a photo is too dark or too bright whatever the collection."""
TINY_SIDE = 64
"""Tiny: shorter side below this many pixels, or below a quarter of the collection's median shorter side."""
MAX_RATIO = 3.0
"""Extreme aspect ratio: longer side more than this many times the shorter (the centre crop keeps a strip)."""
OUTLIER_K, OUTLIER_Z, OUTLIER_MIN_PHOTOS = 5, 3.5, 20
"""Outliers: mean cosine distance to the K nearest photos of the set; flagged above this robust z-score of its
logarithm (median and MAD), in sets of at least this many readable photos."""
COPY_SHARE = 0.5
"""A class more than this share of whose photos are copies of one another is warned about (video frames)."""
FEW_GROUPS = 2
"""A class whose photos fall into at most this many near-duplicate groups is warned about."""
LOGISTIC_C = 0.1
"""Inverse regularisation of the out-of-fold logistic regression on standardised frozen features."""

KINDS = ["test leak", "label conflict", "suspect label", "duplicate", "unreadable", "blurred", "too dark",
         "too bright", "tiny", "extreme aspect ratio", "outlier"]
"""The kinds of finding, worst first (the order of issues.csv and of the report)."""
ISSUE_COLUMNS = ["photo", "kind", "score", "suggestion", "other_photo", "set", "label", "other_label",
                 "suggested_label", "confidence", "detail"]


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


# ------------------------------------------------------------------------------------------- one pass per photo
def photo_stats(paths: list[str], max_pixels: int = 64_000_000) -> pd.DataFrame:
    """Per photo: width, height (upright), brightness (mean grey level 0-255), sharpness (variance of the
    Laplacian at STATS_SIDE x STATS_SIDE over the variance of the grey levels: a darker or flatter photo is not
    taken for a blurred one), phash and phash_mirror (64-bit pHashes of the photo and of its left-right
    mirror image), sha256 of the file, and the error of an
    unreadable one (as training would skip it)."""
    import imagehash
    from PIL import Image

    from .images import BadImageError, image_size, load_image

    rows = []
    for path in Progress(paths, desc="checking photos", unit="img"):
        row = {"width": np.nan, "height": np.nan, "brightness": np.nan, "sharpness": np.nan, "phash": 0,
               "phash_mirror": 0, "sha256": "", "error": ""}
        try:
            row["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            row["width"], row["height"] = image_size(path, max_pixels)
            img = load_image(path, max_pixels, target=STATS_SIDE)
            grey = np.asarray(img.convert("L").resize((STATS_SIDE, STATS_SIDE), Image.Resampling.BILINEAR),
                              dtype=np.float32)
            lap = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
            row.update(brightness=float(grey.mean()), sharpness=float(lap.var() / max(float(grey.var()), 1e-6)),
                       phash=int(str(imagehash.phash(img)), 16),
                       phash_mirror=int(str(imagehash.phash(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))), 16))
        except BadImageError as e:
            row["error"] = str(e)
        except OSError as e:  # a file that vanished or cannot be read at all
            row["error"] = f"cannot read: {e.strerror or e}"
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in ("phash", "phash_mirror"):
        frame[column] = frame[column].astype(np.uint64)
    return frame


def _popcount(a) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has `bitwise_count`)."""
    a = np.asarray(a, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(a)
    return np.unpackbits(a[..., None].view(np.uint8), axis=-1).sum(-1)


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


@dataclass
class Neighbours:
    """Within one set of photos: the k nearest photos of each (indices and cosine distances, nearest first) and
    the nearest photo of another class (-1 and inf when there is none)."""

    knn: np.ndarray
    knn_dist: np.ndarray
    other: np.ndarray
    other_dist: np.ndarray


def neighbours(features: np.ndarray, labels: np.ndarray, k: int = OUTLIER_K, block: int = 1024) -> Neighbours:
    """`Neighbours` from blocks of the distance matrix (memory: block x N, never N x N)."""
    x = normalize(features)
    n = len(x)
    codes = np.unique(np.asarray(labels, dtype=object), return_inverse=True)[1]
    k = max(0, min(k, n - 1))
    knn, knn_dist = np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
    other, other_dist = np.full(n, -1), np.full(n, np.inf)
    for start in range(0, n, block):
        stop = min(n, start + block)
        d = np.clip(1.0 - x[start:stop] @ x.T, 0.0, 2.0)
        rows = np.arange(stop - start)
        d[rows, rows + start] = np.inf
        if k:
            part = np.argpartition(d, k - 1, axis=1)[:, :k]
            order = np.argsort(np.take_along_axis(d, part, 1), axis=1, kind="stable")
            knn[start:stop] = np.take_along_axis(part, order, 1)
            knn_dist[start:stop] = np.take_along_axis(d, knn[start:stop], 1)
        d[codes[start:stop, None] == codes[None, :]] = np.inf
        nearest = d.argmin(1)
        other_dist[start:stop] = d[rows, nearest]
        other[start:stop] = np.where(np.isfinite(other_dist[start:stop]), nearest, -1)
    return Neighbours(knn, knn_dist, other, other_dist)


def phash_pairs(stats: pd.DataFrame, others: pd.DataFrame | None = None, limit: int = PHASH_COPY,
                block: int = 1024) -> np.ndarray:
    """(i, j) of every two photos whose pHashes are within `limit` bits, the one or the other mirrored (a
    left-right flipped copy): i < j within `stats`, or i in `stats` and j in `others` (blocks of the N x M
    comparison)."""
    h = stats["phash"].to_numpy(dtype=np.uint64)
    other = stats if others is None else others
    o, m = other["phash"].to_numpy(dtype=np.uint64), other["phash_mirror"].to_numpy(dtype=np.uint64)
    found = [np.zeros((0, 2), np.int64)]
    for start in range(0, len(h), block):
        x = h[start:start + block, None]
        i, j = np.nonzero(np.minimum(_popcount(x ^ o[None, :]), _popcount(x ^ m[None, :])) <= limit)
        i = i + start
        if others is None:  # both orders of a pair: keep it once
            keep = i != j
            i, j = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
        found.append(np.stack([i, j], 1))
    pairs = np.concatenate(found)
    return np.unique(pairs, axis=0) if others is None and len(pairs) else pairs


def hash_bits(a: pd.Series, b: pd.Series) -> int:
    """pHash distance of two photos (rows of `photo_stats`), the one or the other mirrored."""
    return int(min(_popcount(np.uint64(a["phash"]) ^ np.uint64(b["phash"])),
                   _popcount(np.uint64(a["phash"]) ^ np.uint64(b["phash_mirror"]))))


def _distances(x: np.ndarray, y: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine distance of each (row of unit features x, row of y) pair."""
    if not len(pairs):
        return np.zeros(0)
    return np.clip(1.0 - np.einsum("ij,ij->i", x[pairs[:, 0]], y[pairs[:, 1]]), 0.0, 2.0)


def same_picture(pairs: np.ndarray, d: np.ndarray, cut: float) -> np.ndarray:
    """Which pHash pairs (within PHASH_COPY bits) are one picture: their features are also within
    SAME_PICTURE_FACTOR times the grouping cut. (A copy shrunk to 40% and re-compressed keeps its pHash while
    its features move as far as photos of one shelf lie apart; two different photos of a plain background can
    share a pHash, but their features lie further apart.)"""
    return d <= SAME_PICTURE_FACTOR * cut


# ------------------------------------------------------------------------------------------- findings
def _row(photo, kind, score, suggestion, *, other="", set_name="data", label="", other_label="", suggested="",
         confidence=np.nan, detail="") -> dict:
    return {"photo": photo, "kind": kind, "score": round(float(score), 4), "suggestion": suggestion,
            "other_photo": other, "set": set_name, "label": label, "other_label": other_label,
            "suggested_label": suggested, "confidence": confidence, "detail": detail}


def _how_alike(same_file: bool, bits: int, distance: float) -> str:
    if same_file:
        return "the same file"
    if bits <= PHASH_COPY:
        return (f"the same picture, resized, re-compressed or mirrored (pHash {bits} bits apart, cosine distance "
                f"{distance:.3f})")
    return f"a near-duplicate: cropped, edited or shot again (cosine distance {distance:.3f})"


def duplicate_findings(paths: list[str], labels: np.ndarray, stats: pd.DataFrame, x: np.ndarray,
                       nb: Neighbours, cut: float, set_name: str) -> list[dict]:
    """Label conflicts (a photo of another class within the duplicate cut, or the same file) and copies within a
    class (the same file, or the same pHash and near-duplicate features) of one set; `x` unit features."""
    close = cut * DUPLICATE_FACTOR
    sha = stats["sha256"].to_numpy()
    n = len(paths)

    def bits(i: int, j: int) -> int:
        return hash_bits(stats.iloc[i], stats.iloc[j])

    found = []
    conflicts = {}  # near-identical photos under two labels: features within the duplicate cut, or the same picture
    for i in np.flatnonzero(nb.other_dist <= close):
        conflicts.setdefault((min(i, int(nb.other[i])), max(i, int(nb.other[i]))), float(nb.other_dist[i]))
    pairs = phash_pairs(stats)
    d = _distances(x, x, pairs)
    across = (labels[pairs[:, 0]] != labels[pairs[:, 1]]) & same_picture(pairs, d, cut)
    for (i, j), dij in zip(pairs[across], d[across]):
        conflicts.setdefault((int(i), int(j)), float(dij))
    for (i, j), dij in sorted(conflicts.items(), key=lambda kv: kv[1]):
        found.append(_row(paths[i], "label conflict", 1 - dij / cut, f"near-identical photos under two labels, "
                          f"{labels[i]} and {labels[j]}: if they show the same apple, one label is wrong (keep "
                          "the right one); if not, the photos do not tell these varieties apart",
                          other=paths[j], set_name=set_name, label=labels[i], other_label=labels[j],
                          detail=_how_alike(sha[i] == sha[j], bits(i, j), dij)))
    # copies within a class: same file, or same pHash with near-duplicate features
    by_sha = pd.Series(np.arange(n)).groupby(sha).apply(list)
    same = np.asarray([(g[0], g[k]) for g in by_sha for k in range(1, len(g))], np.int64).reshape(-1, 2)
    pairs = np.concatenate([pairs, same])
    d = np.concatenate([d, _distances(x, x, same)])
    same_class = (labels[pairs[:, 0]] == labels[pairs[:, 1]]) & ((sha[pairs[:, 0]] == sha[pairs[:, 1]]) | (d <= close))
    copies = pd.DataFrame({"i": pairs[same_class, 0], "j": pairs[same_class, 1], "d": d[same_class]})
    # each photo that copies an earlier one (in table order) names the nearest of those: n - 1 rows for n copies
    for r in copies.sort_values("d", kind="stable").drop_duplicates("j").sort_values("j").itertuples():
        i, j = int(r.i), int(r.j)
        found.append(_row(paths[j], "duplicate", 1 - r.d / cut, f"a copy of {paths[i]} in its class: keep one of "
                          "the two (a copy weighs one picture twice)", other=paths[i], set_name=set_name,
                          label=labels[j], other_label=labels[i], detail=_how_alike(sha[i] == sha[j], bits(i, j),
                                                                                    float(r.d))))
    return found


def copy_warnings(issues: list[dict], labels: np.ndarray) -> list[str]:
    """Classes most of whose photos are copies of one another (video or turntable frames)."""
    frame = pd.DataFrame([r for r in issues if r["kind"] == "duplicate" and r["set"] == "data"],
                         columns=["photo", "other_photo", "label"])
    involved = pd.concat([frame[["photo", "label"]], frame[["other_photo", "label"]].set_axis(
        ["photo", "label"], axis=1)]).drop_duplicates().groupby("label").size()
    counts = pd.Series(labels).value_counts()
    return [f"{label}: {k} of its {counts[label]} photos are near-identical copies of another of its photos (the "
            "frames of a video or of a turntable pass?): the near-duplicate groups keep them on one side of a "
            "split, and `pomona train --train-every-nth N` trains on every Nth of them at little cost"
            for label, k in involved.items() if k > COPY_SHARE * counts[label]]


def _median(values: pd.Series) -> float:
    v = values.dropna()
    return float(v.median()) if len(v) else float("nan")


def quality_findings(paths: list[str], labels: np.ndarray, stats: pd.DataFrame, set_name: str) -> list[dict]:
    """Unreadable, tiny, extreme aspect ratio, blurred, too dark, too bright: each relative to the set."""
    found = []
    ok = stats["error"] == ""
    short = np.minimum(stats["width"], stats["height"])
    long = np.maximum(stats["width"], stats["height"])
    med_short, med_sharp = _median(short[ok]), _median(stats.loc[ok, "sharpness"])
    med_bright = _median(stats.loc[ok, "brightness"])
    for i, r in stats.iterrows():
        row = dict(set_name=set_name, label=labels[i])
        if r["error"]:
            found.append(_row(paths[i], "unreadable", 1.0, "training skips it: replace the file or remove it",
                              detail=r["error"], **row))
            continue
        side, ratio = short[i], long[i] / max(short[i], 1)
        tiny = min(TINY_SIDE, med_short / 4)
        if side < tiny:
            found.append(_row(paths[i], "tiny", 1 - side / tiny, "the model sees it blown up: use a larger photo, "
                              "or drop it", detail=f"{int(r['width'])}x{int(r['height'])} pixels (the collection's "
                              f"median shorter side: {med_short:.0f})", **row))
        if ratio > MAX_RATIO:
            found.append(_row(paths[i], "extreme aspect ratio", 1 - MAX_RATIO / ratio, "the centre crop keeps a "
                              "small part of it: crop it around the apple", detail=f"{int(r['width'])}x"
                              f"{int(r['height'])} pixels ({ratio:.1f}:1)", **row))
        if med_sharp > 0 and r["sharpness"] < med_sharp / BLUR_FACTOR:
            found.append(_row(paths[i], "blurred", 1 - r["sharpness"] / med_sharp, "out of focus or shaken: "
                              "retake it, or drop it", detail=f"sharpness {r['sharpness']:.4f}, "
                              f"{med_sharp / max(r['sharpness'], 1e-9):.0f}x below the collection's median "
                              f"({med_sharp:.4f})", **row))
        b = r["brightness"]
        if b < DARKEST or b < EXPOSURE_FACTOR * med_bright:
            found.append(_row(paths[i], "too dark", 1 - b / max(med_bright, 1e-9), "under-exposed: retake it "
                              "in better light, or drop it", detail=f"mean brightness {b:.0f}/255 (the "
                              f"collection's median: {med_bright:.0f})", **row))
        elif b > BRIGHTEST or 255 - b < EXPOSURE_FACTOR * (255 - med_bright):
            found.append(_row(paths[i], "too bright", 1 - (255 - b) / max(255 - med_bright, 1e-9), "over-exposed: "
                              "retake it, or drop it", detail=f"mean brightness {b:.0f}/255 (the collection's "
                              f"median: {med_bright:.0f})", **row))
    return found


def outlier_findings(paths: list[str], labels: np.ndarray, nb: Neighbours, set_name: str) -> list[dict]:
    """Photos far from every other photo of their set (see OUTLIER_Z)."""
    if len(paths) < OUTLIER_MIN_PHOTOS or not nb.knn_dist.size:
        return []
    score = np.log(np.maximum(nb.knn_dist.mean(1), 1e-9))
    med = np.median(score)
    mad = 1.4826 * np.median(np.abs(score - med))
    if mad <= 0:
        return []
    z = (score - med) / mad
    return [_row(paths[i], "outlier", 1 - math.exp(med - score[i]), "not like the other photos: check that it is "
                 "an apple photo of this collection (and of its label)", set_name=set_name, label=labels[i],
                 other=paths[int(nb.knn[i, 0])], other_label=labels[int(nb.knn[i, 0])],
                 detail=f"mean distance to its {nb.knn.shape[1]} nearest photos {math.exp(score[i]):.3f}, the "
                 f"collection's median {math.exp(med):.3f} (robust z {z[i]:.1f}); nearest photo: other_photo")
            for i in np.flatnonzero(z > OUTLIER_Z)]


# ------------------------------------------------------------------------------------------- groups
def find_groups(features: np.ndarray, labels: np.ndarray, paths: list[str], cut: float):
    """`groups.near_duplicate_groups` of the photos, at the cut `cut` (`groups.choose_threshold`, computed once
    for every set)."""
    from .groups import capture_times, near_duplicate_groups

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
    oof_path = run_dir / "oof.csv"
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
    from .balance import plan_balance

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


def leak_findings(test: dict, data: dict, cut: float) -> list[dict]:
    """Test photos that copy a --data photo: the same file, the same picture (`same_picture`), or features within
    the duplicate cut (`groups.cross_set_duplicates`); the nearest such photo of --data for each."""
    tok, dok = test["ok"], data["ok"]
    found = {}
    for i, j, d in cross_set_duplicates(test["features"][tok], data["features"][dok], cut):
        found[int(tok[i])] = (int(dok[j]), d)
    pairs = phash_pairs(test["stats"].iloc[tok], data["stats"].iloc[dok])
    d = _distances(normalize(test["features"][tok]), normalize(data["features"][dok]), pairs)
    keep = same_picture(pairs, d, cut)
    for (i, j), dij in zip(pairs[keep], d[keep]):
        if int(tok[i]) not in found or dij < found[int(tok[i])][1]:
            found[int(tok[i])] = (int(dok[j]), float(dij))
    by_sha = {s: i for i, s in reversed(list(enumerate(data["stats"]["sha256"]))) if s}
    for i, s in enumerate(test["stats"]["sha256"]):
        if s in by_sha and i not in found:
            found[i] = (by_sha[s], 0.0)
    rows = []
    for i, (j, d) in sorted(found.items(), key=lambda kv: kv[1][1]):
        same = test["stats"]["sha256"][i] == data["stats"]["sha256"][j]
        rows.append(_row(test["paths"][i], "test leak", 1 - d / cut, f"a copy of the training photo "
                         f"{data['paths'][j]}: remove it from the test set (or that photo from --data); a test photo "
                         "the model trained on flatters the score", other=data["paths"][j], set_name="test",
                         label=test["labels"][i], other_label=data["labels"][j],
                         detail=_how_alike(same, hash_bits(test["stats"].iloc[i], data["stats"].iloc[j]), d)))
    return rows


# ------------------------------------------------------------------------------------------- the whole check
def doctor(table: pd.DataFrame, out: str | Path, test: pd.DataFrame | None = None, run: str | Path | None = None,
           device: str = "auto", max_pixels: int = 64_000_000, folds: int = 5, seed: int = 0, show: int = 40,
           keep_features: bool = False, features: np.ndarray | None = None) -> DoctorResult:
    """Check the labelled photos of `table` (path, label) and, if given, a test table; write report.html,
    issues.csv, summary.json and groups.csv into `out`. `run`: a cross-validation run whose oof.csv gives the
    out-of-fold probabilities. `features`: the grouping features of the table's photos then the test's (computed
    when not given)."""
    from .atomic import write_csv, write_json, write_text
    from .groups import compute_grouping_features

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
        issues.append(_row(r.path, "suspect label", 1 - r.p_label, f"check the label: the out-of-fold model says "
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
        from .atomic import atomic_write

        atomic_write(out / "features.npy", lambda tmp: _save_npy(tmp, features))
    write_text(out / "report.html", doctor_page(frame, summary, suspects, show))
    return DoctorResult(out, frame, summary, group_table, suspects)


# ------------------------------------------------------------------------------------------- the page
_PAGE_CSS = """
.pairs{display:flex;flex-wrap:wrap;gap:14px}.pair{display:flex;gap:6px;background:#fafbf8;border:1px solid #e3e6e0;
border-radius:8px;padding:6px;font-size:.78em;max-width:420px}.pair figure{margin:0;width:200px}
.pair img,.photo img{width:200px;height:200px;object-fit:contain;background:#eee;border-radius:6px}
.photo{width:200px;font-size:.78em}.photo figure{margin:0}.pair figcaption,.photo figcaption{overflow-wrap:anywhere}
.note{color:#555;font-size:.85em}.warn{color:#a33}.kind{font-weight:600}
"""


class Thumbnails:
    """Small JPEG data URIs of photos, each made once per page."""

    def __init__(self, side: int = 100):
        self.side, self.cache = side, {}

    def __call__(self, path: str) -> str:
        from .report import _thumbnail

        if path not in self.cache:
            self.cache[path] = _thumbnail(path, self.side) or ""
        return self.cache[path]


def figure(thumbs: Thumbnails, path: str, caption: str) -> str:
    src = thumbs(path)
    img = f'<img alt="{html.escape(Path(path).name)}" src="{src}">' if src else '<div class="warn">unreadable</div>'
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """A self-contained page: (id, heading, body HTML) sections."""
    from .report import _CSS

    body = "".join(f'<section id="{key}"><h2>{html.escape(heading)}</h2>{content}</section>'
                   for key, heading, content in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}{_PAGE_CSS}</style></head><body><header><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(subtitle)}</p></header><main>{body}</main></body></html>")


def _name(path: str) -> str:
    p = Path(path)
    return html.escape(f"{p.parent.name}/{p.name}")


def _pairs(rows: pd.DataFrame, thumbs: Thumbnails, show: int, first: str, second: str) -> str:
    cards = []
    for r in rows.head(show).itertuples():
        cards.append('<div class="pair">' + figure(thumbs, r.photo, f"<b>{first}</b> {_name(r.photo)}<br>label "
                                                   f"{html.escape(str(r.label))}")
                     + figure(thumbs, r.other_photo, f"<b>{second}</b> {_name(r.other_photo)}<br>label "
                              f"{html.escape(str(r.other_label))}<br>{html.escape(r.detail)}") + "</div>")
    more = f'<p class="note">... and {len(rows) - show} more in issues.csv</p>' if len(rows) > show else ""
    return f'<div class="pairs">{"".join(cards)}</div>{more}'


def doctor_page(issues: pd.DataFrame, summary: dict, suspects: pd.DataFrame, show: int) -> str:
    from .report import _table

    thumbs = Thumbnails()
    counts = summary["findings"]
    n = summary["photos"]
    kpis = "".join(f'<div class="kpi"><b>{counts[k]}</b>{html.escape(k)}</div>' for k in KINDS
                   if counts[k] or k in ("test leak", "label conflict", "suspect label", "duplicate"))
    warn = "".join(f'<p class="warn">Warning: {html.escape(w)}</p>' for w in summary["warnings"])
    sections = [("summary", "Summary", kpis + warn + f'<p class="note">{n["data"]} photos'
                 + (f", {n['test']} test photos" if "test" in n else "") + f"; {summary['seconds']:.0f} s. Every "
                 "finding is a row of issues.csv, worst kinds first.</p>")]

    def of(kind: str) -> pd.DataFrame:
        return issues[issues["kind"] == kind]

    if "test" in n:
        leaks = of("test leak")
        sections.append(("leaks", f"Test photos that copy training photos ({len(leaks)})",
                         _pairs(leaks, thumbs, show, "test", "training") if len(leaks) else
                         "<p>None: no test photo is a copy or near-duplicate of a training photo.</p>"))
    conflicts = of("label conflict")
    sections.append(("conflicts", f"Near-identical photos under two labels ({len(conflicts)})",
                     _pairs(conflicts, thumbs, show, "", "") if len(conflicts) else "<p>None.</p>"))
    cards = []
    for r in suspects.head(show).itertuples():
        cards.append('<div class="photo">' + figure(
            thumbs, r.path, f"{_name(r.path)}<br>label <b>{html.escape(r.label)}</b> ({r.p_label:.0%})<br>suggested "
            f"<b>{html.escape(r.suggested)}</b> ({r.confidence:.0%})") + "</div>")
    more = f'<p class="note">... and {len(suspects) - show} more in issues.csv</p>' if len(suspects) > show else ""
    sections.append(("suspects", f"Suspect labels ({len(suspects)})", f'<p class="note">Confident learning on '
                     f'{html.escape(summary["suspects"]["probabilities"])}; most suspect first.</p>'
                     + (f'<div class="gallery">{"".join(cards)}</div>{more}' if cards else "<p>None.</p>")))
    dups = of("duplicate")
    sections.append(("duplicates", f"Copies within a class ({len(dups)})",
                     _pairs(dups, thumbs, show, "copy", "of") if len(dups) else "<p>None.</p>"))
    quality = issues[issues["kind"].isin(KINDS[4:10])]
    cards = ['<div class="photo">' + figure(thumbs, r.photo, f'<span class="kind">{html.escape(r.kind)}</span> '
                                            f"{_name(r.photo)}<br>{html.escape(r.detail)}") + "</div>"
             for r in quality.head(show).itertuples()]
    sections.append(("quality", f"Image quality ({len(quality)})",
                     f'<div class="gallery">{"".join(cards)}</div>' if cards else "<p>Nothing flagged.</p>"))
    outliers = of("outlier")
    sections.append(("outliers", f"Not like the others ({len(outliers)})",
                     _pairs(outliers, thumbs, show, "outlier", "its nearest photo") if len(outliers) else
                     "<p>None.</p>"))
    g = summary["groups"]
    sections.append(("groups", f"Near-duplicate groups ({g['n_groups']})", f"<p>{html.escape(g['method'])}: "
                     f"{g['n_groups']} groups, the largest of {g['largest']} photos, {g['singletons']} single "
                     "photos. Splits and folds keep each group on one side.</p>" + warn))
    b = summary["balance"]
    rows = [[c, v["photos"], v["groups"], v["largest_group"], v["balance_max_adds"]] for c, v in b["per_class"].items()]
    sections.append(("balance", "Balance", _table(rows, ["class", "photos", "groups", "largest group",
                                                         "--balance max adds"])
                     + f'<p class="note">Largest class / smallest: {b["imbalance"]:.1f}. '
                       f'{html.escape(b["note"])}.</p>'))
    return page("pomona doctor", "what to fix before training", sections)
