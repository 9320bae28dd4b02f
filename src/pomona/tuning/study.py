"""The plumbing of a `pomona tune` study: its storage (SQLite in the run folder, or PostgreSQL for many machines),
sampler and pruner, the fixed number of queued trials, workers that claim them one at a time with heartbeats,
the results (best.json, trials.csv, plots) and reading the best trial back.

The study's size is fixed when it is created: `--trials N` enqueues N trials (WAITING). Workers claim waiting
trials one at a time (the storage hands each to exactly one worker) and stop when none is waiting or running, so
N workers on one study run exactly N trials. Running trials send heartbeats; a trial whose worker was killed goes
silent, is marked failed and queued again with the same parameters; so killing `pomona tune` and running it
again continues the study, keeping every finished trial. What a trial does is the objective's business
(`pomona.tuning.tune`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from ..config import Config, SearchParam, TuneConfig, apply_params
from ..core.atomic import atomic_write, write_csv, write_json
from ..core.progress import write

STUDY_ATTR = "pomona"  # study user attribute: {"trials": N, "config": base config, "space": {...}}
# Heartbeats, their retry callback and the matplotlib plots are marked experimental by Optuna (stable since 2.x).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def worker_seed(seed: int, finished: int) -> int:
    """The sampler seed of a worker that joins an existing study (another worker, or a rerun after a kill): mixed
    from `seed`, this host, this process and the number of trials already `finished`, so that no two workers or
    restarts draw the same settings. The worker that creates the study uses `seed` itself (a one-worker study is
    reproducible)."""
    text = f"{seed}:{socket.gethostname()}:{os.getpid()}:{finished}:{time.time_ns()}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


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
        finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                 TrialState.FAIL)))
        study.sampler = create_sampler(tcfg.sampler, worker_seed(cfg.seed, finished))
        deadline = time.monotonic() + wait_seconds
        while STUDY_ATTR not in study.user_attrs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"study {tcfg.study!r} exists but was not made by pomona tune (no "
                                   f"{STUDY_ATTR!r} attribute); choose another --study")
            time.sleep(0.5)
        info = study.user_attrs[STUDY_ATTR]
        if tcfg.trials > info["trials"]:
            write(f"growing study {tcfg.study!r} from {info['trials']} to {tcfg.trials} trials")
            for _ in range(tcfg.trials - info["trials"]):
                study.enqueue_trial({})
            study.set_user_attr(STUDY_ATTR, {**info, "trials": tcfg.trials})
        elif tcfg.trials < info["trials"]:
            write(f"study {tcfg.study!r} holds {info['trials']} trials; --trials {tcfg.trials} does not shrink it")
        return study
    for _ in range(tcfg.trials):
        study.enqueue_trial({})
    study.set_user_attr(STUDY_ATTR, {"trials": tcfg.trials, "config": cfg.to_dict(),
                                     "space": {k: asdict(v) for k, v in space.items()}})
    return study


def claim_trial(study: optuna.Study, storage: optuna.storages.RDBStorage) -> tuple[optuna.Trial, int] | None:
    """Take one WAITING trial of the study for this worker, or None when none is left. The storage makes the
    WAITING -> RUNNING change at most once per trial, so no two workers run the same trial.

    The trial gets a heartbeat before it turns RUNNING: Optuna never counts a RUNNING trial without any heartbeat
    as stale, so a worker killed between the two would otherwise leave it running for ever, and every later worker
    waiting for it."""
    study_id = storage.get_study_id_from_name(study.study_name)
    for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        try:
            storage.record_heartbeat(trial_id)
        except sqlalchemy.exc.IntegrityError:
            pass  # another worker recorded the first one at the same moment: the trial has a heartbeat either way
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
                write(f"waiting for {len(running)} running trial(s) (other workers, or killed ones that are "
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
                _print_trial(study, trial, None, time.perf_counter() - start)
                done.append(trial.number)
                continue
            except BaseException:
                # Keep the study's size: the failed trial is queued again with its parameters.
                study.tell(trial, state=TrialState.FAIL)
                study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
                raise
        study.tell(trial, value)
        _print_trial(study, trial, value, time.perf_counter() - start)
        done.append(trial.number)


def _print_trial(study: optuna.Study, trial: optuna.Trial, value: float | None, seconds: float) -> None:
    """`trial 3/15 (#2)  macro-F1 0.812  best so far 0.845  4.1 s  out_features=512 ...` (pruned: no F1)."""
    counts = study_counts(study)
    total = study.user_attrs.get(STUDY_ATTR, {}).get("trials", "?")
    try:
        best = f"best so far {study.best_value:.3f}"
    except ValueError:  # no trial completed yet
        best = "best so far -    "
    shown = "  ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in trial.params.items())
    f1 = f"macro-F1 {value:.3f}" if value is not None else "pruned        "
    write(f"trial {counts['complete'] + counts['pruned']}/{total} (#{trial.number})  {f1}  {best}  "
          f"{seconds:6.1f} s  {shown}")


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
    write_csv(out / "trials.csv", study.trials_dataframe())
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return {}
    best = study.best_trial
    info = study.user_attrs.get(STUDY_ATTR, {})
    base = Config.from_dict(info["config"]) if "config" in info else Config()
    payload = {"study": study.study_name, "best_trial": best.number, "best_val_macro_f1": best.value,
               "params": best.params, "trials": study_counts(study),
               "config": apply_params(base, best.params).to_dict()}
    write_json(out / "best.json", payload)
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
                atomic_write(out_dir / f"{name}.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
                plt.close(fig)
                written.append(f"{name}.png")
            except Exception as e:  # e.g. importances need 2 finished trials
                write(f"plot {name} skipped: {type(e).__name__}: {str(e)[:120]}")
                plt.close("all")
            try:
                import plotly  # noqa: F401

                page = getattr(optuna.visualization, f"plot_{name}")(study)
                atomic_write(out_dir / f"{name}.html", lambda tmp: page.write_html(tmp, include_plotlyjs="directory"))
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
