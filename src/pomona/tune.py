"""`pomona tune`: an Optuna search over the training settings, resumable and distributable.

- The search space is data (`config.default_search_space`, or a JSON file): each parameter names the Config field
  it sets. A trial is a Config: the base config with the trial's values.
- The objective is the spine's training function (`train_and_evaluate`) or, with a frozen backbone, its fast path
  on cached features (`features.train_head_on_features`), called with a callback that reports each epoch's
  validation macro-F1 to the trial and raises `optuna.TrialPruned` when the pruner says so. Its value is the
  best epoch's macro-F1. Training does not import optuna.
- The study lives in an RDB storage: SQLite in the run folder by default, or PostgreSQL for many machines. Its
  size is fixed when it is created: `--trials N` enqueues N trials (WAITING). Workers claim waiting trials one at a
  time (the storage hands each to exactly one worker) and stop when none is waiting or running, so N workers on
  one study run exactly N trials. Running trials send heartbeats; a trial whose worker was killed goes silent, is
  marked failed and queued again with the same parameters; so killing `pomona tune` and running it again
  continues the study, keeping every finished trial.
- Each trial is one tracker run (W&B offline by default, MLflow, or none), grouped by study.
- At the end of a worker: best.json, trials.csv and Optuna's plots (history, intermediate values, parallel
  coordinates, parameter importances) as PNG and HTML.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from .config import Config, SearchParam, TuneConfig, load_search_space, merge
from .data import DataBundle, prepare_data

STUDY_ATTR = "pomona"  # study user attribute: {"trials": N, "config": base config, "space": {...}}
# Heartbeats, their retry callback and the matplotlib plots are marked experimental by Optuna (stable since 2.x).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


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


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """`cfg` with dotted settings ({"train.lr": 1e-4}) replaced."""
    overrides: dict = {}
    for name, value in params.items():
        section, key = name.split(".", 1)
        overrides.setdefault(section, {})[key] = value
    return merge(cfg, overrides)


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
        cfg.save(trial_dir / "config.json")
        run = self.tracker.start_run(f"{self.study_name}-trial-{trial.number:04d}", self.study_name,
                                     {**params, "trial": trial.number, "study": self.study_name, "fast_path": fast,
                                      "pomona": cfg.to_dict()}, tags=["fast-path" if fast else "full"])
        callbacks = [run, ReportToTrial(trial)]
        state, start = "failed", time.perf_counter()
        try:
            if fast:
                from .features import train_head_on_features

                result = train_head_on_features(cfg, self.features, callbacks, run_dir=trial_dir)
            else:
                from .train import train_and_evaluate

                result = train_and_evaluate(cfg, trial_dir, callbacks=callbacks, bundle=self.bundle)
            state = "complete"
        except optuna.TrialPruned:
            state = "pruned"
            raise
        finally:
            self._finish(run, trial, trial_dir, fast, state, time.perf_counter() - start)
        self.last_result = result
        return result.best_macro_f1

    def _finish(self, run, trial, trial_dir: Path, fast: bool, state: str, seconds: float) -> None:
        """Final metrics and the confusion matrix of the trial's best epoch to the tracker; drop big files."""
        import pandas as pd

        history = pd.read_csv(trial_dir / "history.csv") if (trial_dir / "history.csv").is_file() else None
        if history is not None and len(history):
            best = history.loc[history["val_macro_f1"].idxmax()]
            run.log_summary({"best_val_macro_f1": float(best["val_macro_f1"]), "best_epoch": int(best["epoch"]),
                             "epochs_run": len(history), "trial_seconds": seconds, "state": state})
            try:
                png = self._confusion_matrix(trial_dir, fast) if self.tracker.kind != "none" else None
                if png is not None:
                    run.log_image("confusion_matrix", png)
            except Exception as e:  # a plot must never lose the trial
                tqdm.write(f"trial {trial.number}: no confusion matrix ({type(e).__name__}: {e})")
        run.finish(state)
        if not self.keep_weights:
            for name in ("model.safetensors", "last.pt"):
                (trial_dir / name).unlink(missing_ok=True)

    def _confusion_matrix(self, trial_dir: Path, fast: bool) -> Path | None:
        from sklearn.metrics import confusion_matrix

        from .evaluate import plot_confusion_matrix

        classes = self.bundle.classes
        if fast:
            if not (trial_dir / "val_probs.npy").is_file():
                return None
            y_true, y_pred = self.features.val_targets, np.load(trial_dir / "val_probs.npy").argmax(1)
        else:
            if not (trial_dir / "model.safetensors").is_file():
                return None
            from .predict import Predictor

            frame = self.bundle.subset("val")
            preds = Predictor(trial_dir, device=self.cfg.device).predict(frame["path"])
            ok = [i for i, label in enumerate(preds.labels) if label]
            index = {c: i for i, c in enumerate(classes)}
            y_true = [index[frame["label"][i]] for i in ok]
            y_pred = [index[preds.labels[i]] for i in ok]
        matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
        return plot_confusion_matrix(matrix, classes, trial_dir / "confusion_matrix.png",
                                     f"{trial_dir.name}: validation confusion matrix")


# ----------------------------------------------------------------------------------------------- the study
def create_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}: tpe or random")


def create_pruner(name: str, startup_trials: int = 5, warmup_epochs: int = 1) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}: median or none")


def default_storage(out_dir: str | Path) -> str:
    return f"sqlite:///{(Path(out_dir) / 'study.db').resolve()}"


def create_storage(url: str, heartbeat: int) -> optuna.storages.RDBStorage:
    """An RDB storage (SQLite file or PostgreSQL server) whose silent trials are failed and queued again."""
    if heartbeat < 1:
        raise ValueError("--heartbeat must be at least 1 second")
    import random

    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError):
            # Workers starting together on a new database race to create Optuna's tables; the losers retry.
            if attempt == 5:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def open_study(storage: optuna.storages.RDBStorage, tcfg: TuneConfig, cfg: Config,
               space: dict[str, SearchParam], wait_seconds: float = 120.0) -> optuna.Study:
    """Create the study with `tcfg.trials` queued trials, or join it (waiting for its creator to queue them)."""
    sampler = create_sampler(tcfg.sampler, cfg.seed)
    pruner = create_pruner(tcfg.pruner, tcfg.pruner_startup_trials, tcfg.pruner_warmup_epochs)
    try:
        study = optuna.create_study(storage=storage, study_name=tcfg.study, direction="maximize", sampler=sampler,
                                    pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=tcfg.study, storage=storage, sampler=sampler, pruner=pruner)
        deadline = time.monotonic() + wait_seconds
        while STUDY_ATTR not in study.user_attrs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"study {tcfg.study!r} exists but was not made by pomona tune (no "
                                   f"{STUDY_ATTR!r} attribute); choose another --study")
            time.sleep(0.5)
        info = study.user_attrs[STUDY_ATTR]
        if tcfg.trials > info["trials"]:
            tqdm.write(f"growing study {tcfg.study!r} from {info['trials']} to {tcfg.trials} trials")
            for _ in range(tcfg.trials - info["trials"]):
                study.enqueue_trial({})
            study.set_user_attr(STUDY_ATTR, {**info, "trials": tcfg.trials})
        elif tcfg.trials < info["trials"]:
            tqdm.write(f"study {tcfg.study!r} holds {info['trials']} trials; --trials {tcfg.trials} does not shrink it")
        return study
    for _ in range(tcfg.trials):
        study.enqueue_trial({})
    study.set_user_attr(STUDY_ATTR, {"trials": tcfg.trials, "config": cfg.to_dict(),
                                     "space": {k: asdict(v) for k, v in space.items()}})
    return study


def claim_trial(study: optuna.Study, storage: optuna.storages.RDBStorage) -> tuple[optuna.Trial, int] | None:
    """Take one WAITING trial of the study for this worker, or None when none is left. The storage makes the
    WAITING -> RUNNING change at most once per trial, so no two workers run the same trial."""
    study_id = storage.get_study_id_from_name(study.study_name)
    for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, trial_id), trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


@contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial_id: int, interval: int):
    """Record the trial's heartbeat every `interval` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a missed beat is retried at the next interval
                pass
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_worker(study: optuna.Study, storage: optuna.storages.RDBStorage, objective, heartbeat_interval: int,
               poll_seconds: float = 1.0) -> list[int]:
    """Claim and run trials until the study has none waiting or running; returns the trial numbers run here."""
    done: list[int] = []
    waited = False
    while True:
        optuna.storages.fail_stale_trials(study)
        claimed = claim_trial(study, storage)
        if claimed is None:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running:
                return done
            if not waited:
                tqdm.write(f"waiting for {len(running)} running trial(s) (other workers, or killed ones that are "
                           f"queued again after {2 * heartbeat_interval} s without a heartbeat)")
                waited = True
            time.sleep(poll_seconds)
            continue
        waited = False
        trial, trial_id = claimed
        start = time.perf_counter()
        with heartbeat(storage, trial_id, heartbeat_interval):
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
                _print_trial(trial, "pruned", None, time.perf_counter() - start)
                done.append(trial.number)
                continue
            except BaseException:
                # Keep the study's size: the failed trial is queued again with its parameters.
                study.tell(trial, state=TrialState.FAIL)
                study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
                raise
        study.tell(trial, value)
        _print_trial(trial, "complete", value, time.perf_counter() - start)
        done.append(trial.number)


def _print_trial(trial: optuna.Trial, state: str, value: float | None, seconds: float) -> None:
    shown = "  ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in trial.params.items())
    f1 = f"macro-F1 {value:.3f}" if value is not None else "pruned  " + " " * 7
    tqdm.write(f"trial {trial.number:4d}  {f1}  {seconds:6.1f} s  {shown}")


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# -------------------------------------------------------------------------------------------------- results
def study_counts(study: optuna.Study) -> dict[str, int]:
    counts = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] += 1
    return counts


def save_results(study: optuna.Study, out_dir: str | Path) -> dict:
    """best.json, trials.csv and the plots; returns the best.json payload (empty when no trial completed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study.trials_dataframe().to_csv(out / "trials.csv", index=False)
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return {}
    best = study.best_trial
    info = study.user_attrs.get(STUDY_ATTR, {})
    base = Config.from_dict(info["config"]) if "config" in info else Config()
    payload = {"study": study.study_name, "best_trial": best.number, "best_val_macro_f1": best.value,
               "params": best.params, "trials": study_counts(study),
               "config": apply_params(base, best.params).to_dict()}
    (out / "best.json").write_text(json.dumps(payload, indent=2))
    save_plots(study, out / "plots")
    return payload


def save_plots(study: optuna.Study, out_dir: Path) -> list[str]:
    """Optuna's history, intermediate values, parallel coordinate and importance plots, as PNG (matplotlib)
    and HTML (plotly, when installed). Plots that need more finished trials are skipped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["optimization_history", "intermediate_values", "parallel_coordinate", "param_importances"]
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                ax = getattr(optuna.visualization.matplotlib, f"plot_{name}")(study)
                fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).figure
                fig.set_size_inches(9, 5.5)
                fig.tight_layout()
                fig.savefig(out_dir / f"{name}.png", dpi=110)
                plt.close(fig)
                written.append(f"{name}.png")
            except Exception as e:  # e.g. importances need 2 finished trials
                tqdm.write(f"plot {name} skipped: {type(e).__name__}: {str(e)[:120]}")
                plt.close("all")
            try:
                import plotly  # noqa: F401

                getattr(optuna.visualization, f"plot_{name}")(study).write_html(out_dir / f"{name}.html",
                                                                               include_plotlyjs="directory")
                written.append(f"{name}.html")
            except Exception:
                pass
    return written


def best_config(run_dir: str | Path) -> tuple[Config, dict]:
    """The best trial's config of a `pomona tune` run folder (read from its study), and its best.json-like info."""
    run_dir = Path(run_dir)
    path = run_dir / "tune.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a pomona tune folder (no tune.json)")
    saved = json.loads(path.read_text())
    storage = optuna.storages.RDBStorage(saved["tune"]["storage"])
    study = optuna.load_study(study_name=saved["tune"]["study"], storage=storage)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise FileNotFoundError(f"study {study.study_name!r} in {run_dir} has no finished trial yet")
    best = study.best_trial
    cfg = apply_params(Config.from_dict(saved["config"]), best.params)
    return cfg, {"trial": best.number, "val_macro_f1": best.value, "params": best.params}


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
        tqdm.write(f"study {tcfg.study!r} keeps the settings it was created with; ignoring changed {changed}")
    cfg = stored
    (out / "tune.json").write_text(json.dumps({"tune": asdict(tcfg), "config": cfg.to_dict()}, indent=2))
    cfg.save(out / "config.json")

    bundle = prepare_data(cfg.data, cfg.seed)
    features = None
    if fast:
        from .features import prepare_features

        if cfg.train.augment:
            tqdm.write("fast path: heads train on cached features of un-augmented images, as in the original "
                       "system (its backbone was frozen); crops, flips and rotations are not applied")
        cache = Path(tcfg.feature_cache) if tcfg.feature_cache else out / "features"
        features, bundle = prepare_features(cfg, bundle, cache, tcfg.feature_engine)
        how = "read from cache" if features.from_cache else f"computed in {features.seconds:.1f} s ({features.engine})"
        tqdm.write(f"features of {len(features.train)} training and {len(features.val)} validation images {how}")
    tracker = create_tracker(tcfg.tracker, out, tcfg.project)
    objective = Objective(cfg, space, bundle, out, features, tracker, tcfg.study, tcfg.keep_weights)
    counts = study_counts(study)
    tqdm.write(f"study {tcfg.study!r}: {tcfg.trials} trials ({counts['complete']} complete, {counts['pruned']} "
               f"pruned, {counts['waiting']} waiting); {'fast path' if fast else 'full training'}; "
               f"storage {tcfg.storage}")
    run_worker(study, storage, objective, tcfg.heartbeat)
    payload = save_results(study, out)
    if tracker.location():
        payload["tracker"] = tracker.location()
    return study, payload
