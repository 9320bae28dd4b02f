"""Settings: one small dataclass per concern, and one per subcommand of the `pomona` command.

Each field carries a docstring right below it; the CLI turns those into `--help`, and a `Literal[...]` type into
the choices a flag accepts (checked when the command line is parsed, and when a config file is read).
A run's settings are one `Config` object (data, model, train, balance); a config file (YAML or JSON) holds only
the fields it changes, like flax's config overrides: `pomona train --config configs/frozen.json`. The run folder
keeps the full resolved config in `config.json`, so a run can be repeated or resumed from it.

This module imports nothing heavy: the CLI builds its parser from it without loading PyTorch.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .atomic import write_json

Engine = Literal["auto", "onnx", "onnx-int8", "torch", "torch-bf16"]
FeatureEngine = Literal["auto", "onnx", "torch"]
View = Literal["identity", "hflip", "vflip", "rot90", "rot180", "rot270"]
"""A test-time view (`pomona.tta`): the image, its left-right and top-bottom flips, its quarter turns."""

MAX_ASPECT = 20.0
"""Default bound on the ratio of an image's longer side to its shorter side (a thin strip resized to the model's
input would be huge: 16000x1 -> 16000*365 x 365 pixels)."""


# ---------------------------------------------------------------------------------------------- run settings
@dataclass
class InputConfig:
    """Where photos come from: a folder, or a CSV of image ids and an image folder."""

    data_dir: str | None = field(default=None, metadata={"flag": "data", "basic": True})
    """Folder of photos; for training and evaluation one sub-folder per class (class = sub-folder name)."""
    csv: str | None = None
    """Competition layout: a CSV of image ids (and labels, for training and evaluation); use with --images."""
    images: str | None = None
    """Competition layout: the folder holding the images named in --csv."""
    id_column: str = "img_id"
    """CSV column holding the image id (with or without file extension)."""
    label_column: str = "label"
    """CSV column holding the label."""


@dataclass
class DataConfig(InputConfig):
    """Where the training images come from and how they are split."""

    val_data: str | None = None
    """A folder-per-class validation set to use instead of splitting the training data."""
    val_fraction: float = field(default=0.2, metadata={"gt": 0, "lt": 1, "basic": True})
    """Fraction of the training data (of its groups, with --group-by) held out for validation."""
    group_by: str | None = field(default="auto", metadata={"basic": True})
    """Which photos are near-duplicates, kept on one side of a split or fold: 'auto' finds them (photos of one
    shelf session, turntable pass or burst: frozen-backbone features, file-name sequences, EXIF capture time;
    written to groups.csv), 'none' makes every photo its own group (random folds: scores can be flattered), or a
    regex on the file name whose match (or first group) names the group, e.g. '^(r\\d?_)?' for fruits360's
    filming passes."""
    holdout: Literal["random", "last"] = "random"
    """Which groups go to validation: 'random' (seeded draw per class) or 'last' (the groups that sort last,
    e.g. the last filming pass)."""
    test_data: str | None = field(default=None, metadata={"basic": True})
    """A labelled folder (one sub-folder per class) that nothing selects on: after training, the kept model (or the
    --folds ensemble) is scored there once, into RUN/test/ (`selected_on: null`)."""
    test_fraction: float = field(default=0.0, metadata={"ge": 0, "lt": 0.5})
    """Hold out this fraction of --data (stratified, whole groups) as a test set before the train/validation
    split; nothing selects on it, and the kept model is scored there once after training (RUN/test/). Not with
    --folds, whose out-of-fold scores are held out already."""
    unlabeled: str | None = None
    """Folder of unlabelled photos (sub-folders are searched too) for self-training: the trained model labels them,
    the confident ones join the training fold of a second model trained the same way (--pseudo-threshold). It
    must not hold photos of the labelled data."""
    train_every_nth: int = field(default=1, metadata={"ge": 1})
    """Keep every Nth training image of each group (in file-name order): consecutive video frames are
    near-duplicates, so thinning them costs little accuracy and saves time. Validation is never thinned."""
    max_bad_fraction: float = field(default=0.05, metadata={"ge": 0, "le": 1})
    """Stop with an error when more than this fraction of the images cannot be read."""
    max_pixels: int = field(default=64_000_000, metadata={"ge": 1})
    """Images with more pixels than this are treated as unreadable (decompression-bomb guard)."""
    max_aspect: float = field(default=MAX_ASPECT, metadata={"ge": 1})
    """Images whose longer side is more than this many times the shorter (thin strips) are treated as
    unreadable."""
    cache_images: bool = True
    """Decode each image once per run and keep it (resized) in memory."""
    cache_max_mb: int = field(default=4096, metadata={"ge": 0})
    """Upper bound of the decoded-image cache; images past it are decoded on the fly."""
    cache_side: int = field(default=0, metadata={"ge": 0})
    """Shorter side (pixels) at which decoded training photos are kept: larger photos are shrunk to it, smaller
    ones kept as they are; 0 = twice the model's resize size, so that small random crops keep their detail."""
    num_workers: int = field(default=0, metadata={"ge": 0})
    """Data-loader worker processes (0 = decode and augment in the main process)."""


@dataclass
class ModelConfig:
    """The network: a timm EfficientNet backbone and the original system's head."""

    name: str = field(default="tf_efficientnet_lite0", metadata={"flag": "model", "basic": True})
    """timm model name (tf_efficientnet_lite0..2 have offline weights; efficientnet_b0..b4 need --weights)."""
    weights: str = "auto"
    """'auto' (packaged offline weights when they exist, else the hub), 'package', 'hub' (timm pretrained=True,
    needs internet), 'none' (random init), or a path to a .safetensors/.pth file."""
    out_features: int = field(default=512, metadata={"ge": 0})
    """Hidden width of the head Linear->ReLU->Dropout->Linear; 0 gives a plain linear head."""
    dropout: float = field(default=0.3, metadata={"ge": 0, "lt": 1})
    """Dropout in the head."""
    img_size: int | None = field(default=224, metadata={"ge": 16, "basic": True})
    """Square input size in pixels (None = the model's pretrained size)."""
    freeze_backbone: bool = field(default=False, metadata={"basic": True})
    """Train only the head, as the original system did (otherwise fine-tune after --frozen-epochs)."""
    channels_last: bool = True
    """Use the channels_last memory format (faster convolutions on CPU)."""


@dataclass
class TrainConfig:
    """How the network is trained."""

    epochs: int = field(default=10, metadata={"ge": 1, "basic": True})
    """Number of epochs."""
    batch_size: int = field(default=32, metadata={"ge": 1, "basic": True})
    """Images per optimisation step."""
    micro_batch: int | None = field(default=None, metadata={"ge": 0})
    """Images per forward and backward pass: each batch runs in slices of this many whose gradients add up to
    the batch's (the same step, with one slice's activations in memory instead of the whole batch's) when the
    backbone is fine-tuned with --freeze-bn (batch-norm layers then see no batch statistics); 0 = whole batches;
    default: 8 on the CPU, whole batches on a GPU."""
    optimizer: Literal["adamw", "adam", "rmsprop", "sgd"] = "adamw"
    """The optimiser."""
    lr: float = field(default=1e-3, metadata={"gt": 0, "basic": True})
    """Peak learning rate of the head (the backbone gets lr * --backbone-lr-mult)."""
    backbone_lr_mult: float = field(default=0.1, metadata={"ge": 0})
    """Learning-rate multiplier of the backbone when fine-tuning."""
    weight_decay: float = field(default=1e-4, metadata={"ge": 0})
    """Weight decay."""
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    """Learning-rate schedule (cosine with linear warm-up, one-cycle, or constant)."""
    warmup_epochs: float = field(default=1.0, metadata={"ge": 0})
    """Linear learning-rate warm-up (cosine schedule), in epochs."""
    frozen_epochs: int = field(default=0, metadata={"ge": 0})
    """Head-only epochs (on augmented images) before the backbone is unfrozen (ignored with --freeze-backbone)."""
    head_init: Literal["probe", "random"] = "probe"
    """How the head starts when the backbone is fine-tuned: 'probe' first trains it on the frozen backbone's
    features of the training photos (a linear probe, then fine-tuning: LP-FT, which changes the pretrained
    features less), 'random' starts fine-tuning from a random head."""
    probe_epochs: int = field(default=40, metadata={"ge": 1})
    """Epochs of the probe that initialises the head (--head-init probe); seconds, on cached features."""
    freeze_bn: bool = True
    """Keep the backbone's batch-norm statistics at their pretrained values while fine-tuning (batch-norm layers
    in eval mode): re-estimating them from small batches of augmented crops of a few hundred photos is what
    made fine-tuned models fail on photos from other sources."""
    wise_alpha: float = field(default=1.0, metadata={"ge": 0, "le": 1})
    """WiSE-FT: keep (1 - alpha) * probe weights + alpha * fine-tuned weights (needs --head-init probe);
    1 = the fine-tuned weights."""
    keep: Literal["last", "best"] = field(default="last", metadata={"basic": True})
    """Which epoch's weights the run keeps: 'last' (no choice looks at the validation photos, so their score is
    a held-out score) or 'best' (highest validation macro-F1: that score is then selected on those photos)."""
    pseudo_threshold: float = field(default=0.8, metadata={"ge": 0, "le": 1})
    """Self-training (--unlabeled): smallest probability at which an unlabelled photo keeps its predicted label;
    per class at most as many as the class has labelled training photos, the most confident first."""
    self_train_rounds: int = field(default=1, metadata={"ge": 1})
    """Self-training (--unlabeled): how many times a model labels the unlabelled photos for the next one."""
    label_smoothing: float = field(default=0.1, metadata={"ge": 0, "lt": 1})
    """Label smoothing of the cross-entropy loss."""
    class_weighted_loss: bool = False
    """Weight the loss by inverse class frequency."""
    weighted_sampler: bool = False
    """Draw training images with probability inversely proportional to their class size (with replacement),
    so every class is seen about equally often per epoch."""
    patience: int = field(default=0, metadata={"ge": 0})
    """With --keep best: stop after this many epochs without a better validation macro-F1 (0 = never)."""
    augment: bool = True
    """Random crops, flips and rotations during training; --no-augment trains on the evaluation preprocessing,
    as the frozen-feature fast path of `pomona tune` does."""
    hflip: float = field(default=0.5, metadata={"ge": 0, "le": 1})
    """Probability of a left-right flip during training."""
    vflip: float = field(default=0.5, metadata={"ge": 0, "le": 1})
    """Probability of a top-bottom flip during training."""
    rotate: float = field(default=30.0, metadata={"ge": 0, "le": 180})
    """Maximum random rotation in degrees during training."""
    crop_scale: float = field(default=0.05, metadata={"gt": 0, "le": 1})
    """Smallest area fraction kept by the random resized crop: small crops show single apples, so the model
    learns the fruit rather than the shelf it lies on."""
    photometric: float = field(default=0.0, metadata={"ge": 0, "le": 1})
    """Probability of a random change of exposure and contrast (+-30%) that keeps each pixel's hue, as photos
    from other cameras and light differ (--white-balance, --blur, --jpeg and --noise add more)."""
    white_balance: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    """Largest relative change of a colour channel's gain (e.g. 0.05) in the photometric change; small, since
    colour tells varieties apart."""
    blur: float = field(default=0.0, metadata={"ge": 0, "le": 1})
    """Probability of a Gaussian blur (sigma 0.1-1.5) during training."""
    jpeg: float = field(default=0.0, metadata={"ge": 0, "le": 1})
    """Probability of re-encoding the training crop as JPEG (quality 30-90)."""
    noise: float = field(default=0.0, metadata={"ge": 0, "le": 1})
    """Probability of adding Gaussian pixel noise (up to 3% of the range)."""
    random_erasing: float = field(default=0.0, metadata={"ge": 0, "le": 1})
    """Probability of erasing a random rectangle (2-25% of the crop): the model cannot rely on one spot."""
    colour_jitter: float = field(default=0.0, metadata={"aliases": ["color_jitter"], "ge": 0})
    """Brightness/contrast jitter strength; 0 by default because colour tells varieties apart."""
    rot90: float = field(default=0.0, metadata={"ge": 0, "le": 1})
    """Probability of an extra random quarter turn (90, 180 or 270 degrees) during training: an apple has no
    upright."""
    elastic: float = field(default=0.0, metadata={"ge": 0})
    """Strength (alpha of torchvision's ElasticTransform, sigma 5; try 20-50) of a random elastic distortion
    during training, the online cousin of Augmentor's random_distortion; 0 = off."""
    ema_epochs: float = field(default=0.0, metadata={"ge": 0})
    """Evaluate and keep an exponential moving average of the weights over roughly this many recent epochs
    (0 = off)."""
    tta: bool | list[View] = True
    """Test-time views averaged at validation and test time: --tta = the image and its left-right flip, --no-tta =
    the image alone, or a list of views, e.g. --tta identity,hflip,vflip (views: identity, hflip, vflip, rot90,
    rot180, rot270; in a config file a list)."""
    # -- speed: where augmentation runs, precision, compilation (the recipe is the same either way)
    device_augment: Literal["auto", "on", "off"] = "auto"
    """Decode every image once into one uint8 store and augment whole batches on the training device
    (pomona.batch_augment); off = per-image torchvision transforms in the data loader; auto = on with CUDA."""
    amp: Literal["auto", "bf16", "off"] = "auto"
    """Mixed precision: bfloat16 autocast of the forward pass and loss; auto = bf16 on CUDA, off on the CPU
    (slower there on 2 cores)."""
    compile: bool = False
    """torch.compile the model for training (pays on a GPU over long runs; compiling takes a minute first)."""


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
    allow_colour: bool = field(default=False, metadata={"flag": "balance_allow_colour",
                                                        "aliases": ["balance_allow_color"]})
    """Allow colour-changing operations (brightness, colour, contrast, greyscale, ...): off because colour
    tells apple varieties apart."""
    cache_dir: str | None = field(default=None, metadata={"flag": "balance_cache"})
    """Folder caching generated images, keyed by the training fold, the settings and the seed (default:
    'balance-cache' next to the run folder)."""
    image_format: Literal["png", "jpg"] = field(default="png", metadata={"flag": "balance_format"})
    """File format of generated images: 'png' (lossless) or 'jpg' (quality 95, smaller)."""


@dataclass
class Config:
    """Everything one run needs; saved as config.json in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    seed: int = field(default=0, metadata={"ge": 0, "lt": 2**32, "group": "train"})
    """Seed of the split, the initialisation, the data order and the augmentation."""
    device: str = field(default="auto", metadata={"basic": True, "group": "train"})
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        return merge(cls(), d)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        """A config.json (a run's settings); ValueError naming the file when it is missing keys' values or broken."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is damaged (not valid JSON: {getattr(e, 'msg', e)})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is damaged (not a JSON object)")
        return cls.from_dict(data)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "balance": BalanceConfig}


# ---------------------------------------------------------------------------------------------- tuning
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


# ------------------------------------------------------------------------------- settings of each subcommand
@dataclass(kw_only=True)
class TrainCommand:
    """Train a classifier into a run folder (or continue one with --resume)."""

    out: str | None = field(default=None, metadata={"basic": True, "group": "run folder"})
    """Run folder to create."""
    resume: str | None = field(default=None, metadata={"metavar": "RUN", "basic": True, "group": "run folder"})
    """Continue the interrupted run in RUN from its last epoch, with its own settings (flags that differ from them
    are refused)."""
    overwrite: bool = field(default=False, metadata={"basic": True, "group": "run folder"})
    """Replace the run already in --out (refused without this flag); its old run files are removed only once the
    new run's settings, data and images have been checked."""
    from_study: str | None = field(default=None, metadata={"metavar": "TUNE_RUN"})
    """Start from the best trial's settings of a `pomona tune` folder (flags still override)."""
    folds: int = field(default=0, metadata={"ge": 0})
    """K-fold cross-validation over all labelled photos (--data, and --val-data if given): K models, each trained
    on K-1 folds, predict the fold they never saw (oof.csv, cv.json) and together form the run's ensemble
    (their probabilities are averaged); 0 = one model on one split. Stratified, and group-aware with
    --group-by."""
    repeats: int = field(default=1, metadata={"ge": 1})
    """With --folds: repeat the K-fold split with this many different seeds (K x repeats models)."""
    size: Literal["s", "m", "l"] | None = field(default=None, metadata={"basic": True, "group": "model"})
    """Model preset (instead of --model and --img-size): s = Lite0 at 224 px (the default), m = Lite0 at 320 px,
    l = Lite2 at 260 px. Measured on the 300 grocery photos (group-aware 3-fold; docs/quality.md): s 0.931
    out-of-fold, 0.971 transfer, 1x time; m 0.929, 0.969, 1.8x; l 0.916, 0.762, 1.7x. Bigger is not better on a
    few hundred photos."""
    config: Config = field(default_factory=Config)


MODEL_PRESETS = {"s": ("tf_efficientnet_lite0", 224), "m": ("tf_efficientnet_lite0", 320),
                 "l": ("tf_efficientnet_lite2", 260)}
"""`train --size`: (timm model name, image size) per preset, each with packaged offline weights."""


def apply_size(cfg: Config, size: str) -> Config:
    """`cfg` with the model and image size of preset `size`; refused when --model or --img-size chose otherwise."""
    name, img_size = MODEL_PRESETS[size]
    default = ModelConfig()
    if (cfg.model.name, cfg.model.img_size) not in ((default.name, default.img_size), (name, img_size)):
        from .errors import UsageError

        raise UsageError(f"--size {size} is {name} at {img_size} px; it cannot be combined with --model "
                         f"{cfg.model.name} --img-size {cfg.model.img_size}: give one or the other")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=name, img_size=img_size))


@dataclass(kw_only=True)
class TuneCommand:
    """Search training settings with Optuna (resumable; many machines share a study through --storage).
    Defaults differ from `train` in two settings: --freeze-backbone and --epochs 4 (the original system's
    trials)."""

    out: str | None = field(default=None, metadata={"basic": True})
    """Run folder (holds the SQLite study, features, trials, tracker runs, results)."""
    show_space: bool = field(default=False, metadata={"basic": True})
    """Print the search space and exit."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    config: Config = field(default_factory=Config)


@dataclass(kw_only=True)
class ScoringConfig(InputConfig):
    """How photos are scored: device, engine, test-time augmentation, batch size."""

    device: str = "auto"
    """auto, cpu or cuda."""
    engine: Engine = "auto"
    """auto = on the CPU the fastest up-to-date export whose parity with fp32 passed (onnx-int8, torch-bf16, then
    fp32 onnx; see `pomona export`), else PyTorch fp32; or onnx, onnx-int8, torch, torch-bf16."""
    tta: bool | None = None
    """Average with the left-right flip (default: as the run was trained)."""
    threads: int | None = field(default=None, metadata={"ge": 0})
    """ONNX Runtime threads (default: one per core)."""
    batch_size: int = field(default=32, metadata={"ge": 1})
    """Photos per model call."""


@dataclass(kw_only=True)
class EvaluateCommand(ScoringConfig):
    """Score a run on a labelled folder or CSV: metrics.json, confusion_matrix.png, predictions.csv,
    report.html."""

    run: str = field(metadata={"positional": True})
    """Run folder."""
    out: str | None = None
    """Output folder (default: RUN/eval, which also rewrites RUN/report.html); elsewhere it gets its own
    report.html and the run's is left alone."""


@dataclass(kw_only=True)
class PredictCommand(ScoringConfig):
    """Predict varieties: a submission CSV for --csv/--images, or the top-k of photos, globs ("photos/*.jpg")
    and --data folders, printed or written to --out."""

    run: str = field(metadata={"positional": True})
    """Run folder."""
    files: list[str] = field(default_factory=list, metadata={"positional": True})
    """Photos to classify; shell-style patterns such as "photos/*.jpg" (quoted) are expanded by pomona."""
    out: str | None = None
    """File to write (a submission CSV with --csv)."""
    format: Literal["csv", "json"] | None = None
    """Output format (default: csv for --out, or by its .json extension; a readable list on the terminal)."""
    sample_submission: str | None = None
    """Take the submission header from this CSV."""
    top_k: int = field(default=3, metadata={"ge": 1})
    """Classes shown per photo."""
    min_confidence: float = field(default=0.6, metadata={"ge": 0, "le": 1})
    """Below this top probability the answer is 'not sure: X or Y' (the `verdict` and `sure` columns; a
    submission CSV still gets the most probable class); 0 = always sure."""
    save_dir: str | None = None
    """Also write each photo into this folder with its verdict and top-k drawn on it (shrunk to at most 1024
    pixels)."""


@dataclass(kw_only=True)
class ReportCommand:
    """(Re)write RUN/report.html from the run folder and its evaluation (a tuning folder: its plots)."""

    run: str = field(metadata={"positional": True})
    """Run folder (of `pomona train` or `pomona tune`)."""
    eval_dir: str | None = None
    """Evaluation folder to show (default: RUN/eval)."""


@dataclass(kw_only=True)
class ExportCommand:
    """Export a run's model to ONNX or TorchScript, checked against PyTorch (max |logit difference|)."""

    run: str = field(metadata={"positional": True})
    """Run folder."""
    format: Literal["auto", "onnx", "onnx-int8", "torch-bf16", "torchscript"] = "auto"
    """auto: every CPU engine this machine runs (onnx, onnx-int8, and torch-bf16 where the CPU has native bf16),
    each timed, so that `--engine auto` uses the fastest that passes parity; or one format: onnx (fp32),
    onnx-int8 (model.int8.onnx: static int8 quantisation calibrated on the run's training photos, the layers it
    hurts most left in float when needed, found by a sensitivity sweep on augmented training photos; writes the
    fp32 model.onnx first when missing), torch-bf16 (no file: PyTorch with bfloat16 autocast) or
    torchscript. Low-precision formats record their parity with fp32 on the run's held-out photos in export.json;
    `--engine auto` uses them only when it passes (top-1 agreement >= 99%, |macro-F1 difference| <= 0.005)."""
    out: str | None = None
    """Folder for the exported model (default: the run folder)."""
    opset: int = field(default=17, metadata={"ge": 7})
    """ONNX opset."""
    tolerance: float = field(default=1e-3, metadata={"gt": 0})
    """Largest accepted |exported - PyTorch| logit difference (fp32 formats)."""
    calibration: int = field(default=64, metadata={"ge": 1})
    """onnx-int8: training photos of the run that calibrate the activation ranges."""
    parity_data: str | None = None
    """Labelled folder (one sub-folder per class) for the parity of low-precision formats (default: the run's
    held-out photos, from split.csv): at least 20 photos, better 200 or more, none of them a training photo of the
    run."""


@dataclass(kw_only=True)
class ServeCommand:
    """Serve a run: a web page at /, JSON at POST /predict, Grad-CAM at POST /explain, GET /health."""

    run: str = field(metadata={"positional": True})
    """Run folder."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 = every network interface)."""
    port: int = field(default=8000, metadata={"ge": 0, "le": 65535})
    """TCP port to listen on."""
    engine: Engine = "auto"
    """auto (the fastest up-to-date export whose parity with fp32 passed, else PyTorch: as `pomona predict`),
    onnx, onnx-int8, torch or torch-bf16."""
    threads: int = field(default=0, metadata={"ge": 0})
    """ONNX Runtime threads per model call (0 = one per CPU core)."""
    tta: bool = True
    """Average each prediction with that of the left-right flipped photo (twice the compute)."""
    max_upload_mb: float = field(default=10.0, metadata={"gt": 0})
    """Largest accepted request body in MB; larger uploads are refused with 413 before they are read."""
    max_pixels: int = field(default=50_000_000, metadata={"ge": 1})
    """Largest accepted image in pixels, read from the header before decoding (decompression-bomb guard)."""
    max_aspect: float = field(default=MAX_ASPECT, metadata={"ge": 1})
    """Largest accepted ratio of an image's longer side to its shorter side; thinner strips get 422."""
    decode_threads: int = field(default=0, metadata={"ge": 0})
    """Photos decoded at the same time (0 = one per CPU core); other uploads wait their turn, so several large
    images never hold a full decode each at once. Large photos are decoded reduced, to about twice the model's
    resize size."""
    max_batch: int = field(default=16, metadata={"ge": 1})
    """Most concurrent requests answered by one model call."""
    max_concurrency: int = field(default=16, metadata={"ge": 1})
    """Requests processed at once (upload read, decoded, classified); more wait in the queue. Idle connections,
    /health and the page do not count."""
    max_queue: int = field(default=256, metadata={"ge": 0})
    """Requests waiting for a free slot; when the queue is full, new ones get 503 with a Retry-After header."""
    queue_timeout: float = field(default=30.0, metadata={"gt": 0})
    """Seconds a request may wait in the queue; then it gets 503 with Retry-After."""
    retry_after: int = field(default=2, metadata={"ge": 0})
    """Seconds a 503 answer asks the client to wait before trying again (the Retry-After header)."""
    header_timeout: float = field(default=10.0, metadata={"gt": 0})
    """Seconds a connection may stay without a request in progress (from connecting, or from its previous
    response) before its request's headers are complete; silent or trickling connections are then closed."""
    body_timeout: float = field(default=60.0, metadata={"gt": 0})
    """Seconds a client has to send its upload once the request is processed; slower uploads get 408."""
    keep_alive_timeout: int = field(default=5, metadata={"ge": 0})
    """Seconds an idle keep-alive connection stays open after a response."""
    max_connections: int = field(default=512, metadata={"ge": 1})
    """Open TCP connections; past this, the connection idle longest (for more than a second) is closed, never one
    with a request in progress."""
    min_confidence: float = field(default=0.6, metadata={"ge": 0, "le": 1})
    """Below this top probability the answer says 'not sure: X or Y' (`sure: false` and `verdict` in the JSON)."""
    explain: bool = True
    """Serve Grad-CAM overlays (/explain; loads the PyTorch model too)."""
    cam_size: int = field(default=448, metadata={"ge": 16})
    """Side in pixels of the Grad-CAM overlay image."""


@dataclass(kw_only=True)
class ExplainCommand:
    """Grad-CAM overlay of a photo: where the model looked for the variety it predicts (or --class)."""

    run: str = field(metadata={"positional": True})
    """Run folder."""
    photo: str = field(metadata={"positional": True})
    """The photo to explain."""
    out: str | None = None
    """PNG to write (default: PHOTO_gradcam.png in the current folder)."""
    class_name: str | None = field(default=None, metadata={"flag": "class"})
    """Explain this class instead of the predicted one."""
    size: int = field(default=448, metadata={"ge": 16})
    """Side of the overlay image in pixels."""
    engine: Engine = "auto"
    """Engine of the probabilities shown (as `pomona predict`); the map itself is computed with PyTorch."""
    tta: bool | None = None
    """Average with the left-right flip (default: as the run was trained), as `pomona predict` does."""


@dataclass(kw_only=True)
class BalanceCommand(InputConfig):
    """Generate Augmentor images that balance a labelled folder: images + manifest.csv in --out (only the
    generated images; to balance inside training, after the split, use `pomona train --balance`)."""

    out: str
    """Output folder (images in <class>/ sub-folders, manifest.csv)."""
    masks: str | None = None
    """Folder of masks mirroring --data (same class/name): transformed with their images
    (Augmentor.DataPipeline), written under OUT/masks/."""
    seed: int = field(default=0, metadata={"ge": 0, "lt": 2**32})
    """Seed (same seed, same files)."""
    balance: BalanceConfig = field(default_factory=BalanceConfig, metadata={"skip": ["cache_dir"]})


@dataclass(kw_only=True)
class PreviewCommand:
    """Write a PNG grid of one photo under the online augmentation and the Augmentor balancing operations."""

    image: str = field(metadata={"positional": True})
    """A photo."""
    out: str = "augment_preview.png"
    """PNG to write."""
    n: int = field(default=11, metadata={"ge": 1})
    """Augmented samples per pipeline."""
    show: Literal["online", "balance", "both"] = "both"
    """Which pipelines to show."""
    config: Config = field(default_factory=Config)


@dataclass(kw_only=True)
class DoctorCommand(InputConfig):
    """Check labelled photos before training: copies and near-duplicates (within a class, under two labels, and
    test photos that copy training ones), near-duplicate groups, suspect labels (confident learning), image
    quality, outliers and class balance. Writes report.html, issues.csv, summary.json and groups.csv into --out."""

    out: str
    """Folder for report.html, issues.csv (one row per finding, worst first), summary.json and groups.csv."""
    test_data: str | None = None
    """A labelled test folder (one sub-folder per class) to check too, and against --data: a test photo that
    copies a training photo is the worst finding."""
    run: str | None = field(default=None, metadata={"metavar": "RUN"})
    """A cross-validation run (`pomona train --folds K`) on these photos: its out-of-fold probabilities (oof.csv)
    rank the suspect labels (default: a logistic regression on frozen features, with group-aware folds)."""
    folds: int = field(default=5, metadata={"ge": 2})
    """Folds of the out-of-fold logistic regression (without --run)."""
    show: int = field(default=40, metadata={"ge": 1})
    """Findings shown per section of report.html (issues.csv lists every one)."""
    keep_features: bool = False
    """Also write features.npy: the frozen features of the photos, one row per row of groups.csv."""
    seed: int = field(default=0, metadata={"ge": 0, "lt": 2**32})
    """Seed of the folds."""
    device: str = "auto"
    """auto, cpu or cuda (the frozen features)."""
    max_pixels: int = field(default=64_000_000, metadata={"ge": 1})
    """Images with more pixels than this are unreadable (as in training)."""


@dataclass(kw_only=True)
class SuggestCommand:
    """Which unlabelled photos to label next: those the run is least sure of, at most --per-group from one
    near-duplicate group (one shelf, burst or turntable pass). Writes suggest.csv and suggest.html into --out."""

    out: str
    """Folder for suggest.csv and suggest.html."""
    run: str | None = field(default=None, metadata={"metavar": "RUN"})
    """The run (or --folds ensemble) whose uncertainty ranks the photos."""
    unlabeled: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Folder of unlabelled photos (sub-folders are searched too); photos the run was trained on are left out."""
    n: int = field(default=50, metadata={"ge": 1, "short": "n"})
    """How many photos to suggest."""
    per_group: int = field(default=1, metadata={"ge": 1})
    """At most this many photos of one near-duplicate group (more only when there are too few groups)."""
    by: Literal["margin", "entropy"] = "margin"
    """Uncertainty: margin (1 - the gap between the two most probable classes) or entropy."""
    device: str = "auto"
    """auto, cpu or cuda."""
    engine: Engine = "auto"
    """Engine of the run's predictions (as `pomona predict`)."""
    batch_size: int = field(default=32, metadata={"ge": 1})
    """Photos per model call."""


ARMS = ("none", "augmentor", "class_weights", "sampler", "none_matched")


@dataclass(kw_only=True)
class AblationSettings:
    """What `pomona ablate` compares."""

    arms: list[str] = field(default_factory=lambda: list(ARMS))
    """Arms to train, comma-separated: none, augmentor, class_weights, sampler, none_matched (plain training with
    as many optimisation steps as augmentor)."""
    seeds: int = field(default=3, metadata={"ge": 1})
    """Training seeds per arm (0..seeds-1); the split and the imbalance are the same for all."""
    imbalance: float | None = field(default=None, metadata={"gt": 0, "le": 1})
    """Keep only this fraction of the minority classes' training images, e.g. 0.2 (default: the data as it is)."""
    minority: list[str] | None = None
    """Comma-separated classes to cut (default: the --n-minority smallest training classes)."""
    n_minority: int = field(default=2, metadata={"ge": 1})
    """How many classes to cut when --minority is not given."""
    balance_mode: str = "max"
    """Balancing of the augmentor arm (see --balance)."""
    val_every_nth: int = field(default=1, metadata={"ge": 1})
    """Score on every Nth validation image of each group (near-duplicate video frames; 1 = all)."""
    n_boot: int = field(default=1000, metadata={"ge": 1})
    """Bootstrap resamples for the confidence intervals."""


@dataclass(kw_only=True)
class AblateCommand(AblationSettings):
    """Train without balancing, with Augmentor balancing, class weights and a weighted sampler on the same split
    and seeds; write results.md and results.json (macro-F1 with bootstrap CIs, minority-class F1, time)."""

    out: str
    """Folder for the runs and results.md/results.json."""
    config: Config = field(default_factory=Config)


@dataclass(kw_only=True)
class FetchCommand:
    """Download a public demo data set into the cache and print its path."""

    name: Literal["grocery-apples"] = field(metadata={"positional": True})
    """The data set."""
    cache_dir: str | None = None
    """Where to keep it (default: ~/.cache/pomona)."""
    url: str | None = None
    """Archive URL (default: the public GroceryStoreDataset archive)."""


# ------------------------------------------------------------------------------------- overrides and checks
RENAMED = {"color_jitter": "colour_jitter"}
"""Old setting names still read from config files and run folders."""


def merge(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of `cfg` with `overrides` ({"train": {"epochs": 3}, "seed": 1}) applied; unknown keys and
    values outside a setting's choices raise, so a typo in a config file never goes unnoticed."""
    cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name)) for name in SECTIONS})
    for key, value in overrides.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"{key} holds settings (a mapping such as {key}: {{...}}), not {value!r}")
            section = getattr(cfg, key)
            for k, v in value.items():
                set_field(section, RENAMED.get(k, k), v, prefix=f"{key}.")
        else:
            set_field(cfg, key, value)
    return cfg


def set_field(obj: Any, name: str, value: Any, prefix: str = "") -> None:
    """Set a field of a settings dataclass, checking that it exists, that the value has the field's type (an int
    for an int, a number for a float, ...) and that it is one of its choices."""
    known = {f.name for f in fields(obj)}
    if name not in known or name in SECTIONS and isinstance(obj, Config):
        raise KeyError(f"unknown setting {prefix}{name}; known: {sorted(known)}")
    hint = typing.get_type_hints(type(obj))[name]
    allowed = choices(hint)
    if allowed and value not in allowed:
        raise ValueError(f"{prefix}{name} must be one of {', '.join(map(str, allowed))}, not {value!r}")
    if not _has_type(value, hint):
        raise ValueError(f"{prefix}{name} must be {_type_name(hint)}, not {value!r}")
    setattr(obj, name, value)


def _has_type(value: Any, hint: Any) -> bool:
    """Whether `value` fits the type `hint` of a settings field (numbers of any numeric type where they fit)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or dataclasses.is_dataclass(hint):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, (bool, np_bool_types()))
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def np_bool_types() -> tuple:
    """numpy's bool type when numpy is already loaded (values from Optuna), without importing it here."""
    import sys

    numpy = sys.modules.get("numpy")
    return (numpy.bool_,) if numpy is not None else ()


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a text", type(None): "none"}
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    def listed(a: Any) -> str:
        items = choices(typing.get_args(a)[0]) if typing.get_args(a) else None
        return f"a list of {', '.join(items)}" if items else "a list"

    return " or ".join(names.get(a, listed(a) if typing.get_origin(a) is list else str(a)) for a in args)


def choices(hint: Any) -> tuple | None:
    """The values of a `Literal[...]` type (also inside `| None`), else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    for arg in typing.get_args(hint):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg) + ((None,) if type(None) in typing.get_args(hint) else ())
    return None


BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
"""Field metadata that bounds a number setting: `metadata={"gt": 0, "lt": 1}` means 0 < value < 1. A number setting
that takes any value says `"unbounded": True` instead (tests/test_values.py checks that each says one or the
other); the CLI checks every bound right after parsing (`range_problems`), before anything is read or written."""
_CHECKS = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def out_of_range(value: Any, metadata: Any) -> str | None:
    """What is wrong with `value` given its field's bounds ('must be >= 1'), or None (None and non-numbers pass)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    limits = [(key, metadata[key]) for key in BOUNDS if key in metadata]
    if not limits:
        return None
    if not math.isfinite(value):
        return "must be a finite number"
    if all(_CHECKS[key](value, bound) for key, bound in limits):
        return None
    return "must be " + " and ".join(f"{BOUNDS[key]} {bound}" for key, bound in limits)


def range_problems(obj: Any, prefix: str = "") -> list[tuple[str, dataclasses.Field, str]]:
    """The number settings of a settings dataclass (and of the dataclasses in it) outside their bounds, as
    (dotted name, field, 'must be >= 1, not 0')."""
    problems = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            problems += range_problems(value, f"{prefix}{f.name}.")
        elif (why := out_of_range(value, f.metadata)) is not None:
            problems.append((prefix + f.name, f, f"{why}, not {value!r}"))
    return problems


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """`cfg` with dotted settings ({"train.lr": 1e-4}) replaced."""
    overrides: dict = {}
    for name, value in params.items():
        section, key = name.split(".", 1)
        overrides.setdefault(section, {})[key] = value
    return merge(cfg, overrides)


def load_overrides(path: str | Path) -> dict[str, Any]:
    """Read a config file (JSON for .json, else YAML, which also reads JSON) holding only the settings it changes;
    ValueError naming the file and the line for a file that does not parse."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; a config file is YAML or JSON") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            hint = " (a YAML file needs a .yaml or .yml name)" if ":" in text and not text.lstrip().startswith("{") \
                else ""
            raise ValueError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}{hint}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a mapping of settings, not {type(data).__name__}")
    return data


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass and of its dataclass bases (used for --help)."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
