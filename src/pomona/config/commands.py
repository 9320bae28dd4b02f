"""The settings of each subcommand of `pomona`: one dataclass per subcommand, whose fields are its flags (the
field docstring is the --help text; `Literal[...]` types give the choices)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .run import MAX_ASPECT, BalanceConfig, Config, Engine, InputConfig, ModelConfig
from .tuning import TuneConfig


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
        from ..core.errors import UsageError

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
    """Export a run's model for fast CPU inference (ONNX, int8 ONNX, bf16 PyTorch) or TorchScript, each checked
    against PyTorch fp32."""

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

