"""One prediction-record type (`pomona.inference.records`): the verdict is a structured field (`Verdict`: label,
sure, alternatives; its text is what users see), and `PredictionRecord` writes every output: predictions.csv
rows, the JSON of `predict --format json` and of `serve`, the readable lines. On a real run the records give back
exactly what `pomona predict` writes."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from pomona.inference.engine import Predictions
from pomona.inference.records import PredictionRecord, Verdict, rank, ranking_of_row

from conftest import SERVE_CLASSES, held_out_photo

CLASSES = ["Fuji", "Gala", "Granny-Smith", "Pink-Lady"]


def test_sure_and_alternatives_come_from_the_probabilities_and_the_threshold():
    probs = np.array([0.1, 0.45, 0.05, 0.4])
    unsure = PredictionRecord.of(probs, CLASSES, 0.6).verdict
    assert unsure == Verdict("Gala", sure=False, alternatives=("Pink-Lady",))
    assert unsure.text == "not sure: Gala or Pink-Lady"
    for threshold in (0.0, 0.45):  # at the threshold is sure
        sure = PredictionRecord.of(probs, CLASSES, threshold).verdict
        assert sure == Verdict("Gala") and sure.sure and sure.alternatives == () and sure.text == "Gala"
    assert PredictionRecord.of(np.array([0.3], np.float32), ["Solo"], 0.9).verdict == Verdict("Solo")  # no rival
    ties = PredictionRecord.of(np.array([0.4, 0.4, 0.2]), CLASSES[:3], 0.5)
    assert ties.verdict == Verdict("Fuji", False, ("Gala",))  # ties in class order: the label is the argmax


def test_an_unreadable_photo_has_no_verdict_and_keeps_its_error():
    record = PredictionRecord.of(np.full(4, np.nan), CLASSES, 0.6, "x.jpg", "not an image")
    assert record.verdict is None and record.ranking == () and record.error == "not an image"
    assert record.to_row(3) == {"path": "x.jpg", "label": "", "probability": pytest.approx(float("nan"), nan_ok=True),
                                "sure": False, "verdict": "", "error": "not an image"}
    assert record.to_json(3) == {"path": "x.jpg", "label": None, "probability": None, "top": [],
                                 "error": "not an image"}
    assert record.to_text(3) == "x.jpg: unreadable: not an image"


def test_records_are_frozen_and_rank_every_class():
    record = PredictionRecord.of(np.array([0.2, 0.5, 0.1, 0.2]), CLASSES, path="a.jpg")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.verdict = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.verdict.sure = False
    assert [c for c, _ in record.ranking] == ["Gala", "Fuji", "Pink-Lady", "Granny-Smith"]
    assert record.top(2) == (("Gala", 0.5), ("Fuji", 0.2)) == rank(np.array([0.2, 0.5, 0.1, 0.2]), CLASSES)[:2]


def test_rows_and_json_for_each_k_and_threshold():
    record = PredictionRecord.of(np.array([0.1, 0.45, 0.05, 0.4]), CLASSES, 0.6, "b.jpg")
    assert list(record.to_row(3)) == ["path", "label", "probability", "sure", "verdict", "label_2", "probability_2",
                                      "label_3", "probability_3", "error"]
    assert list(record.to_row(1, verdict=False)) == ["path", "label", "probability", "error"]
    assert record.to_row(2)["verdict"] == "not sure: Gala or Pink-Lady" and record.to_row(2)["sure"] is False
    assert record.to_json(2) == {"path": "b.jpg", "label": "Gala", "probability": 0.45, "sure": False,
                                 "verdict": "not sure: Gala or Pink-Lady",
                                 "top": [{"label": "Gala", "probability": 0.45},
                                         {"label": "Pink-Lady", "probability": 0.4}]}
    served = PredictionRecord.of(np.array([0.1234567, 0.8765433]), CLASSES[:2], 0.6).to_json(1, digits=6)
    assert served == {"label": "Gala", "probability": 0.876543, "sure": True, "verdict": "Gala",
                      "top": [{"label": "Gala", "probability": 0.876543}]}  # no path, no error: serve's body
    assert record.to_text(2) == "b.jpg: [not sure: Gala or Pink-Lady]  Gala 45.0%  Pink-Lady 40.0%"


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_a_predictions_csv_row_reads_back_to_its_top_k(tmp_path, k):
    preds = Predictions(["a.jpg", "b.jpg", "c.jpg"], np.array([[0.7, 0.1, 0.15, 0.05], [np.nan] * 4,
                                                               [0.25, 0.25, 0.3, 0.2]], np.float32),
                        CLASSES, {"b.jpg": "not an image"})
    preds.to_frame(k, 0.6).to_csv(tmp_path / "predictions.csv", index=False)
    back = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)  # as report.html reads it
    for record, row in zip(preds.records(0.6), back.to_dict("records")):
        assert ranking_of_row(row) == record.top(k)  # the CSV keeps every digit
    assert ranking_of_row(back.to_dict("records")[1]) == ()


def test_records_write_exactly_what_pomona_predict_writes(apple_run, tmp_path):
    """`pomona predict --format csv/json` on a real run: today's columns and keys, value for value the records'."""
    from pomona.cli.commands import run
    from pomona.inference.loaded import load_run

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo")
    paths = [str(held_out_photo(v, i)) for v in SERVE_CLASSES for i in range(2)] + [str(broken)]
    preds = load_run(apple_run, device="cpu", engine="onnx").predict(paths)
    tops = sorted(p.max() for p in preds.probs[:-1])
    threshold = float(tops[0] + tops[-1]) / 2  # at least one photo sure and one not
    records = preds.records(threshold)
    assert {r.verdict.sure for r in records[:-1]} == {True, False} and records[-1].verdict is None
    flags = ["--engine", "onnx", "--min-confidence", str(threshold), "--top-k", "3"]

    assert run(["predict", str(apple_run), *paths, *flags, "--out", str(tmp_path / "p.csv")]) == 0
    written = (tmp_path / "p.csv").read_text()
    assert written.splitlines()[0] == "path,label,probability,sure,verdict,label_2,probability_2,error"
    assert pd.DataFrame([r.to_row(3) for r in records]).to_csv(index=False) == written
    unsure = next(r for r in records if r.verdict and not r.verdict.sure)
    assert f"not sure: {unsure.ranking[0][0]} or {unsure.ranking[1][0]}" in written

    assert run(["predict", str(apple_run), *paths, *flags, "--out", str(tmp_path / "p.json")]) == 0
    answers = json.loads((tmp_path / "p.json").read_text())
    assert [list(a) for a in answers] == [["path", "label", "probability", "sure", "verdict", "top"]] * 4 + \
        [["path", "label", "probability", "top", "error"]]
    assert answers == [r.to_json(3) for r in records]


def test_serve_answers_with_the_record(apple_run):
    from pomona.config import ServeCommand
    from pomona.serving.serve import ClassifierService

    service = ClassifierService(ServeCommand(run=str(apple_run), engine="onnx", explain=False, max_batch=2))
    try:
        probs = np.array([0.3, 0.7], np.float32)
        body = service.result(probs, 3)
        assert list(body) == ["label", "probability", "sure", "verdict", "top", "probabilities"]
        record = PredictionRecord.of(probs, service.classes, service.settings.min_confidence)
        assert body == {**record.to_json(3, digits=6), "probabilities": {c: round(float(p), 6) for c, p in
                                                                         zip(service.classes, probs)}}
    finally:
        service.close()
