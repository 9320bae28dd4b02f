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
    img_size: int | None = 256
    """Square input size in pixels (None = the model's pretrained size)."""
    freeze_backbone: bool = False
    """Train only the head, as the original system did (otherwise fine-tune after --frozen-epochs)."""
    channels_last: bool = True
    """Use the channels_last memory format (faster convolutions on CPU)."""


@dataclass
class TrainConfig:
    """How the network is trained."""

    epochs: int = 14
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
    ema_epochs: float = 0.0
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
