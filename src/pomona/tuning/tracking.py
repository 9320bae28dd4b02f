"""Experiment tracking behind one small interface: W&B, MLflow, or nothing.

A `Tracker` opens one `TrackedRun` per trial; a `TrackedRun` is a training callback (`on_epoch_end` logs the
epoch's metrics), plus `log_summary`, `log_image` and `finish`. Training only ever sees the callback; the tuner
opens and closes runs. The W&B and MLflow libraries are imported only when their tracker is created.

- `WandbTracker`: offline by default (no account, no network): runs are written under `ROOT/wandb/` and uploaded
  later with `wandb sync ROOT/wandb/offline-run-*`; grouped by study; W&B samples the machine's CPU, memory,
  disk and GPU use itself (every `stats_interval` seconds). `read_wandb_run` reads an offline run back through
  W&B's own reader (`wandb leet inspect --json`), since `wandb.Api` needs the server.
- `MlflowTracker`: a local store, `ROOT/mlflow.db` (SQLite, MLflow's default backend) with artifacts in
  `ROOT/mlartifacts`; browse it with `mlflow ui --backend-store-uri sqlite:///ROOT/mlflow.db`. The study is the
  run's `study` tag. No system metrics (MLflow samples them only for runs started through its fluent API).
- `NoOpTracker`: nothing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any


def _finite(metrics: dict) -> dict[str, float]:
    """The numeric, finite entries of a metrics dict (booleans as 0/1)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


class TrackedRun:
    """One trial's run. The base class tracks nothing (the no-op run)."""

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        """Training callback: log this epoch's metrics at step `epoch`."""

    def log_summary(self, metrics: dict) -> None:
        """Final values of the run (best macro-F1, state, seconds)."""

    def log_image(self, key: str, path: str | Path) -> None:
        """A PNG, e.g. the confusion matrix."""

    def finish(self, state: str = "complete") -> None:
        """Close the run; `state` is complete, pruned or failed."""


class Tracker:
    """Opens runs. The base class is the no-op tracker."""

    kind = "none"

    def start_run(self, name: str, group: str, config: dict[str, Any], tags: list[str] | None = None) -> TrackedRun:
        return TrackedRun()

    def location(self) -> str:
        return ""


class NoOpTracker(Tracker):
    """Tracks nothing."""


class WandbRun(TrackedRun):
    def __init__(self, run):
        self.run = run

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self.run.log({**_finite(metrics), "epoch": epoch}, step=epoch)

    def log_summary(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.run.summary[k] = v

    def log_image(self, key: str, path: str | Path) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))})

    def finish(self, state: str = "complete") -> None:
        self.run.summary["state"] = state
        self.run.finish(exit_code=1 if state == "failed" else 0)


class WandbTracker(Tracker):
    """Weights & Biases runs, offline under `root/wandb` unless `mode='online'`."""

    kind = "wandb"

    def __init__(self, root: str | Path, project: str = "pomona", mode: str = "offline", stats_interval: float = 1.0):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("--tracker wandb needs `pip install wandb` (or use --tracker mlflow / none)") from e
        self.wandb = wandb
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.project, self.mode, self.stats_interval = project, mode, stats_interval

    def start_run(self, name: str, group: str, config: dict[str, Any], tags: list[str] | None = None) -> TrackedRun:
        settings = self.wandb.Settings(console="off", silent=True, x_stats_sampling_interval=self.stats_interval)
        run = self.wandb.init(project=self.project, group=group, name=name, config=config, tags=tags or [],
                              dir=str(self.root), mode=self.mode, job_type="trial", settings=settings,
                              reinit="finish_previous")
        return WandbRun(run)

    def location(self) -> str:
        return f"{self.root / 'wandb'} (offline; upload with `wandb sync {self.root / 'wandb'}/offline-run-*`)"


class MlflowRun(TrackedRun):
    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in _finite(metrics).items()])

    def log_summary(self, metrics: dict) -> None:
        for k, v in _finite(metrics).items():
            self.client.log_metric(self.run_id, f"final_{k}", v)
        for k, v in metrics.items():
            if isinstance(v, str):
                self.client.set_tag(self.run_id, k, v)

    def log_image(self, key: str, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, state: str = "complete") -> None:
        self.client.set_tag(self.run_id, "state", state)
        self.client.set_terminated(self.run_id, "FAILED" if state == "failed" else "FINISHED")


class MlflowTracker(Tracker):
    """MLflow runs in a local SQLite store `root/mlflow.db`, one experiment per project."""

    kind = "mlflow"

    def __init__(self, root: str | Path, experiment: str = "pomona", tracking_uri: str | None = None):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ImportError("--tracker mlflow needs `pip install mlflow` (or use --tracker wandb / none)") from e
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri or f"sqlite:///{self.root / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=(self.root / "mlartifacts").as_uri())
            except Exception:  # another worker created it first
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            self.experiment_id = found.experiment_id

    def start_run(self, name: str, group: str, config: dict[str, Any], tags: list[str] | None = None) -> TrackedRun:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"study": group, **{t: "1" for t in tags or []}})
        run_id = run.info.run_id
        params = {k: str(v)[:500] for k, v in _flatten(config).items()}
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])
        return MlflowRun(self.client, run_id)

    def location(self) -> str:
        return f"{self.uri} (browse with `mlflow ui --backend-store-uri {self.uri}`)"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def create_tracker(kind: str, root: str | Path, project: str = "pomona") -> Tracker:
    """none, wandb (offline) or mlflow (local store), rooted in the run folder `root`."""
    if kind in ("none", "noop", ""):
        return NoOpTracker()
    if kind == "wandb":
        return WandbTracker(root, project)
    if kind == "mlflow":
        return MlflowTracker(root, project)
    raise ValueError(f"unknown tracker {kind!r}: wandb, mlflow or none")


def read_wandb_run(run_dir: str | Path) -> dict[str, Any]:
    """An offline W&B run read back from its directory: {"config", "summary", "history", "stats", "state",
    "group", "name"}. Uses W&B's own reader of the run's .wandb log (`wandb leet inspect --json`)."""
    run_dir = Path(run_dir)
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"wandb leet inspect failed on {run_dir}: {proc.stderr.strip()[-500:]}")
    out: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "stats": [], "state": "running"}
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        kind = record.get("type")
        body = record.get(kind, {})
        if kind == "run":
            out["config"].update({k: v for k, v in body.get("config", {}).get("update", {}).items() if k != "_wandb"})
            out["group"], out["name"] = body.get("run_group"), body.get("display_name")
        elif kind == "config":
            out["config"].update({k: v for k, v in body.get("update", {}).items() if k != "_wandb"})
        elif kind == "history":
            out["history"].append(body.get("item", {}))
        elif kind == "summary":
            out["summary"].update(body.get("update", {}))
        elif kind == "stats":
            out["stats"].append(body.get("item", {}))
        elif kind == "exit":
            out["state"] = "finished" if body.get("exit_code", 0) == 0 else "failed"
    return out
