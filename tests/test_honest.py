"""Honest numbers: every score says what it was scored on and whether anything was selected on those photos; a
test set (--test-fraction / --test-data) that nothing selects on is scored once after training."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pomona.cli.commands import run

TINY = ["--model", "test_efficientnet", "--weights", "none", "--img-size", "64", "--out-features", "16",
        "--epochs", "2", "--batch-size", "8", "--warmup-epochs", "0", "--device", "cpu", "--head-init", "random"]


def test_test_fraction_is_never_trained_or_validated_on_and_is_scored_once(grocery_small, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", "--data", str(grocery_small), "--out", str(out), "--test-fraction", "0.3",
                "--val-fraction", "0.34", *TINY]) == 0
    split = pd.read_csv(out / "split.csv")
    test = split[split["subset"] == "test"]
    assert len(test) >= 3 and set(test["label"]) == set(split["label"])  # stratified: every class
    assert not set(test["path"]) & set(split.loc[split["subset"] != "test", "path"])
    held = json.loads((out / "test" / "metrics.json").read_text())
    assert held["n"] == len(test) and held["selected_on"] is None and held["scored_on"].startswith("test")
    assert 0 <= held["ece"] <= 1 and "the probabilities scored here" in held["ece_of"]  # its own calibration
    scored = pd.read_csv(out / "test" / "predictions.csv")
    assert sorted(map(str, scored["path"])) == sorted(map(str, test["path"]))
    val = json.loads((out / "eval" / "metrics.json").read_text())
    assert val["selected_on"] is None and val["n"] == int((split["subset"] == "val").sum())  # keep last: no choice
    assert "nothing was selected on them" in capsys.readouterr().out


def test_keep_best_says_its_score_was_selected_on_the_validation_photos(grocery_small, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", "--data", str(grocery_small), "--out", str(out), "--keep", "best", "--val-fraction", "0.34",
                *TINY]) == 0
    val = json.loads((out / "eval" / "metrics.json").read_text())
    assert val["selected_on"] == "val"
    assert "optimistic" in capsys.readouterr().out
    assert "optimistic" in (out / "report.html").read_text()


def test_test_data_that_overlaps_training_is_refused(grocery_small, tmp_path, capsys):
    out = tmp_path / "run"
    code = run(["train", "--data", str(grocery_small), "--out", str(out), "--test-data", str(grocery_small),
                "--val-fraction", "0.34", *TINY])
    assert code == 2
    assert "a test set must be new photos" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was trained or written


def test_macro_f1_averages_over_the_classes_with_photos_and_says_so():
    from pomona.models.metrics import compute_metrics, format_metrics, macro_f1

    classes = ["Fuji", "Gala", "Jazz"]
    y_true = [0, 0, 0, 1, 1, 1]  # no photo of Jazz here
    y_pred = [0, 0, 2, 1, 1, 1]  # one Fuji called Jazz: an error for Fuji's recall
    fuji, gala = 2 * 1 * (2 / 3) / (1 + 2 / 3), 1.0  # Fuji: precision 1, recall 2/3; Gala: perfect
    assert macro_f1(y_true, y_pred) == pytest.approx((fuji + gala) / 2)  # not (fuji + gala + 0) / 3
    metrics = compute_metrics(y_true, y_pred, classes, n_boot=0)
    assert metrics["macro_f1"] == pytest.approx((fuji + gala) / 2) and metrics["per_class"]["Jazz"]["f1"] is None
    assert metrics["macro_f1_over"] == "the 2 classes with photos here: [Fuji, Gala]"
    table = format_metrics(metrics)
    assert "macro-F1 over the 2 classes with photos here: [Fuji, Gala]" in table and "n/a" in table
    assert macro_f1([0, 1, 2], [0, 1, 2]) == 1.0 and macro_f1([0, 1, 2], [1, 1, 2]) == pytest.approx(5 / 9)
