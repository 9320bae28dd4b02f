"""`pomona train --folds K`: out-of-fold predictions, the fold models' ensemble, calibration, and self-training on
unlabelled photos (`--unlabeled`), with a tiny model on a few real photos."""

import json

import numpy as np
import pandas as pd
import pytest

from pomona.cli.commands import run
from pomona.inference.loaded import load_run
from pomona.models.metrics import apply_temperature, expected_calibration_error, fit_temperature
from pomona.training.selftrain import index_unlabeled, select_pseudo_labels

from conftest import GROCERY, _link_subset

TINY = ["--model", "test_efficientnet", "--weights", "none", "--img-size", "64", "--out-features", "16",
        "--epochs", "1", "--batch-size", "8", "--probe-epochs", "2", "--device", "cpu"]
CLASSES = ["Golden-Delicious", "Granny-Smith", "Pink-Lady"]


@pytest.fixture(scope="module")
def folds_run(tmp_path_factory):
    """A 3-fold run over 3 classes x 6 photos, with 4 unlabelled photos from the val folder."""
    if not GROCERY.is_dir():
        pytest.skip("../shared/data/grocery-apples not present")
    root = tmp_path_factory.mktemp("folds")
    data = _link_subset(GROCERY / "train", root / "data", CLASSES, 6)
    unlabeled = root / "unlabeled"
    unlabeled.mkdir()
    for c in CLASSES[:2]:
        for f in sorted((GROCERY / "val" / c).iterdir())[:2]:
            (unlabeled / f"{c}-{f.name}").symlink_to(f)
    assert run(["train", "--data", str(data), "--folds", "3", "--out", str(root / "run"), "--unlabeled",
                str(unlabeled), "--pseudo-threshold", "0.0", *TINY]) == 0
    return root / "run", data, unlabeled


def test_every_photo_gets_exactly_one_out_of_fold_prediction(folds_run):
    run_dir, data, unlabeled = folds_run
    oof = pd.read_csv(run_dir / "oof.csv")
    photos = sorted(str(p) for p in data.rglob("*.jpg"))
    assert sorted(oof["path"]) == photos  # each labelled photo once; no unlabelled photo
    assert not set(oof["path"]) & {str(p) for p in unlabeled.iterdir()}
    assert set(oof["fold"]) == {0, 1, 2}
    probs = oof[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (oof["predicted"] == np.asarray(CLASSES)[probs.argmax(1)]).all()


def test_no_fold_model_sees_the_photos_it_scores(folds_run):
    run_dir, _, unlabeled = folds_run
    oof = pd.read_csv(run_dir / "oof.csv")
    for k in range(3):
        split = pd.read_csv(run_dir / "folds" / f"0-{k}" / "split.csv")
        scored = set(oof.loc[oof["fold"] == k, "path"])
        assert scored == set(split.loc[split["subset"] == "val", "path"])
        assert scored.isdisjoint(split.loc[split["subset"] == "train", "path"])
        # the student's training fold holds pseudo-labelled photos, which are never scored
        pseudo = split[split.get("source", pd.Series(dtype=str)) == "pseudo"]
        assert len(pseudo) and set(pseudo["path"]) <= {str(p) for p in unlabeled.iterdir()}
        assert (split.loc[split["subset"] == "val", "path"].isin(pseudo["path"]) == False).all()  # noqa: E712


def test_cv_json_and_ensemble_is_the_mean_of_the_fold_models(folds_run):
    run_dir, data, _ = folds_run
    cv = json.loads((run_dir / "cv.json").read_text())
    assert cv["folds"] == 3 and cv["n_photos"] == 18 and len(cv["per_fold"]) == 3
    assert 0 <= cv["oof_macro_f1"] <= 1 and cv["oof_macro_f1_ci95"][0] <= cv["oof_macro_f1"] + 1e-9
    assert set(cv["per_class_f1"]) == set(CLASSES)
    assert cv["temperature"] > 0 and 0 <= cv["ece_after"] <= 1 and cv["selected_on"] is None
    assert cv["ensemble_ece"] == "measured only on --test-data (RUN/test/metrics.json)"
    assert (run_dir / "eval" / "metrics.json").is_file() and (run_dir / "report.html").is_file()

    info = json.loads((run_dir / "run.json").read_text())
    assert info["members"] == [f"folds/0-{k}/model.safetensors" for k in range(3)]
    assert info["temperature"] == pytest.approx(cv["temperature"])
    photos = sorted(str(p) for p in data.rglob("*.jpg"))[:5]
    ensemble = load_run(run_dir, device="cpu", engine="torch").predict(photos).probs
    views = []
    for view in ("identity", "hflip"):
        members = [load_run(run_dir / "folds" / f"0-{k}", device="cpu", engine="torch", tta=[view]).predict(photos)
                   .probs for k in range(3)]
        views.append(np.mean([apply_temperature(p, info["temperature"]) for p in members], axis=0))
    np.testing.assert_allclose(ensemble, np.mean(views, axis=0), atol=1e-5)


def test_pseudo_labels_are_listed(folds_run):
    run_dir, _, unlabeled = folds_run
    pseudo = pd.read_csv(run_dir / "folds" / "0-0" / "pseudo_labels.csv")
    assert {"path", "label", "probability", "round"} <= set(pseudo.columns)
    assert set(pseudo["path"]) <= {str(p) for p in unlabeled.iterdir()}
    teacher = run_dir / "folds" / "0-0" / "teacher"  # the fold's teacher stays beside its student
    assert load_run(teacher, device="cpu", engine="torch").classes == CLASSES


def test_evaluate_measures_the_ensembles_own_calibration(folds_run, tmp_path):
    run_dir, _, _ = folds_run
    photos = _link_subset(GROCERY / "val", tmp_path / "new", CLASSES, 2, start=3)  # not in the unlabelled pool
    assert run(["evaluate", str(run_dir), "--data", str(photos), "--out", str(tmp_path / "scored"),
                "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    info = json.loads((run_dir / "run.json").read_text())
    assert metrics["n"] == 6 and 0 <= metrics["ece"] <= 1 and metrics["ece_bins"] == 15
    assert f"temperature {info['temperature']:g}, 3 member(s)" in metrics["ece_of"]
    frame = pd.read_csv(tmp_path / "scored" / "predictions.csv", keep_default_na=False)
    assert metrics["ece"] == pytest.approx(expected_calibration_error(  # of the probabilities the ensemble gave
        load_run(run_dir, device="cpu").predict(list(frame["path"])).probs,
        np.array([CLASSES.index(c) for c in frame["true_label"]])))


def test_cross_fitted_temperature_never_sees_the_photos_it_scores(monkeypatch):
    import pomona.training.cv as cv

    rng = np.random.default_rng(0)
    n, folds, repeats = 30, 3, 2
    photo = np.tile(np.arange(n), repeats)  # every photo has a row in each repeat
    y = np.tile(rng.integers(0, 2, n), repeats)
    top = 0.5 + 0.49 * (np.arange(n) + 1) / (n + 1)  # each photo its own probability: rows tell their photo
    view_probs = np.stack([top, 1 - top], 1)[photo][None]
    fold = np.concatenate([rng.permutation(np.arange(n) % folds) + folds * r for r in range(repeats)])
    fitted, real = [], cv.fit_temperature
    monkeypatch.setattr(cv, "fit_temperature", lambda p, labels: fitted.append(set(p[0, :, 0])) or real(p, labels))
    result = cv.calibration(y, view_probs, fold, photo)
    assert len(fitted) == folds * repeats + 1 and len(fitted[-1]) == n  # one fit per fold, then one on all rows
    for k, rows in zip(np.unique(fold), fitted):
        scored = set(view_probs[0, fold == k, 0])
        assert rows and scored.isdisjoint(rows)  # not even another repeat's row of a photo this fold scores
        assert len(rows) == n - len(scored)
    assert 0 <= result["ece_after"] <= 1 and result["temperature"] > 0


def test_folds_keep_whole_groups_together(grocery_small, tmp_path):
    from pomona.data.index import index_folder
    from pomona.training.cv import assign_folds

    table = index_folder(grocery_small)
    table["group"] = table["label"] + "/" + (table.index % 3).astype(str)  # 3 groups of 2 per class
    fold = assign_folds(table, 3, 0, seed=0)
    assert (table.assign(fold=fold).groupby("group")["fold"].nunique() == 1).all()
    assert sorted(np.bincount(fold)) == [6, 6, 6]
    with pytest.raises(Exception, match="fewer photo groups than folds"):
        assign_folds(table, 4, 0, seed=0)


def test_select_pseudo_labels_threshold_caps_and_unreadable():
    probs = np.array([[0.9, 0.1], [0.95, 0.05], [0.6, 0.4], [0.2, 0.8], [np.nan, np.nan], [0.99, 0.01]])
    paths = [f"p{i}" for i in range(6)]
    got = select_pseudo_labels(paths, probs, ["a", "b"], {"a": 2, "b": 5}, threshold=0.7)
    assert got["path"].tolist() == ["p5", "p1", "p3"]  # a: the 2 most confident of 3; b: p3; p2 too unsure
    assert got["label"].tolist() == ["a", "a", "b"]


def test_unlabeled_pool_must_not_hold_labelled_photos(grocery_small, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    photo = next(grocery_small.rglob("*.jpg"))
    (pool / "x.jpg").symlink_to(photo)
    with pytest.raises(Exception, match="also labelled"):
        index_unlabeled(pool, pd.Series([str(photo)]))


def test_temperature_fit_recovers_overconfidence_and_lowers_ece():
    rng = np.random.default_rng(0)
    n, k = 4000, 4
    logits = rng.normal(size=(n, k)) * 2
    y = np.array([rng.choice(k, p=np.exp(z) / np.exp(z).sum()) for z in logits])  # calibrated at T = 1
    overconfident = np.exp(logits * 3) / np.exp(logits * 3).sum(1, keepdims=True)  # = temperature 1/3
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert expected_calibration_error(apply_temperature(overconfident, t), y) < \
        expected_calibration_error(overconfident, y) / 2
    np.testing.assert_allclose(apply_temperature(overconfident, 1.0), overconfident, atol=1e-9)


def test_answers_below_the_confidence_threshold_say_not_sure():
    from pomona.inference.engine import Predictions
    from pomona.inference.predict import format_predictions, predictions_json

    preds = Predictions(["a.jpg", "b.jpg", "c.jpg"], np.array([[0.9, 0.05, 0.05], [0.45, 0.4, 0.15],
                                                              [np.nan] * 3]), CLASSES, {"c.jpg": "not an image"})
    assert preds.verdicts(0.6) == ["Golden-Delicious", "not sure: Golden-Delicious or Granny-Smith", ""]
    records = predictions_json(preds, 3, 0.6)
    assert records[0]["sure"] and not records[1]["sure"] and "sure" not in records[2]
    assert records[1]["label"] == "Golden-Delicious"  # the label stays the most probable class
    frame = preds.to_frame(3, 0.6)
    assert frame["verdict"].tolist()[:2] == preds.verdicts(0.6)[:2] and frame["sure"].tolist() == [True, False, False]
    assert "[not sure: Golden-Delicious or Granny-Smith]" in format_predictions(preds, None, 3, 0.6)
