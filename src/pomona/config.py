"""Settings of a pomona run: one `Config` object made of small dataclasses.

Each field carries a docstring right below it; the CLI turns those into `--help`. A config file (JSON) holds
only the fields it changes, like flax's config overrides: `pomona train --config configs/frozen.json`.
The run folder keeps the full resolved config in `config.json`, so a run can be repeated or resumed from it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class DataConfig:
    """Where the images come from and how they are split."""

    data_dir: str | None = field(default=None, metadata={"flag": "data"})
    """Folder-per-class training images (class = sub-folder name)."""
    csv: str | None = None
    """Competition layout: a CSV of image ids and labels (use with --images)."""
    images: str | None = None
    """Competition layout: the folder holding the images named in --csv."""
    id_column: str = "img_id"
    """CSV column holding the image id (with or without file extension)."""
    label_column: str = "label"
    """CSV column holding the label."""
    val_data: str | None = None
    """A folder-per-class validation set to use instead of splitting the training data."""
    val_fraction: float = 0.2
    """Fraction of the training data (of its groups, with --group-by) held out for validation."""
    group_by: str | None = None
    """Regex on the file name whose match (or first group) names a near-duplicate group kept on one side
    of the split, e.g. '^(r\\d?_)?' for the filming passes of fruits360."""
    holdout: str = "random"
    """Which groups go to validation: 'random' (seeded draw per class) or 'last' (the groups that sort last,
    e.g. the last filming pass)."""
    train_every_nth: int = 1
    """Keep every Nth training image of each group (in file-name order): consecutive video frames are
    near-duplicates, so thinning them costs little accuracy and saves time. Validation is never thinned."""
    max_bad_fraction: float = 0.05
    """Stop with an error when more than this fraction of the images cannot be read."""
    max_pixels: int = 64_000_000
    """Images with more pixels than this are treated as unreadable (decompression-bomb guard)."""
    cache_images: bool = True
    """Decode each image once per run and keep it (resized) in memory."""
    cache_max_mb: int = 4096
    """Upper bound of the decoded-image cache; images past it are decoded on the fly."""
    num_workers: int = 0
    """Data-loader worker processes (0 = decode and augment in the main process)."""


@dataclass
class ModelConfig:
    """The network: a timm EfficientNet backbone and the original system's head."""

    name: str = field(default="tf_efficientnet_lite0", metadata={"flag": "model"})
    """timm model name (tf_efficientnet_lite0..2 have offline weights; efficientnet_b0..b4 need --weights)."""
    weights: str = "auto"
    """'auto' (packaged offline weights when they exist, else the hub), 'package', 'hub' (timm pretrained=True,
    needs internet), 'none' (random init), or a path to a .safetensors/.pth file."""
    out_features: int = 512
    """Hidden width of the head Linear->ReLU->Dropout->Linear; 0 gives a plain linear head."""
    dropout: float = 0.3
    """Dropout in the head."""
    img_size: int | None = 320
    """Square input size in pixels (None = the model's pretrained size)."""
    freeze_backbone: bool = False
    """Train only the head, as the original system did (otherwise fine-tune after --frozen-epochs)."""
    channels_last: bool = True
    """Use the channels_last memory format (faster convolutions on CPU)."""


@dataclass
class TrainConfig:
    """How the network is trained."""

    epochs: int = 10
    """Number of epochs."""
    batch_size: int = 32
    """Images per optimisation step."""
    optimizer: str = "adamw"
    """adamw, adam, rmsprop or sgd."""
    lr: float = 1e-3
    """Peak learning rate of the head (the backbone gets lr * --backbone-lr-mult)."""
    backbone_lr_mult: float = 0.1
    """Learning-rate multiplier of the backbone when fine-tuning."""
    weight_decay: float = 1e-4
    """Weight decay."""
    schedule: str = "cosine"
    """cosine, onecycle or constant."""
    warmup_epochs: float = 1.0
    """Linear learning-rate warm-up (cosine schedule), in epochs."""
    frozen_epochs: int = 2
    """Head-only epochs before the backbone is unfrozen (ignored with --freeze-backbone)."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy loss."""
    class_weighted_loss: bool = False
    """Weight the loss by inverse class frequency."""
    weighted_sampler: bool = False
    """Draw training images with probability inversely proportional to their class size (with replacement),
    so every class is seen about equally often per epoch."""
    patience: int = 6
    """Stop after this many epochs without a better validation macro-F1 (0 = never)."""
    augment: bool = True
    """Random crops, flips and rotations during training; --no-augment trains on the evaluation preprocessing,
    as the frozen-feature fast path of `pomona tune` does."""
    hflip: float = 0.5
    """Probability of a left-right flip during training."""
    vflip: float = 0.5
    """Probability of a top-bottom flip during training."""
    rotate: float = 30.0
    """Maximum random rotation in degrees during training."""
    crop_scale: float = 0.35
    """Smallest area fraction kept by the random resized crop."""
    color_jitter: float = 0.0
    """Brightness/contrast jitter strength; 0 by default because colour tells varieties apart."""
    rot90: float = 0.0
    """Probability of an extra random quarter turn (90, 180 or 270 degrees) during training: an apple has no
    upright."""
    elastic: float = 0.0
    """Strength (alpha of torchvision's ElasticTransform, sigma 5; try 20-50) of a random elastic distortion
    during training, the online cousin of Augmentor's random_distortion; 0 = off."""
    ema_epochs: float = 2.0
    """Evaluate and keep an exponential moving average of the weights over roughly this many recent epochs
    (0 = off); steadies the result on small data."""
    tta: bool = True
    """Average predictions over the image and its left-right flip at validation and test time."""


@dataclass
class BalanceConfig:
    """Class balancing of the training fold with Augmentor-generated images (after the split, never before)."""

    mode: str = field(default="off", metadata={"flag": "balance"})
    """'off', 'target=N' (bring every class to N training images), 'max' (to the largest class) or 'add=N'
    (N new images per class); only the training fold is balanced, after the split."""
    operations: str = field(default="flip_left_right:0.5,flip_top_bottom:0.5,rotate90:0.25,rotate270:0.25,"
                                    "random_distortion:0.8:4:4:8", metadata={"flag": "balance_ops"})
    """Augmentor operations as 'name:probability:arg...' joined by commas, where name is an Augmentor.Pipeline
    method and the args follow its signature (random_distortion:p:grid_width:grid_height:magnitude)."""
    classes: str | None = field(default=None, metadata={"flag": "balance_classes"})
    """Comma-separated classes to balance (default: every class)."""
    allow_colour: bool = field(default=False, metadata={"flag": "balance_allow_colour"})
    """Allow colour-changing operations (brightness, colour, contrast, greyscale, ...): off because colour
    tells apple varieties apart."""
    cache_dir: str | None = field(default=None, metadata={"flag": "balance_cache"})
    """Folder caching generated images, keyed by the training fold, the settings and the seed (default:
    'balance-cache' next to the run folder)."""
    image_format: str = field(default="png", metadata={"flag": "balance_format"})
    """File format of generated images: 'png' (lossless) or 'jpg' (quality 95, smaller)."""


@dataclass
class Config:
    """Everything one run needs; saved as config.json in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    seed: int = 0
    """Seed of the split, the initialisation, the data order and the augmentation."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        return merge(cls(), d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        return cls.from_dict(json.loads(Path(path).read_text()))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "balance": BalanceConfig}


@dataclass
class SearchParam:
    """One searched setting of `pomona tune`: its distribution, and when it applies."""

    kind: str
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
    only: str | None = None
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
    """The default space, or the one in a JSON file ({"train.lr": {"kind": "float", "low": 1e-5, ...}, ...});
    every name must be a Config field."""
    if path is None:
        return default_search_space()
    raw = json.loads(Path(path).read_text())
    space = {}
    for name, spec in raw.items():
        section, _, key = name.partition(".")
        if section not in SECTIONS or key not in {f.name for f in fields(SECTIONS[section])}:
            raise KeyError(f"search space {path}: {name!r} is not a setting (use e.g. 'train.lr', 'model.dropout')")
        space[name] = SearchParam(**spec)
    return space


@dataclass
class TuneConfig:
    """How `pomona tune` searches: the study, its storage, sampler, pruner, tracker and fast path."""

    trials: int = 15
    """Total trials of the study (not per run): rerunning continues it up to this number."""
    storage: str | None = None
    """Optuna storage URL; default sqlite:///OUT/study.db. postgresql://user@host/db: the same command on N
    machines gives N workers on one study."""
    study: str = "pomona"
    """Study name within the storage."""
    sampler: str = "tpe"
    """tpe (seeded by --seed) or random."""
    pruner: str = "median"
    """median (stop a trial whose macro-F1 is below the median of earlier trials at the same epoch) or none."""
    pruner_startup_trials: int = 5
    """Trials that finish before the median pruner starts pruning."""
    pruner_warmup_epochs: int = 1
    """Epochs of each trial that are never pruned."""
    tracker: str = "wandb"
    """wandb (offline runs under OUT/wandb; `wandb sync` uploads them), mlflow (OUT/mlflow.db; `mlflow ui`) or none."""
    project: str = "pomona"
    """Tracker project (W&B) or experiment (MLflow) name; runs are grouped by study."""
    fast_path: str = "auto"
    """auto (on when the backbone is frozen), on or off: train heads on cached backbone features."""
    feature_engine: str = "auto"
    """Feature extraction for the fast path: auto (ONNX Runtime on CPU, PyTorch on CUDA), onnx or torch."""
    feature_cache: str | None = None
    """Folder of cached features (default: OUT/features)."""
    heartbeat: int = 30
    """Seconds between a running trial's heartbeats; a trial silent for twice this long (a killed worker)
    is marked failed and queued again."""
    space: str | None = None
    """JSON file with the search space (default: the built-in one; see --show-space)."""
    keep_weights: bool = False
    """Keep each full-path trial's model weights (default: only its config and history)."""


def merge(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of `cfg` with `overrides` ({"train": {"epochs": 3}, "seed": 1}) applied; unknown keys
    raise, so a typo in a config file never goes unnoticed."""
    cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name)) for name in SECTIONS})
    for key, value in overrides.items():
        if key in SECTIONS:
            section = getattr(cfg, key)
            known = {f.name for f in fields(section)}
            for k, v in value.items():
                if k not in known:
                    raise KeyError(f"unknown setting {key}.{k}; known: {sorted(known)}")
                setattr(section, k, v)
        elif key in {f.name for f in fields(Config)}:
            setattr(cfg, key, value)
        else:
            raise KeyError(f"unknown setting {key!r}")
    return cfg


def load_overrides(path: str | Path) -> dict[str, Any]:
    """Read a config file holding only the settings it changes."""
    return json.loads(Path(path).read_text())


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (used for --help)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
