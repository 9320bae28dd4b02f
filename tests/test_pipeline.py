"""Smoke tests of the whole spine on a few real photos with a tiny model: train -> evaluate -> predict, the
competition layout, bad images, and resume."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pomona.cli.commands import run
from pomona.training.train import train_and_evaluate

from conftest import tiny_config

TINY = ["--model", "test_efficientnet", "--weights", "none", "--img-size", "64", "--out-features", "16",
        "--epochs", "1", "--batch-size", "8", "--frozen-epochs", "0", "--device", "cpu"]


def test_train_evaluate_predict_folder_layout(grocery_small, grocery_val_small, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(["train", "--data", str(grocery_small), "--val-data", str(grocery_val_small), "--out", str(run_dir),
                *TINY]) == 0
    for name in ["config.json", "split.csv", "history.csv", "model.safetensors", "run.json", "last.pt",
                 "bad_images.json"]:
        assert (run_dir / name).is_file(), name
    info = json.loads((run_dir / "run.json").read_text())
    assert info["classes"] == ["Golden-Delicious", "Granny-Smith", "Pink-Lady"]
    assert info["preprocessing"]["input_size"] == 64
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 1 and 0 <= history["val_macro_f1"][0] <= 1

    assert run(["evaluate", str(run_dir), "--data", str(grocery_val_small), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"macro_f1", "macro_f1_ci95", "accuracy", "n", "per_class"} <= set(metrics)
    assert metrics["n"] == 6 and metrics["macro_f1_ci95"][0] <= metrics["macro_f1"] + 1e-9
    assert set(metrics["per_class"]) == set(info["classes"])
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 1000

    photos = sorted(str(p) for p in grocery_val_small.rglob("*.jpg"))[:2]
    capsys.readouterr()
    assert run(["predict", str(run_dir), *photos]) == 0
    out = capsys.readouterr().out
    assert all(p in out for p in photos) and out.count("%") == 6  # top-3 with probabilities per photo


def test_competition_layout_and_submission_order(grocery_small, tmp_path):
    images = tmp_path / "train_imgs"
    images.mkdir()
    rows = []
    for i, f in enumerate(sorted(grocery_small.rglob("*.jpg"))):
        shutil.copy(f.resolve(), images / f"{i:03d}.jpg")
        rows.append((f"{i:03d}", f.parent.name))  # ids without extension
    pd.DataFrame(rows, columns=["img_id", "label"]).to_csv(tmp_path / "train.csv", index=False)
    run_dir = tmp_path / "c1"
    assert run(["train", "--csv", str(tmp_path / "train.csv"), "--images", str(images), "--out", str(run_dir),
                "--val-fraction", "0.34", *TINY]) == 0
    split = pd.read_csv(run_dir / "split.csv")
    assert set(split.loc[split.subset == "val", "path"]).isdisjoint(split.loc[split.subset == "train", "path"])

    test_ids = [r[0] + ".jpg" for r in rows[::-1][:7]]  # reversed order, with extension
    pd.DataFrame({"img_id": test_ids}).to_csv(tmp_path / "test.csv", index=False)
    pd.DataFrame({"image_id": [], "variety": []}).to_csv(tmp_path / "sample_submission.csv", index=False)
    sub = tmp_path / "submission.csv"
    assert run(["predict", str(run_dir), "--csv", str(tmp_path / "test.csv"), "--images", str(images),
                "--out", str(sub), "--sample-submission", str(tmp_path / "sample_submission.csv")]) == 0
    got = pd.read_csv(sub)
    assert list(got.columns) == ["image_id", "variety"]
    assert got["image_id"].tolist() == test_ids
    assert set(got["variety"]) <= {"Golden-Delicious", "Granny-Smith", "Pink-Lady"}


def test_bad_images_are_skipped_and_listed_or_stop_the_run(grocery_small, tmp_path, copy_tree, capsys):
    data = copy_tree(grocery_small, tmp_path / "data")
    (data / "Pink-Lady" / "zero.jpg").write_bytes(b"")
    cfg = tiny_config()
    cfg.data.data_dir, cfg.data.max_bad_fraction = str(data), 0.1
    result = train_and_evaluate(cfg, tmp_path / "run")
    assert list(result.bad_images) == [str(data / "Pink-Lady" / "zero.jpg")]
    assert "zero.jpg" in (tmp_path / "run" / "bad_images.json").read_text()
    assert "zero.jpg" not in (tmp_path / "run" / "split.csv").read_text()

    for i in range(4):
        (data / "Granny-Smith" / f"junk{i}.jpg").write_text("not an image")
    code = run(["train", "--data", str(data), "--out", str(tmp_path / "run2"), "--max-bad-fraction", "0.1", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "5 of 23 images cannot be read" in err and "junk0.jpg" in err


def test_resume_matches_uninterrupted_run(grocery_small, tmp_path):
    """Killed after the frozen first epoch and resumed through the switch to fine-tuning, with 2 data-loader
    workers (augmenting in their own processes): the resumed history and weights are the uninterrupted ones."""
    cfg = tiny_config(epochs=3, lr=3e-3, frozen_epochs=1)
    cfg.data.data_dir, cfg.data.val_fraction, cfg.data.num_workers = str(grocery_small), 0.34, 2
    full = train_and_evaluate(cfg, tmp_path / "full")

    class Interrupt(Exception):
        pass

    class KillAfterFirstEpoch:
        def on_epoch_end(self, epoch, metrics):
            if epoch == 0:
                raise Interrupt

    with pytest.raises(Interrupt):
        train_and_evaluate(cfg, tmp_path / "killed", callbacks=[KillAfterFirstEpoch()])
    assert len(pd.read_csv(tmp_path / "killed" / "history.csv")) == 1
    assert run(["train", "--resume", str(tmp_path / "killed")]) == 0
    resumed = pd.read_csv(tmp_path / "killed" / "history.csv")
    expected = pd.DataFrame(full.history)
    assert len(resumed) == 3 and resumed["backbone_frozen"].tolist() == [True, False, False]
    assert expected["val_loss"].nunique() == 3  # validation moves from epoch to epoch: the comparison means something
    for col in ["train_loss", "val_loss", "val_macro_f1"]:
        assert resumed[col].tolist() == pytest.approx(expected[col].tolist(), rel=1e-5, abs=1e-6), col
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_predict_keeps_order_and_reports_unreadable_photos(grocery_small, tmp_path):
    from pomona.inference.loaded import load_run

    cfg = tiny_config()
    cfg.data.data_dir, cfg.data.val_fraction = str(grocery_small), 0.34
    train_and_evaluate(cfg, tmp_path / "run")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    photos = sorted(str(p) for p in grocery_small.rglob("*.jpg"))[:3]
    paths = [photos[0], str(tmp_path / "broken.jpg"), photos[1], photos[2]]
    preds = load_run(tmp_path / "run", device="cpu").predict(paths)
    assert preds.paths == paths and list(preds.bad) == [str(tmp_path / "broken.jpg")]
    assert preds.labels[1] == "" and all(preds.labels[i] for i in (0, 2, 3))
    frame = preds.to_frame()
    assert frame["error"][1] and (frame["error"][[0, 2, 3]] == "").all()
    rows = preds.probs[[0, 2, 3]]
    assert np.allclose(rows.sum(1), 1.0, atol=1e-4)
