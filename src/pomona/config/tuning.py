"""The settings of `pomona tune`: the searched parameters (`SearchParam`, the default space, a space from a file)
and how the study runs (`TuneConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from .run import SECTIONS, FeatureEngine
from .values import load_overrides


@dataclass
class SearchParam:
    """One searched setting of `pomona tune`: its distribution, and when it applies."""

    kind: Literal["int", "float", "categorical"]
    """'int', 'float' or 'categorical'."""
    low: float | None = None
    """Lower bound (int/float)."""
    high: float | None = None
    """Upper bound, inclusive (int/float)."""
    log: bool = False
    """Sample on a log scale (int/float)."""
    step: float | None = None
    """Grid step (int/float; None = continuous, or 1 for int)."""
    choices: list | None = None
    """The values of a categorical setting."""
    only: Literal["frozen", "finetune"] | None = None
    """'frozen' or 'finetune': searched only with (or without) --freeze-backbone; None = always."""

    def __post_init__(self) -> None:
        if self.kind not in ("int", "float", "categorical"):
            raise ValueError(f"search parameter kind must be int, float or categorical, not {self.kind!r}")
        if self.kind == "categorical":
            if not self.choices:
                raise ValueError("a categorical search parameter needs choices")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"a {self.kind} search parameter needs low <= high, got {self.low}, {self.high}")
        elif self.log and self.low <= 0:
            raise ValueError("a log-scale search parameter needs low > 0")
        if self.only not in (None, "frozen", "finetune"):
            raise ValueError(f"`only` must be 'frozen', 'finetune' or null, not {self.only!r}")

    def applies(self, freeze_backbone: bool) -> bool:
        return self.only is None or (self.only == "frozen") == freeze_backbone

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"categorical {self.choices}"
        step = f", step {self.step}" if self.step else ""
        return f"{self.kind} [{self.low:g}, {self.high:g}]" + (" log" if self.log else "") + step


def default_search_space() -> dict[str, SearchParam]:
    """The search space of `pomona tune`, keyed by the dotted Config field each parameter sets.

    The original system searched the first four (head width, dropout, optimiser, learning rate) over a frozen
    backbone; weight decay and label smoothing are added, and for full fine-tuning the backbone's learning-rate
    multiplier and the image size (which change the backbone's features, so they are never searched frozen).
    """
    return {
        "model.out_features": SearchParam("int", 400, 800),
        "model.dropout": SearchParam("float", 0.3, 0.5),
        "train.optimizer": SearchParam("categorical", choices=["adam", "rmsprop"]),
        "train.lr": SearchParam("float", 1e-5, 1e-3, log=True),
        "train.weight_decay": SearchParam("float", 1e-6, 1e-2, log=True),
        "train.label_smoothing": SearchParam("float", 0.0, 0.2),
        "train.backbone_lr_mult": SearchParam("float", 0.01, 1.0, log=True, only="finetune"),
        "model.img_size": SearchParam("categorical", choices=[224, 256, 288, 320], only="finetune"),
    }


def load_search_space(path: str | Path | None) -> dict[str, SearchParam]:
    """The default space, or the one in a JSON/YAML file ({"train.lr": {"kind": "float", "low": 1e-5, ...}, ...});
    every name must be a Config field."""
    if path is None:
        return default_search_space()
    space = {}
    for name, spec in load_overrides(path).items():
        section, _, key = name.partition(".")
        if section not in SECTIONS or key not in {f.name for f in fields(SECTIONS[section])}:
            raise KeyError(f"search space {path}: {name!r} is not a setting (use e.g. 'train.lr', 'model.dropout')")
        space[name] = SearchParam(**spec)
    return space


TRACKER_PACKAGES: dict[str, tuple[str, ...]] = {"wandb": ("wandb",), "mlflow": ("mlflow",), "none": ()}
"""The packages each tracker of `TuneConfig.tracker` needs (`pomona tune` says what to install when one is
missing): a new tracker is its name there and here, and its class in `pomona.tuning.tracking`."""

TUNE_DEFAULTS = {"model": {"freeze_backbone": True}, "train": {"epochs": 4}}
"""`pomona tune` starts from the original system's recipe: a frozen backbone and 4 epochs per trial."""


@dataclass
class TuneConfig:
    """How `pomona tune` searches: the study, its storage, sampler, pruner, tracker and fast path."""

    trials: int = field(default=15, metadata={"ge": 1})
    """Total trials of the study (not per run): rerunning continues it up to this number."""
    storage: str | None = None
    """Optuna storage URL; default sqlite:///OUT/study.db. postgresql://user@host/db: the same command on N
    machines gives N workers on one study."""
    study: str = "pomona"
    """Study name within the storage."""
    sampler: Literal["tpe", "random"] = "tpe"
    """tpe (seeded by --seed) or random."""
    pruner: Literal["median", "none"] = "median"
    """median (stop a trial whose macro-F1 is below the median of earlier trials at the same epoch) or none."""
    pruner_startup_trials: int = field(default=5, metadata={"ge": 0})
    """Trials that finish before the median pruner starts pruning."""
    pruner_warmup_epochs: int = field(default=1, metadata={"ge": 0})
    """Epochs of each trial that are never pruned."""
    tracker: Literal["wandb", "mlflow", "none"] = "wandb"
    """wandb (offline runs under OUT/wandb; `wandb sync` uploads them), mlflow (OUT/mlflow.db; `mlflow ui`) or none."""
    project: str = "pomona"
    """Tracker project (W&B) or experiment (MLflow) name; runs are grouped by study."""
    fast_path: Literal["auto", "on", "off"] = "auto"
    """auto (on when the backbone is frozen), on or off: train heads on cached backbone features."""
    feature_engine: FeatureEngine = "auto"
    """Feature extraction for the fast path: auto (ONNX Runtime on CPU, PyTorch on CUDA), onnx or torch."""
    feature_cache: str | None = None
    """Folder of cached features (default: OUT/features)."""
    heartbeat: int = field(default=30, metadata={"ge": 1})
    """Seconds between a running trial's heartbeats; a trial silent for twice this long (a killed worker)
    is marked failed and queued again."""
    space: str | None = None
    """JSON or YAML file with the search space (default: the built-in one; see --show-space)."""
    keep_weights: bool = False
    """Keep each full-path trial's model weights (default: only its config and history)."""

