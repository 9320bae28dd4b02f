"""Honest numbers: every score says what it was scored on and whether anything was selected on those photos; a
test set (--test-fraction / --test-data) that nothing selects on is scored once after training."""

from __future__ import annotations

import json

import pandas as pd

from pomona.cli import run

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
