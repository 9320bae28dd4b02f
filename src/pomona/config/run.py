"""The settings of one run: one small dataclass per section (`DataConfig`, `ModelConfig`, `TrainConfig`,
`BalanceConfig`) inside `Config`, saved as config.json in the run folder, and overrides (`merge`: a config file's or
a trial's changes, each checked against its field's type and choices)."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ..core.atomic import write_json
from .values import choices, has_type, type_name

Engine = Literal["auto", "onnx", "onnx-int8", "torch", "torch-bf16"]
FeatureEngine = Literal["auto", "onnx", "torch"]
View = Literal["identity", "hflip", "vflip", "rot90", "rot180", "rot270"]
"""A test-time view (`pomona.models.tta`): the image, its left-right and top-bottom flips, its quarter turns."""

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
    (pomona.data.batch_augment); off = per-image torchvision transforms in the data loader; auto = on with CUDA."""
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
    if not has_type(value, hint):
        raise ValueError(f"{prefix}{name} must be {type_name(hint)}, not {value!r}")
    setattr(obj, name, value)


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """`cfg` with dotted settings ({"train.lr": 1e-4}) replaced."""
    overrides: dict = {}
    for name, value in params.items():
        section, key = name.split(".", 1)
        overrides.setdefault(section, {})[key] = value
    return merge(cfg, overrides)
