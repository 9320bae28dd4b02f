"""pomona tune: search space, fast path == full path, feature cache, trackers (W&B offline read back, MLflow),
resume after a kill, and retraining the best trial."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import pandas as pd

from pomona.cli.commands import run
from pomona.config import load_search_space
from pomona.data.bundle import prepare_data
from pomona.training.features import prepare_features
from pomona.tuning.tune import Objective

from conftest import tiny_config

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["--model", "test_efficientnet", "--weights", "none", "--img-size", "64", "--batch-size", "8",
        "--device", "cpu", "--val-fraction", "0.34"]
FIXED = {"model.out_features": 400, "model.dropout": 0.3, "train.optimizer": "adam", "train.lr": 1e-3,
         "train.weight_decay": 1e-4, "train.label_smoothing": 0.1}


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(SRC), POMONA_NO_REEXEC="1", WANDB_SILENT="true")


def test_show_space_and_bad_space_file(tmp_path, capsys):
    assert run(["tune", "--show-space"]) == 0
    out = capsys.readouterr().out
    assert "model.out_features" in out and "int [400, 800]" in out and "float [1e-05, 0.001] log" in out
    assert "no (needs full fine-tuning" in out  # frozen by default: img_size / backbone lr fixed
    bad = tmp_path / "space.json"
    bad.write_text(json.dumps({"train.learning_rate": {"kind": "float", "low": 1e-5, "high": 1e-3}}))
    with pytest.raises(KeyError, match="train.learning_rate"):
        load_search_space(bad)
    bad.write_text(json.dumps({"train.lr": {"kind": "float", "low": 0.0, "high": 1e-3, "log": True}}))
    with pytest.raises(ValueError, match="log-scale"):
        load_search_space(bad)


def test_fast_path_gives_the_full_path_f1_for_the_same_head_settings(grocery_small, tmp_path, capsys):
    """One fixed head setting (FixedTrial), frozen backbone, no augmentation: training on cached features gives
    the per-epoch losses and macro-F1 of running the backbone every epoch -- with several batches per epoch, an
    imbalanced training fold, Augmentor balancing (its images are more feature rows), the class-weighted loss and
    the weighted sampler, none of which the fast path may drop."""
    from pomona.tools.ablate import make_imbalanced

    cfg = tiny_config(epochs=3, augment=False, patience=0, batch_size=3, class_weighted_loss=True,
                      weighted_sampler=True)
    cfg.model.freeze_backbone = True
    cfg.model.name, cfg.model.weights = "tf_efficientnet_lite0", "package"  # real features: F1 moves
    cfg.data.data_dir, cfg.data.val_fraction = str(grocery_small), 0.34
    cfg.balance.mode, cfg.balance.cache_dir = "add=1", str(tmp_path / "balanced")
    space = load_search_space(None)
    bundle = make_imbalanced(prepare_data(cfg.data, cfg.seed), ["Pink-Lady"], 0.5)  # 3, 3 and 2 training photos
    features, fbundle = prepare_features(cfg, bundle, tmp_path / "cache", engine="onnx")
    assert features.engine == "onnx" and len(features.train) == len(bundle.subset("train")) + 3 == 11
    assert len(fbundle.subset("train")) == 11 and (fbundle.table["source"] != "").sum() == 3  # 3 batches an epoch

    fast = Objective(cfg, space, fbundle, tmp_path / "fast", features=features)
    full = Objective(cfg, space, bundle, tmp_path / "full")
    f1_fast = fast(optuna.trial.FixedTrial(FIXED))
    f1_full = full(optuna.trial.FixedTrial(FIXED))
    h_fast, h_full = fast.last_result.history, full.last_result.history
    assert len(h_fast) == len(h_full) == 3
    assert [h["val_loss"] for h in h_fast] == pytest.approx([h["val_loss"] for h in h_full], rel=1e-3)
    assert [h["train_loss"] for h in h_fast] == pytest.approx([h["train_loss"] for h in h_full], rel=1e-3)
    assert [h["val_macro_f1"] for h in h_fast] == pytest.approx([h["val_macro_f1"] for h in h_full], abs=1e-6)
    assert f1_fast == pytest.approx(f1_full, abs=1e-6)
    assert len({round(h["val_loss"], 6) for h in h_full}) == 3 and f1_full > 0.5  # it learnt something
    # the cached features are reused, and a different preprocessing gets its own entry
    again, _ = prepare_features(cfg, bundle, tmp_path / "cache", engine="torch")
    assert again.from_cache and again.key == features.key and np.array_equal(again.train, features.train)
    capsys.readouterr()
    cfg.train.augment = True  # what the fast path cannot apply is said, not silently dropped
    prepare_features(cfg, bundle, tmp_path / "cache", engine="torch")
    assert "crops, flips and rotations are not applied" in capsys.readouterr().out
    cfg.model.img_size = 72
    other, _ = prepare_features(cfg, bundle, tmp_path / "cache", engine="torch")
    assert not other.from_cache and other.key != features.key
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_wandb_offline_runs_are_read_back_and_best_trial_retrains(grocery_small, tmp_path, capsys):
    out = tmp_path / "t1"
    assert run(["tune", "--data", str(grocery_small), "--out", str(out), "--trials", "2", "--epochs", "2",
                "--tracker", "wandb", *TINY]) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["trials"]["complete"] + best["trials"]["pruned"] == 2
    assert set(best["params"]) == {"model.out_features", "model.dropout", "train.optimizer", "train.lr",
                                   "train.weight_decay", "train.label_smoothing"}
    assert (out / "plots" / "optimization_history.png").stat().st_size > 1000
    assert (out / "plots" / "optimization_history.html").is_file()
    printed = capsys.readouterr().out
    assert "trial 1/2 (#" in printed and "trial 2/2 (#" in printed and "best so far" in printed
    page = (out / "report.html").read_text()  # the tuning folder's report shows Optuna's plots
    assert 'id="tuning"' in page and "optimization history" in page and f"Best trial {best['best_trial']}" in page

    from pomona.tuning.tracking import read_wandb_run

    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    study = optuna.load_study(study_name="pomona", storage=f"sqlite:///{out / 'study.db'}")
    for run_dir in runs:
        got = read_wandb_run(run_dir)
        trial = study.trials[got["config"]["trial"]]
        assert got["group"] == "pomona" and got["state"] == "finished"
        assert {k: got["config"][k] for k in trial.params} == pytest.approx(trial.params)
        f1 = [row["val_macro_f1"] for row in got["history"] if "val_macro_f1" in row]
        assert f1 == pytest.approx(list(trial.intermediate_values.values()))
        # the trial's value is the kept (last) epoch's score; the summary's best is the maximum over epochs
        assert got["summary"]["best_val_macro_f1"] == pytest.approx(max(trial.intermediate_values.values()))
        if trial.value is not None:
            assert trial.value == pytest.approx(list(trial.intermediate_values.values())[-1])
        image = next(row["confusion_matrix.path"] for row in got["history"] if "confusion_matrix.path" in row)
        assert (run_dir / "files" / image).stat().st_size > 1000  # the confusion-matrix PNG
        assert got["stats"] and any("memory_percent" in s or "cpu" in s for s in got["stats"])  # system metrics

    final = tmp_path / "final"
    assert run(["train", "--from-study", str(out), "--out", str(final), "--epochs", "1"]) == 0
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["model"]["out_features"] == best["params"]["model.out_features"]
    assert cfg["train"]["lr"] == pytest.approx(best["params"]["train.lr"])
    assert cfg["model"]["freeze_backbone"] is True and cfg["train"]["epochs"] == 1


def test_mlflow_tracker_logs_params_and_epoch_metrics(grocery_small, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "m1"
    assert run(["tune", "--data", str(grocery_small), "--out", str(out), "--trials", "1", "--epochs", "2",
                "--tracker", "mlflow", *TINY]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("pomona").experiment_id])
    assert mlrun.data.tags["study"] == "pomona" and mlrun.info.status == "FINISHED"
    assert "train.lr" in mlrun.data.params and "pomona.model.name" in mlrun.data.params
    history = client.get_metric_history(mlrun.info.run_id, "val_macro_f1")
    assert [m.step for m in history] == [0, 1]
    assert client.list_artifacts(mlrun.info.run_id)[0].path == "confusion_matrix.png"


def _count(storage: str, study: str, states) -> int:
    if not Path(storage.removeprefix("sqlite:///")).is_file():
        return 0  # the worker has not created it yet (opening it here would race its table creation)
    try:
        s = optuna.load_study(study_name=study, storage=storage)
    except Exception:  # study or tables not created yet
        return 0
    return len(s.get_trials(deepcopy=False, states=states))


def test_killed_tune_resumes_and_keeps_finished_trials(grocery_small, tmp_path):
    """SIGKILL a worker in the middle of the study; the rerun continues it to exactly the asked number."""
    out = tmp_path / "r1"
    storage = f"sqlite:///{out / 'study.db'}"
    cmd = [sys.executable, "-m", "pomona", "tune", "--data", str(grocery_small), "--out", str(out), "--trials", "5",
           "--epochs", "3", "--fast-path", "off", "--tracker", "none", "--heartbeat", "1", *TINY]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    deadline = time.monotonic() + 120
    while _count(storage, "pomona", finished) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: t.value for t in optuna.load_study(study_name="pomona", storage=storage).trials
              if t.state in finished}
    assert 2 <= len(before) < 5, "the worker finished too early or too late to test a kill"

    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    study = optuna.load_study(study_name="pomona", storage=storage)
    ok = [t for t in study.trials if t.state in finished]
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(ok) == 5  # exactly the asked number, finished
    assert {t.number: t.value for t in ok if t.number in before} == before  # kept, not re-run
    assert len(failed) <= 1 and len(study.trials) == 5 + len(failed)  # the killed trial, retried once
    assert not [t for t in study.trials if t.state in (optuna.trial.TrialState.RUNNING,
                                                      optuna.trial.TrialState.WAITING)]
    settings = {tuple(sorted(t.params.items())) for t in ok}
    assert len(settings) == 5, settings  # the rerun drew new settings, not the first run's again


def test_a_worker_killed_right_after_claiming_a_trial_does_not_block_the_study(tmp_path):
    """The claimed trial already has a heartbeat: when its worker dies before running it, the trial goes stale,
    is failed and queued again, and the next worker finishes the study instead of waiting for it for ever."""
    import threading

    from pomona.config import Config, TuneConfig
    from pomona.tuning.study import claim_trial, create_storage, open_study, run_worker

    tcfg = TuneConfig(trials=2, storage=f"sqlite:///{tmp_path / 'study.db'}", heartbeat=1)
    storage = create_storage(tcfg.storage, tcfg.heartbeat)
    study = open_study(storage, tcfg, Config(), {})
    assert claim_trial(study, storage) is not None  # ... and the worker is killed here
    time.sleep(2.5)  # longer than the grace period (twice the heartbeat)
    worker = threading.Thread(target=run_worker, args=(study, storage, lambda trial: 0.5, 1, 0.1), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the worker waits for a trial nobody runs"
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2 and states.count(optuna.trial.TrialState.FAIL) == 1


def test_tune_rescores_the_best_trial_on_test_photos_no_trial_saw(grocery_small, tmp_path, capsys):
    out = tmp_path / "study"
    assert run(["tune", "--data", str(grocery_small), "--out", str(out), "--trials", "2", "--epochs", "1",
                "--tracker", "none", "--test-fraction", "0.3", *TINY]) == 0
    best = json.loads((out / "best.json").read_text())
    retrained = out / "best-retrained"
    held = json.loads((retrained / "test" / "metrics.json").read_text())
    split = pd.read_csv(retrained / "split.csv")
    assert held["selected_on"] is None and held["n"] == int((split["subset"] == "test").sum()) >= 3
    assert best["held_out_macro_f1"] == pytest.approx(held["macro_f1"])
    assert "selected on validation" in capsys.readouterr().out
