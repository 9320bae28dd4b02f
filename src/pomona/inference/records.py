"""One prediction, one type: the answer for a photo (`Verdict`: the variety, whether the model is sure of it and,
when not, the runner-up shown beside it) and everything said about the photo (`PredictionRecord`: its path, every
class ranked by probability, the verdict, the error of an unreadable photo).

Every output is written from a record, so the formats live here and nowhere else:

  to_row(k)    a row of predictions.csv (`pomona predict --format csv`, `pomona evaluate`, a cross-validated run's
               eval/): path, label, probability, [sure, verdict], label_2, probability_2, ..., error
  to_json(k)   a record of `pomona predict --format json` and the body of `pomona serve`'s POST /predict:
               [path], label, probability, sure, verdict, top [{label, probability}], [error]
  to_text(k)   the line `pomona predict` prints without --format

and `ranking_of_row` reads a row back (report.html). Nothing reads the verdict back out of its text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

Ranking = tuple[tuple[str, float], ...]
"""(class, probability) pairs, most probable first."""


@dataclass(frozen=True)
class Verdict:
    """The answer for one photo: its most probable class `label`, whether the model is `sure` of it (the top
    probability at least the threshold, or a single class), and when not, the `alternatives` it might be (the
    runner-up)."""

    label: str
    sure: bool = True
    alternatives: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """What users see: the label, or 'not sure: X or Y'."""
        return self.label if self.sure else "not sure: " + " or ".join((self.label, *self.alternatives))

    @classmethod
    def of(cls, ranking: Sequence[tuple[str, float]], min_confidence: float = 0.0) -> Verdict:
        """The verdict on a ranking (most probable first): sure when the top probability is at least
        `min_confidence` or there is no other class, else not sure between the two most probable."""
        (label, probability), rest = ranking[0], ranking[1:]
        if probability >= min_confidence or not rest:
            return cls(label)
        return cls(label, False, (rest[0][0],))


def rank(probs: np.ndarray, classes: Sequence[str]) -> Ranking:
    """Every class with its probability, most probable first (ties in class order, so the first is the argmax)."""
    return tuple((classes[i], float(probs[i])) for i in np.argsort(-probs, kind="stable"))


@dataclass(frozen=True)
class PredictionRecord:
    """What is said about one photo: its `path` (None for a served upload), every class ranked by probability
    (`ranking`; empty for an unreadable photo), the `verdict` (None for an unreadable photo) and the `error` that
    made it unreadable (None when there was none)."""

    path: str | None
    ranking: Ranking
    verdict: Verdict | None
    error: str | None = None

    @classmethod
    def of(cls, probs: np.ndarray, classes: Sequence[str], min_confidence: float = 0.0, path: str | None = None,
           error: str | None = None) -> PredictionRecord:
        """The record of one row of probabilities (a row of NaN: an unreadable photo)."""
        probs = np.asarray(probs)
        if np.isnan(probs[0]):
            return cls(path, (), None, error)
        ranking = rank(probs, classes)
        return cls(path, ranking, Verdict.of(ranking, min_confidence), error)

    def top(self, k: int = 3) -> Ranking:
        """The `k` most probable classes with their probabilities (none for an unreadable photo)."""
        return self.ranking[:k]

    def to_row(self, k: int = 3, verdict: bool = True) -> dict:
        """A row of predictions.csv: path, label, probability, (with `verdict`) sure and verdict, label_i and
        probability_i for the next k-1 classes, error. An unreadable photo has an empty label, a NaN probability,
        sure False, an empty verdict and no label_i columns."""
        top = self.top(k)
        row = {"path": self.path, "label": top[0][0] if top else "", "probability": top[0][1] if top else float("nan")}
        if verdict:
            row["sure"], row["verdict"] = (self.verdict.sure, self.verdict.text) if self.verdict else (False, "")
        for i, (c, p) in enumerate(top[1:], start=2):
            row[f"label_{i}"], row[f"probability_{i}"] = c, p
        row["error"] = self.error or ""
        return row

    def to_json(self, k: int = 3, digits: int | None = None) -> dict:
        """The JSON record: path (unless None), label and probability (None when unreadable), sure and verdict
        (when readable), the top-k as [{label, probability}], error (when there is one); probabilities rounded
        to `digits` when given."""
        top = [{"label": c, "probability": p if digits is None else round(p, digits)} for c, p in self.top(k)]
        record: dict = {} if self.path is None else {"path": self.path}
        record.update(label=top[0]["label"] if top else None, probability=top[0]["probability"] if top else None)
        if self.verdict:
            record.update(sure=self.verdict.sure, verdict=self.verdict.text)
        record["top"] = top
        if self.error is not None:
            record["error"] = self.error
        return record

    def to_text(self, k: int = 3) -> str:
        """The line `pomona predict` prints: 'PATH: Fuji 91.0%  Gala 6.0%', with '[not sure: X or Y]' before the
        top-k when the model is not sure, or 'PATH: unreadable: REASON'."""
        if self.verdict is None:
            return f"{self.path}: unreadable: {self.error}"
        return f"{self.path}: " + ("" if self.verdict.sure else f"[{self.verdict.text}]  ") + \
            "  ".join(f"{c} {p:.1%}" for c, p in self.top(k))


def ranking_of_row(row: Mapping) -> Ranking:
    """The top-k a predictions.csv row holds (`to_row`'s label, probability, label_i, probability_i), as pandas
    reads it (missing cells empty or NaN); empty for an unreadable photo."""
    found: list[tuple[str, float]] = []
    while True:
        suffix = f"_{len(found) + 1}" if found else ""
        label = row.get("label" + suffix)
        if label is None or label == "" or (isinstance(label, float) and math.isnan(label)):
            return tuple(found)
        found.append((str(label), float(row["probability" + suffix])))
