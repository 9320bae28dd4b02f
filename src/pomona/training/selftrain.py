"""Self-training on unlabelled photos (`pomona train --unlabeled DIR`): a trained model (the teacher) labels the
photos of DIR; the confident ones join the training fold of a student, trained the same way from the same
pretrained start; with more rounds the student teaches the next one.

Which photos join: those whose top probability is at least `pseudo_threshold`, and per class at most as many as
the class has labelled training photos (the most confident first), so that no class is flooded by guesses.
Unlabelled photos are only ever training rows: they are never scored, and never in a validation fold or
`oof.csv`. `pseudo_labels.csv` in the run folder lists every photo kept, its label, probability and round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..core.atomic import write_csv
from ..core.errors import PomonaError
from ..core.progress import write
from ..data.bundle import DataBundle
from ..data.images import IMAGE_EXTENSIONS
from ..inference.loaded import load_run
from ..inference.runfiles import RunFolder
from ..inference.runfolder import keeping_run_parts


def index_unlabeled(folder: str | Path, labelled: pd.Series) -> list[str]:
    """The photos below `folder`, refusing any that is also a labelled photo (it would be scored by a model that
    trained on it with its predicted label)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PomonaError(f"--unlabeled: folder not found: {folder}")
    paths = sorted(str(p) for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not paths:
        raise PomonaError(f"--unlabeled: no photos in {folder}")
    known = {Path(p).resolve() for p in labelled}
    both = [p for p in paths if Path(p).resolve() in known]
    if both:
        raise PomonaError(f"--unlabeled: {len(both)} photo(s) are also labelled training photos, e.g. {both[0]}; "
                          "the unlabelled pool must be other photos")
    return paths


def select_pseudo_labels(paths: list[str], probs: np.ndarray, classes: list[str], caps: dict[str, int],
                         threshold: float) -> pd.DataFrame:
    """The confident photos (top probability >= `threshold`) with their predicted label, at most `caps[class]`
    per class, the most confident first; unreadable photos (rows of NaN) are left out."""
    ok = ~np.isnan(probs).any(1)
    frame = pd.DataFrame({"path": np.asarray(paths)[ok], "label": np.asarray(classes)[probs[ok].argmax(1)],
                          "probability": probs[ok].max(1)})
    frame = frame[frame["probability"] >= threshold].sort_values("probability", ascending=False, kind="stable")
    rank = frame.groupby("label").cumcount()
    return frame[rank < frame["label"].map(caps).fillna(0)].reset_index(drop=True)


def add_pseudo_labels(bundle: DataBundle, pseudo: pd.DataFrame) -> DataBundle:
    """`bundle` with the pseudo-labelled photos as extra training rows (`source` = 'pseudo')."""
    table = bundle.table.copy()
    if "source" not in table:
        table["source"] = "labelled"
    rows = pd.DataFrame({"path": pseudo["path"], "label": pseudo["label"], "group": pseudo["path"],
                         "subset": "train", "source": "pseudo"})
    return DataBundle(pd.concat([table, rows], ignore_index=True), bundle.classes)


def self_train(train: Callable[[DataBundle, Path], object], bundle: DataBundle, unlabeled: list[str],
               run_dir: Path, threshold: float, rounds: int = 1, device: str = "auto"):
    """Train a teacher into `run_dir/teacher` (with `train(bundle, folder)`), then `rounds` students, the last
    into `run_dir` itself; returns the last student's training result. The teacher and earlier students are part
    of the run: training the last student into `run_dir` (which clears an earlier run's files there) keeps them."""
    caps = bundle.subset("train")["label"].value_counts().to_dict()
    folder = RunFolder(run_dir)
    teacher_dir, kept = folder.teacher, []
    result = train(bundle, teacher_dir)
    made = [teacher_dir]
    for r in range(1, rounds + 1):
        probs = load_run(teacher_dir, device=device).predict(unlabeled).probs
        pseudo = select_pseudo_labels(unlabeled, probs, bundle.classes, caps, threshold).assign(round=r)
        kept.append(pseudo)
        counts = pseudo["label"].value_counts().to_dict()
        write(f"self-training round {r}: {len(pseudo)} of {len(unlabeled)} unlabelled photos kept "
              f"(probability >= {threshold}): {counts}")
        student_dir = run_dir if r == rounds else folder.student(r)
        with keeping_run_parts(*made):
            result = train(add_pseudo_labels(bundle, pseudo), student_dir)
        teacher_dir = student_dir
        made.append(student_dir)
    write_csv(folder.pseudo_labels, pd.concat(kept, ignore_index=True))
    return result
