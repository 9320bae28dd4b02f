"""Near-duplicate groups (`--group-by auto`, the default): photos of one shelf session, one turntable pass or one
burst become one group, so that a split or a cross-validation fold keeps them on one side.

Random folds put near-identical shots of one shelf on both sides of a split; every score is then flattered (on
the grocery photos by about 0.1 macro-F1). The groups come from three cues, each used where it exists:

- **What the photos show:** pooled features of a frozen ImageNet backbone (packaged Lite0 weights, the same for
  every model, so that groups do not depend on the recipe), cosine distances, average linkage within a class.
  The cut is chosen from the data: two photos of one variety belong together when they are closer than a photo
  typically is to its nearest photo of *another* variety (the median of those cross-class nearest-neighbour
  distances). Variety alone never makes two photos that close; a shared shelf, light and camera does.
- **File-name sequences:** names that share a template (`r0_###_100.jpg`, `IMG_####.jpg`) are a sequence; a
  number that takes few values across a class's names (the `0` of `r0_`) is part of the template. Photos of two
  templates never share a group (two filming passes, two cameras), and neighbours in a sequence whose photos are
  within the cut are linked (a burst, or the frames of one turntable pass).
- **Capture time (EXIF DateTimeOriginal):** photos of one class taken within `SESSION_GAP_S` seconds of each
  other, in a row, are one session.

Groups never span classes. A class whose photos fall into fewer groups than a split needs is a warning that says
what to do; `split_clumped` then cuts its largest groups finer (the score of that class is then optimistic, and
the run says so).

This module turns features into groups and needs no model; the features of a run's photos are computed in
`pomona.training.grouping` (`compute_grouping_features`, `auto_grouper`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from ..config import DataConfig

GROUPING_MODEL = "tf_efficientnet_lite0"
"""The backbone whose frozen features decide near-duplicates (packaged weights: works offline)."""
GROUPING_SIZE = 224
"""Input size of the grouping features."""
SESSION_GAP_S = 120.0
"""Photos of one class taken at most this many seconds apart (EXIF capture time) are one session."""
SEQUENCE_FACTOR = 0.5
"""A file-name sequence is numbered in the order its photos were taken when the median distance between
neighbours in it is below this fraction of the median distance between any two of its photos; its neighbours
within the cut are then linked. (Photos renumbered in another order, as the grocery photos are, show no such
pattern, and their numbers are ignored.)"""
EXIF_DATETIME_ORIGINAL = 36867
GROUPS_FILE, GROUPS_INFO = "groups.csv", "groups.json"


@dataclass
class Grouping:
    """Groups of a table, and how they were found."""

    groups: np.ndarray
    """One group name per row (`label/g<N>`)."""
    threshold: float
    """The cosine-distance cut (average linkage)."""
    method: str
    """What was used, in words."""
    warnings: list[str] = field(default_factory=list)
    forced: list[str] = field(default_factory=list)
    """Classes whose groups had to be cut finer than near-duplicates allow (see `split_clumped`)."""

    def summary(self) -> dict:
        sizes = pd.Series(self.groups).value_counts()
        return {"by": "auto", "method": self.method, "threshold": round(float(self.threshold), 4),
                "n_groups": int(len(sizes)), "largest": int(sizes.max()) if len(sizes) else 0,
                "singletons": int((sizes == 1).sum()), "forced_classes": self.forced, "warnings": self.warnings}


# ------------------------------------------------------------------------------------------- file-name cues
_TOKENS = re.compile(r"(\d+)")


def name_templates(names: list[str]) -> tuple[list[str], list[int]]:
    """(template, position in its sequence) of each file name (no folder, no extension).

    Names are split into digit runs and the rest. Among names of one shape (same non-digit parts, same count of
    numbers) the number that takes the most values is the sequence position; any other number that takes at
    most a few values (<= 10% of the names, at most 20) is part of the template, others are ignored."""
    parts = [_TOKENS.split(Path(n).stem) for n in names]
    shape = ["#".join(p[0::2]) + f"/{len(p) // 2}" for p in parts]
    templates, positions = [""] * len(names), [0] * len(names)
    for s in set(shape):
        rows = [i for i, x in enumerate(shape) if x == s]
        numbers = np.array([[int(v) for v in parts[i][1::2]] for i in rows], dtype=np.int64).reshape(len(rows), -1)
        if numbers.shape[1] == 0:
            for i in rows:
                templates[i] = s
            continue
        distinct = [len(np.unique(numbers[:, j])) for j in range(numbers.shape[1])]
        seq = int(np.argmax(distinct))
        fixed = [j for j, d in enumerate(distinct) if j != seq and d <= max(1, min(20, 0.1 * len(rows)))]
        for r, i in enumerate(rows):
            templates[i] = s + "|" + ",".join(f"{j}={numbers[r, j]}" for j in fixed)
            positions[i] = int(numbers[r, seq])
    return templates, positions


def capture_times(paths: list[str]) -> np.ndarray:
    """EXIF capture time of each photo in seconds (NaN where the photo has none); reads headers only."""
    from PIL import Image

    out = np.full(len(paths), np.nan)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as img:
                exif = img.getexif()
                text = exif.get_ifd(0x8769).get(EXIF_DATETIME_ORIGINAL) or exif.get(306)
            if text:
                out[i] = datetime.strptime(str(text).strip()[:19], "%Y:%m:%d %H:%M:%S").timestamp()
        except Exception:  # no EXIF, a damaged header or an unreadable file: no time cue for this photo
            continue
    return out


# ------------------------------------------------------------------------------------------- the grouping
def normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine distance = 1 - dot product), float32."""
    x = np.asarray(features, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_distances(features: np.ndarray) -> np.ndarray:
    """All pairwise cosine distances of a few thousand photos (one class, one test set)."""
    x = normalize(features).astype(np.float64)
    return np.clip(1.0 - x @ x.T, 0.0, 2.0)


def nearest_distances(features: np.ndarray, labels, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per photo, the cosine distance to its nearest other photo of the same class and of another class (inf when
    there is none), in blocks: bounded memory on tens of thousands of photos."""
    x, labels = normalize(features), np.asarray(labels, dtype=object)
    codes = np.unique(labels, return_inverse=True)[1]
    same, other = np.full(len(x), np.inf), np.full(len(x), np.inf)
    for start in range(0, len(x), block):
        d = 1.0 - x[start:start + block] @ x.T
        rows = np.arange(start, min(start + block, len(x)))
        d[rows - start, rows] = np.inf
        alike = codes[rows][:, None] == codes[None, :]
        same[rows] = np.where(alike, d, np.inf).min(1)
        other[rows] = np.where(alike, np.inf, d).min(1)
    return np.clip(same, 0.0, None), np.clip(other, 0.0, None)


def choose_threshold(features: np.ndarray, labels) -> float:
    """The median over photos of the distance to the nearest photo of another class; with one class, the 75th
    percentile of nearest-neighbour distances (no other variety to compare with)."""
    same, other = nearest_distances(features, labels)
    if np.isfinite(other).any():
        return float(np.median(other[np.isfinite(other)]))
    return float(np.quantile(same[np.isfinite(same)], 0.75)) if np.isfinite(same).any() else 0.0


class _Union:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


def _average_linkage(d: np.ndarray, threshold: float) -> np.ndarray:
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    if len(d) < 2:
        return np.zeros(len(d), dtype=int)
    z = linkage(squareform(d, checks=False), "average")
    return fcluster(z, threshold, "distance") - 1


def near_duplicate_groups(features: np.ndarray, labels, names: list[str] | None = None,
                          times: np.ndarray | None = None, threshold: float | None = None) -> Grouping:
    """Groups of photos (see the module docstring): `features` one row per photo, `labels` their classes, `names`
    their file names (sequence cue), `times` their capture times in seconds (NaN = unknown)."""
    labels, features = np.asarray(labels, dtype=object), np.asarray(features)
    n = len(labels)
    cut = choose_threshold(features, labels) if threshold is None else float(threshold)
    templates, positions = name_templates(names) if names is not None else ([""] * n, list(range(n)))
    times = np.full(n, np.nan) if times is None else np.asarray(times, dtype=float)
    union = _Union(n)
    cues = {"features": 0, "sequence": 0, "time": 0}
    for key in sorted(set(zip(labels, templates))):
        rows = np.flatnonzero((labels == key[0]) & (np.asarray(templates, dtype=object) == key[1]))
        dist = cosine_distances(features[rows])
        clusters = _average_linkage(dist, cut)
        for c in np.unique(clusters):
            members = rows[clusters == c]
            for m in members[1:]:
                if union.find(m) != union.find(members[0]):
                    union.join(m, members[0])
                    cues["features"] += 1
        order = np.argsort([positions[i] for i in rows], kind="stable")
        steps = dist[order[:-1], order[1:]]
        if len(rows) >= 3 and np.median(steps) < SEQUENCE_FACTOR * np.median(dist[np.triu_indices(len(rows), 1)]):
            # numbered in the order taken, neighbours alike: one burst, or the frames of one pass
            for a, b, d in zip(rows[order[:-1]], rows[order[1:]], steps):
                if d <= cut and union.find(a) != union.find(b):
                    union.join(a, b)
                    cues["sequence"] += 1
        timed = rows[np.isfinite(times[rows])]
        timed = timed[np.argsort(times[timed], kind="stable")]
        for a, b in zip(timed[:-1], timed[1:]):  # one session: taken within minutes of each other
            if times[b] - times[a] <= SESSION_GAP_S and union.find(a) != union.find(b):
                union.join(a, b)
                cues["time"] += 1
    roots = np.array([union.find(i) for i in range(n)])
    names_of = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    groups = np.array([f"{labels[i]}/g{names_of[roots[i]]}" for i in range(n)], dtype=object)
    used = [c for c in ("features", "sequence", "time") if cues[c]] or ["features"]
    method = (f"average linkage of frozen {GROUPING_MODEL} features at cosine distance {cut:.3f} (the median "
              f"distance of a photo to its nearest photo of another class)" +
              (", file-name templates" if len(set(zip(labels, templates))) > len(set(labels)) else "") +
              (", file-name sequences" if "sequence" in used else "") +
              (", EXIF capture time" if "time" in used else ""))
    return Grouping(groups, cut, method)


def split_clumped(grouping: Grouping, labels, features: np.ndarray, needed: int) -> Grouping:
    """Cut the groups of every class that has fewer than `needed` groups finer (average linkage at half the
    cut, then a quarter, ...; at last one photo per group) until it has `needed`, and say so."""
    labels, features = np.asarray(labels, dtype=object), np.asarray(features)
    groups = grouping.groups.copy()
    warnings, forced = list(grouping.warnings), list(grouping.forced)
    for label in sorted(set(labels)):
        rows = np.flatnonzero(labels == label)
        have = len(set(groups[rows]))
        if have >= needed or len(rows) < needed:
            continue
        dist, cut = cosine_distances(features[rows]), grouping.threshold
        while len(set(groups[rows])) < needed:
            cut /= 2
            clusters = _average_linkage(dist, cut) if cut > 1e-4 else np.arange(len(rows))
            groups[rows] = [f"{g}.{c}" for g, c in zip(grouping.groups[rows], clusters)]
        forced.append(label)
        warnings.append(f"{label}: its {len(rows)} photos fall into {have} near-duplicate group(s), fewer than "
                        f"the {needed} needed; they were cut finer, so near-duplicates of {label} sit on both "
                        "sides and its score is optimistic. Add photos of it from other shelves or sessions, or "
                        f"use fewer folds (--folds {max(2, have)})")
    return Grouping(groups, grouping.threshold, grouping.method, warnings, forced)


def group_table(table: pd.DataFrame, features: np.ndarray, needed: int = 2) -> tuple[pd.DataFrame, Grouping]:
    """`table` (path, label, ...) with its `group` column replaced by the near-duplicate groups."""
    paths = list(table["path"])
    grouping = near_duplicate_groups(features, table["label"].to_numpy(), [Path(p).name for p in paths],
                                     capture_times(paths))
    grouping = split_clumped(grouping, table["label"].to_numpy(), features, needed)
    return table.assign(group=grouping.groups), grouping


def describe_given_groups(table: pd.DataFrame, data: "DataConfig") -> dict:
    """What groups.json says when no groups were found from the photos."""
    by = data.group_by or "none"
    if by == "auto":
        note = "not needed: the validation set was given (--val-data), so no split was drawn from --data"
    elif by == "none":
        note = ("every photo is its own group: near-duplicates can sit on both sides of a split, and the "
                "validation or out-of-fold score can be flattered")
    else:
        note = f"groups named by the regex {by!r} on the file names"
    return {"by": by, "n_groups": int(table["group"].nunique()), "note": note}


def write_groups(run_dir: str | Path, table: pd.DataFrame, grouping: dict | None, data: "DataConfig") -> None:
    """groups.csv (path, label, group) and groups.json (how they were found) of a run."""
    from ..core.atomic import write_csv, write_json

    run_dir = Path(run_dir)
    write_csv(run_dir / GROUPS_FILE, table[["path", "label", "group"]])
    write_json(run_dir / GROUPS_INFO, grouping or describe_given_groups(table, data))


DUPLICATE_FACTOR = 1 / 3
"""Two photos of different sets are near-duplicates when their distance is below this fraction of the grouping
cut. On the grocery photos, photos of new shelves lie at >= 0.45 of the cut from their nearest training photo, and
lightly resized or re-compressed copies far below a third of it; a copy shrunk to half and re-compressed at JPEG
quality 30-60 can lie near the whole cut, and is missed here (`pomona doctor` adds perceptual hashes for it)."""


def cross_set_duplicates(features_a: np.ndarray, features_b: np.ndarray, cut: float) -> list[tuple[int, int, float]]:
    """(row in a, row in b, distance) of each photo of `a` whose nearest photo in `b` lies within
    `cut * DUPLICATE_FACTOR` (cosine distance), nearest first."""
    a, b = normalize(features_a), normalize(features_b)
    found = []
    for start in range(0, len(a), 1024):  # blocks: bounded memory on tens of thousands of photos
        d = np.clip(1.0 - a[start:start + 1024] @ b.T, 0.0, 2.0)
        nearest = d.argmin(1)
        for i, j in enumerate(nearest):
            if d[i, j] <= cut * DUPLICATE_FACTOR:
                found.append((start + i, int(j), float(d[i, j])))
    return sorted(found, key=lambda r: r[2])
