"""`pomona suggest`: which unlabelled photos to label next (active learning).

A run (one model, or the ensemble of a `--folds` run) predicts every photo of an unlabelled folder. The photos
it is least sure of are worth a label most: `margin` (1 - the gap between its two most probable classes) or
`entropy` (of its probabilities, divided by log(classes)). The most uncertain photos of one shelf are alike,
though, and fifty labels of one shelf teach little more than one: among the `CANDIDATES` most uncertain
photos, the near-duplicate groups of `pomona.data.groups` are found (frozen Lite0 features, cut at the run's own
grouping cut when it found its groups (RUN/groups.json), else where a photo is typically closer to a photo of
another *predicted* variety; file-name sequences, EXIF capture time; groups may span predicted classes, as the
shelf is what counts), and at most `per_group` photos are taken from each
group, most uncertain first. Only when there are fewer groups than photos asked for does a group give more.

Written into the output folder: suggest.csv (rank, path, predicted class and probability, second class and
probability, uncertainty, group) and suggest.html (the photos as thumbnails, in that order).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import PomonaError
from ..core.progress import write

CANDIDATES = (20, 500, 3000)
"""Groups are found among the max(20 x n, 500) most uncertain photos, at most 3000 (bounded memory)."""


@dataclass
class SuggestResult:
    out: Path
    picked: pd.DataFrame
    """The photos to label next, in order (what suggest.csv holds)."""
    candidates: pd.DataFrame
    """Every candidate with its uncertainty, group and pick rank (0 = not picked)."""
    skipped: list[str]
    """Unlabelled photos left out: unreadable, or labelled photos of the run."""


def uncertainty(probs: np.ndarray, by: str = "margin") -> np.ndarray:
    """Per row, higher = less sure: 1 - (p1 - p2), or the entropy divided by log(classes); NaN rows stay NaN."""
    p = np.asarray(probs, dtype=np.float64)
    if by == "margin":
        top = -np.sort(-p, axis=1)
        return 1.0 - (top[:, 0] - (top[:, 1] if p.shape[1] > 1 else 0.0))
    if by == "entropy":
        ent = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(1)
        return ent / np.log(max(p.shape[1], 2))
    raise ValueError(f"unknown uncertainty {by!r}: margin or entropy")


def choose_next(scores: np.ndarray, features: np.ndarray, predicted: np.ndarray, n: int, per_group: int = 1,
                names: list[str] | None = None, times: np.ndarray | None = None,
                cut: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `n` rows to label next: most uncertain first (`scores`), at most `per_group` per near-duplicate group
    (then more per group only if there are too few groups). The groups' cosine-distance cut is `cut`, or
    `groups.choose_threshold` with the `predicted` classes. Returns (picked rows in order, candidate rows, their
    group names)."""
    from ..data.groups import choose_threshold, near_duplicate_groups

    scores = np.asarray(scores, dtype=np.float64)
    usable = np.flatnonzero(np.isfinite(scores))
    order = usable[np.argsort(-scores[usable], kind="stable")]
    size = min(len(order), CANDIDATES[2], max(CANDIDATES[0] * n, CANDIDATES[1]))
    cand = order[:size]
    if not len(cand):
        return cand, cand, np.array([], dtype=object)
    f = np.asarray(features, dtype=np.float64)[cand]
    if cut is None:
        cut = choose_threshold(f, np.asarray(predicted, dtype=object)[cand])
    grouping = near_duplicate_groups(f, np.full(len(cand), "g", dtype=object),
                                     [names[i] for i in cand] if names is not None else None,
                                     None if times is None else np.asarray(times, dtype=float)[cand], cut)
    groups = np.array([g.split("/", 1)[1] for g in grouping.groups], dtype=object)
    taken: dict[str, int] = {}
    picked: list[int] = []
    allowed = per_group
    while len(picked) < min(n, len(cand)):
        for k, row in enumerate(cand):
            if len(picked) >= n:
                break
            if row in picked or taken.get(groups[k], 0) >= allowed:
                continue
            picked.append(int(row))
            taken[groups[k]] = taken.get(groups[k], 0) + 1
        allowed += 1  # fewer groups than photos asked for: a second photo of each group, most uncertain first
    return np.array(picked, dtype=np.int64), cand, groups


def suggest(run_dir: str | Path, unlabeled: str | Path, out: str | Path, n: int = 50, per_group: int = 1,
            by: str = "margin", device: str = "auto", engine: str = "auto", batch_size: int = 32,
            max_pixels: int = 64_000_000) -> SuggestResult:
    """Rank the photos below `unlabeled` for labelling with the run `run_dir`; write suggest.csv and
    suggest.html into `out`."""
    from ..core.atomic import write_csv, write_text
    from ..data.groups import capture_times
    from ..inference.loaded import load_run
    from ..inference.runfolder import read_split
    from ..training.grouping import compute_grouping_features
    from ..training.selftrain import index_unlabeled

    out = Path(out)
    paths = index_unlabeled(unlabeled, pd.Series([], dtype=str))
    labelled = read_split(run_dir)
    known = {str(Path(p).resolve()) for p in labelled["path"]} if labelled is not None else set()
    skipped = [p for p in paths if str(Path(p).resolve()) in known]
    if skipped:
        write(f"left out {len(skipped)} photo(s) of {unlabeled} that the run was trained or validated on")
    paths = [p for p in paths if str(Path(p).resolve()) not in known]
    if not paths:
        raise PomonaError(f"{unlabeled}: no photos left to suggest (all {len(skipped)} are labelled photos of the run)")
    run = load_run(run_dir, device, engine, batch_size=batch_size)
    preds = run.predict(paths)
    unreadable = [p for p in paths if p in preds.bad]
    scores = uncertainty(preds.probs, by)
    features = compute_grouping_features(paths, device, max_pixels)
    names = [Path(p).name for p in paths]
    predicted = np.array(preds.labels, dtype=object)
    picked, cand, groups = choose_next(scores, features, predicted, n, per_group, names, capture_times(paths),
                                       _run_cut(run_dir))
    probs = np.nan_to_num(preds.probs, nan=0.0)
    top = np.argsort(-probs, axis=1)
    rank = {row: i + 1 for i, row in enumerate(picked)}
    candidates = pd.DataFrame({
        "path": [paths[i] for i in cand], "predicted": [run.classes[top[i, 0]] for i in cand],
        "probability": probs[cand, top[cand, 0]].round(4),
        "second": [run.classes[top[i, 1]] if probs.shape[1] > 1 else "" for i in cand],
        "second_probability": (probs[cand, top[cand, 1]] if probs.shape[1] > 1 else np.zeros(len(cand))).round(4),
        "uncertainty": scores[cand].round(4), "group": groups,
        "rank": [rank.get(int(i), 0) for i in cand]})
    chosen = candidates[candidates["rank"] > 0].sort_values("rank")[["rank", *candidates.columns[:-1]]]
    chosen = chosen.reset_index(drop=True)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "suggest.csv", chosen)
    write_text(out / "suggest.html", suggest_page(chosen, by, len(paths), run_dir))
    return SuggestResult(out, chosen, candidates, skipped + unreadable)


def _run_cut(run_dir: str | Path) -> float | None:
    """The near-duplicate cut of the run's labelled photos (RUN/groups.json, with --group-by auto), if any."""
    import json

    from ..inference.runfiles import RunFolder

    path = RunFolder(run_dir).groups_info
    try:
        value = json.loads(path.read_text()).get("threshold") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def suggest_page(chosen: pd.DataFrame, by: str, pool: int, run_dir: str | Path) -> str:
    from .doctor_page import Thumbnails, figure, page

    thumbs = Thumbnails()
    cards = ['<div class="photo">' + figure(thumbs, r.path, f"#{r.rank} {html.escape(Path(r.path).name)}<br>"
                                            f"{html.escape(r.predicted)} {r.probability:.0%} or "
                                            f"{html.escape(r.second)} {r.second_probability:.0%}<br>group "
                                            f"{html.escape(r.group)}") + "</div>" for r in chosen.itertuples()]
    body = (f'<p class="note">The {len(chosen)} of {pool} unlabelled photos that {html.escape(str(run_dir))} is '
            f"least sure of ({html.escape(by)}), at most a few from one near-duplicate group; label them, add them "
            f'to the class folders and train again.</p><div class="gallery">{"".join(cards)}</div>')
    return page("pomona suggest", "which photos to label next", [("suggested", "Label these next", body)])
