"""`pomona tune`: an Optuna search over the training settings. This module holds what a trial is -- the search
space turned into a Config (`trial_config`) and the objective -- and the entry point; the study's storage,
workers, heartbeats and results are `pomona.tuning.study`.

- The search space is data (`config.default_search_space`, or a JSON/YAML file): each parameter names the Config
  field it sets. A trial is a Config: the base config with the trial's values.
- The objective is the spine's training (`train_and_evaluate`) or, with a frozen backbone, its fast path on
  cached features (`features.train_head_on_features`), both running training's one epoch loop with a callback
  that reports each epoch's validation macro-F1 to the trial and raises `optuna.TrialPruned` when the pruner says
  so. Its value is the best epoch's macro-F1. It works with any trial, `optuna.trial.FixedTrial` included.
  Training does not import optuna.
- Each trial is one tracker run (W&B offline by default, MLflow, or none), grouped by study.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from ..config import Config, SearchParam, TuneConfig, apply_params, load_search_space
from ..core.atomic import write_json
from ..core.progress import write
from ..data.bundle import DataBundle
from ..inference.runfiles import RunFolder
from ..training.grouping import prepare_run_data
from .study import STUDY_ATTR, create_storage, default_storage, open_study, run_worker, save_results, study_counts

# ------------------------------------------------------------------------------------------- search space
def active_space(space: dict[str, SearchParam], cfg: Config) -> dict[str, SearchParam]:
    """The parameters that apply to `cfg` (frozen backbone or full fine-tuning)."""
    return {name: p for name, p in space.items() if p.applies(cfg.model.freeze_backbone)}


def format_space(space: dict[str, SearchParam], cfg: Config) -> str:
    """A table of the search space, marking what is fixed for this config."""
    lines = [f"{'parameter':24s} {'distribution':40s} searched"]
    for name, p in space.items():
        on = p.applies(cfg.model.freeze_backbone)
        why = "yes" if on else f"no ({'needs' if p.only == 'finetune' else 'only with'} full fine-tuning; " \
                               f"fixed at {_get(cfg, name)})"
        lines.append(f"{name:24s} {p.describe():40s} {why}")
    return "\n".join(lines)


def _get(cfg: Config, name: str) -> Any:
    section, key = name.split(".", 1)
    return getattr(getattr(cfg, section), key)


def suggest(trial: optuna.Trial, name: str, p: SearchParam) -> Any:
    """Draw one parameter from the trial."""
    if p.kind == "categorical":
        return trial.suggest_categorical(name, p.choices)
    if p.kind == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(name, float(p.low), float(p.high), step=p.step, log=p.log)


def trial_config(trial: optuna.Trial, cfg: Config, space: dict[str, SearchParam]) -> tuple[Config, dict]:
    """The base config with the trial's draws applied, and the draws."""
    params = {name: suggest(trial, name, p) for name, p in active_space(space, cfg).items()}
    return apply_params(cfg, params), params


# ------------------------------------------------------------------------------------------------ objective
class ReportToTrial:
    """Training callback: report each epoch's validation macro-F1 to the trial; raise TrialPruned when told."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self.trial.report(metrics["val_macro_f1"], epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: macro-F1 {metrics['val_macro_f1']:.3f}")


def use_fast_path(cfg: Config, fast_path: str) -> bool:
    if fast_path not in ("auto", "on", "off"):
        raise ValueError(f"--fast-path must be auto, on or off, not {fast_path!r}")
    if fast_path == "on" and not cfg.model.freeze_backbone:
        raise ValueError("--fast-path on needs --freeze-backbone: cached features are only valid for a frozen "
                         "backbone")
    return cfg.model.freeze_backbone and fast_path != "off"


class Objective:
    """trial -> best validation macro-F1 of training the trial's config (fast path or full training).

    Works with any optuna trial, including `optuna.trial.FixedTrial` (one fixed setting, no study).
    """

    def __init__(self, cfg: Config, space: dict[str, SearchParam], bundle: DataBundle, out_dir: str | Path,
                 features=None, tracker=None, study_name: str = "pomona", keep_weights: bool = False):
        from .tracking import NoOpTracker

        self.cfg, self.space, self.bundle, self.features = cfg, space, bundle, features
        self.out_dir = Path(out_dir)
        self.tracker = tracker or NoOpTracker()
        self.study_name, self.keep_weights = study_name, keep_weights
        self.last_result = None

    def __call__(self, trial: optuna.Trial) -> float:
        cfg, params = trial_config(trial, self.cfg, self.space)
        fast = self.features is not None
        trial_dir = self.out_dir / "trials" / f"{trial.number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(RunFolder(trial_dir).config)
        run = self.tracker.start_run(f"{self.study_name}-trial-{trial.number:04d}", self.study_name,
                                     {**params, "trial": trial.number, "study": self.study_name, "fast_path": fast,
                                      "pomona": cfg.to_dict()}, tags=["fast-path" if fast else "full"])
        callbacks = [run, ReportToTrial(trial)]
        state, start = "failed", time.perf_counter()
        try:
            if fast:
                from ..training.features import train_head_on_features

                result = train_head_on_features(cfg, self.features, callbacks, run_dir=trial_dir)
            else:
                from ..training.train import train_and_evaluate

                result = train_and_evaluate(cfg, trial_dir, callbacks=callbacks, bundle=self.bundle, overwrite=True)
            state = "complete"
        except optuna.TrialPruned:
            state = "pruned"
            raise
        finally:
            self._finish(run, trial, trial_dir, fast, state, time.perf_counter() - start)
        self.last_result = result
        return result.kept_macro_f1

    def _finish(self, run, trial, trial_dir: Path, fast: bool, state: str, seconds: float) -> None:
        """Final metrics and the confusion matrix of the trial's best epoch to the tracker; drop big files."""
        folder = RunFolder(trial_dir)
        history = folder.read_history()
        if history is not None and len(history):
            best = history.loc[history["val_macro_f1"].idxmax()]
            run.log_summary({"best_val_macro_f1": float(best["val_macro_f1"]), "best_epoch": int(best["epoch"]),
                             "epochs_run": len(history), "trial_seconds": seconds, "state": state})
            try:
                png = self._confusion_matrix(trial_dir, fast) if self.tracker.kind != "none" else None
                if png is not None:
                    run.log_image("confusion_matrix", png)
            except Exception as e:  # a plot must never lose the trial
                write(f"trial {trial.number}: no confusion matrix ({type(e).__name__}: {e})")
        run.finish(state)
        if not self.keep_weights:
            for path in (folder.weights, folder.last):
                path.unlink(missing_ok=True)

    def _confusion_matrix(self, trial_dir: Path, fast: bool) -> Path | None:
        from sklearn.metrics import confusion_matrix

        from ..models.metrics import plot_confusion_matrix

        classes, folder = self.bundle.classes, RunFolder(trial_dir)
        if fast:
            if not folder.val_probs.is_file():
                return None
            y_true, y_pred = self.features.val_targets, np.load(folder.val_probs).argmax(1)
        else:
            from ..inference.loaded import load_run

            if not folder.run_info.is_file():
                return None

            frame = self.bundle.subset("val")
            preds = load_run(trial_dir, device=self.cfg.device, engine="torch").predict(frame["path"])
            ok = [i for i, label in enumerate(preds.labels) if label]
            index = {c: i for i, c in enumerate(classes)}
            y_true = [index[frame["label"][i]] for i in ok]
            y_pred = [index[preds.labels[i]] for i in ok]
        matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
        return plot_confusion_matrix(matrix, classes, folder.confusion_matrix,
                                     f"{trial_dir.name}: validation confusion matrix")


# ------------------------------------------------------------------------------------------------ entry point
def tune(cfg: Config, tcfg: TuneConfig, out_dir: str | Path) -> tuple[optuna.Study, dict]:
    """Run (or join, or continue) the study of `tcfg` with base config `cfg`; save and return the results."""
    from .tracking import create_tracker

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    space = load_search_space(tcfg.space)
    fast = use_fast_path(cfg, tcfg.fast_path)
    if tcfg.storage is None:
        tcfg = TuneConfig(**{**asdict(tcfg), "storage": default_storage(out)})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = create_storage(tcfg.storage, tcfg.heartbeat)
    study = open_study(storage, tcfg, cfg, space)
    stored = Config.from_dict(study.user_attrs[STUDY_ATTR]["config"])  # every worker trains the study's config
    if stored.to_dict() != cfg.to_dict():
        changed = [f"{section}.{k}" for section, values in cfg.to_dict().items() if isinstance(values, dict)
                   for k, v in values.items() if stored.to_dict()[section][k] != v]
        write(f"study {tcfg.study!r} keeps the settings it was created with; ignoring changed {changed}")
    cfg = stored
    write_json(out / "tune.json", {"tune": asdict(tcfg), "config": cfg.to_dict()})
    cfg.save(RunFolder(out).config)  # report.html of the study reads it as a run's

    bundle = prepare_run_data(cfg)
    features = None
    if fast:
        from ..training.features import prepare_features

        cache = Path(tcfg.feature_cache) if tcfg.feature_cache else out / "features"
        features, bundle = prepare_features(cfg, bundle, cache, tcfg.feature_engine, run_dir=out)
        how = "read from cache" if features.from_cache else f"computed in {features.seconds:.1f} s ({features.engine})"
        write(f"features of {len(features.train)} training and {len(features.val)} validation images {how}")
    tracker = create_tracker(tcfg.tracker, out, tcfg.project)
    objective = Objective(cfg, space, bundle, out, features, tracker, tcfg.study, tcfg.keep_weights)
    counts = study_counts(study)
    write(f"study {tcfg.study!r}: {tcfg.trials} trials ({counts['complete']} complete, {counts['pruned']} "
          f"pruned, {counts['waiting']} waiting); {'fast path' if fast else 'full training'}; storage {tcfg.storage}")
    run_worker(study, storage, objective, tcfg.heartbeat)
    payload = save_results(study, out)
    if tracker.location():
        payload["tracker"] = tracker.location()
    return study, payload
