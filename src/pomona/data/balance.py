"""Class balancing with Augmentor: extra images for the small classes of a *training fold*.

The system pomona reproduces generated extra images for its minority classes with Augmentor (flips, 90/270
rotations, random distortion; never colour changes) before splitting into train/validation, so copies of one
apple ended up on both sides. Here balancing takes a table that is already split and only ever reads the
training rows: a generated image inherits its source's label and group and is always a training image.

Operations are built with Augmentor's own Pipeline methods (`Augmentor.DataPipeline` when masks come along)
and applied image by image with each operation's `perform_operation` on the list `[image]` or `[image, mask]`,
as DataPipeline does, so an image and its mask get the same geometric transform. Each generated image has its
own seed (from the run seed, its class and its number), which makes the output the same for the same seed,
whatever the order or the cache. Every generated file is listed in a manifest (path, label, source,
operations, seed), so it can be traced back to its source photo.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from ..config import BalanceConfig
from ..core.atomic import write_csv
from ..core.errors import PomonaError
from ..core.progress import Progress
from .bundle import DataBundle
from .images import BadImageError, load_image

#: Augmentor Pipeline methods that change colours (random_erasing paints noise); refused unless `allow_colour`.
COLOUR_OPERATIONS = {"random_brightness", "random_color", "random_contrast", "greyscale", "black_and_white",
                     "invert", "histogram_equalisation", "random_erasing"}
#: Pipeline methods that are not image operations.
_NOT_OPERATIONS = {"sample", "process", "sample_with_array", "status", "set_seed", "set_save_format",
                   "add_operation", "remove_operation", "add_further_directory", "ground_truth",
                   "get_ground_truth_paths", "image_generator", "keras_generator", "keras_generator_from_array",
                   "keras_preprocess_func", "torch_transform", "generator", "categorical_labels",
                   "generator_threading_tests", "generator_threading_tests_with_matrix_data"}
MANIFEST = "manifest.csv"


class BalanceError(PomonaError, ValueError):
    """Bad balancing settings (mode, operations, classes); the message names what is wrong."""


@dataclass
class OperationSpec:
    """One Augmentor operation: the Pipeline method name and its arguments (probability first)."""

    name: str
    args: dict

    def __str__(self) -> str:
        return self.name


@dataclass
class BalancePlan:
    """How many images each class has in the training fold and how many are generated for it."""

    counts: dict[str, int]
    extra: dict[str, int]

    @property
    def after(self) -> dict[str, int]:
        return {c: self.counts[c] + self.extra.get(c, 0) for c in self.counts}


@dataclass
class BalanceResult:
    """The generated rows (path, label, source, operations, seed[, mask]) and where they are."""

    manifest: pd.DataFrame
    folder: Path
    plan: BalancePlan
    seconds: float = 0.0
    cached: bool = False
    skipped_sources: dict[str, str] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return len(self.manifest) / max(self.seconds, 1e-9)


# --------------------------------------------------------------------------------------------- settings
def parse_mode(mode: str) -> tuple[str, int]:
    """'off' | 'max' | 'target=N' | 'add=N' (also '+N') -> (kind, N)."""
    text = (mode or "off").strip().lower().replace("_", "-")
    if text in ("off", "none", "no", ""):
        return "off", 0
    if text in ("max", "to-max"):
        return "max", 0
    if text.startswith("+"):
        text = "add=" + text[1:]
    kind, _, number = text.partition("=")
    kind = {"per-class": "add", "target": "target", "add": "add"}.get(kind)
    try:
        n = int(number.lstrip("+"))
    except ValueError:
        n = -1
    if kind is None or n < 0:
        raise BalanceError(f"unknown balance mode {mode!r}: use 'off', 'max', 'target=N' or 'add=N'")
    return kind, n


def _operation_methods() -> dict[str, inspect.Signature]:
    import Augmentor

    methods = {}
    for name, fn in inspect.getmembers(Augmentor.Pipeline, inspect.isfunction):
        if name.startswith("_") or name in _NOT_OPERATIONS:
            continue
        params = list(inspect.signature(fn).parameters)
        if len(params) >= 2 and params[1] == "probability":
            methods[name] = inspect.signature(fn)
    return methods


def parse_operations(spec: str, allow_colour: bool = False) -> list[OperationSpec]:
    """'flip_left_right:0.5,random_distortion:0.8:4:4:8' -> operation specs, checked against Augmentor's
    Pipeline methods; colour operations are refused unless `allow_colour`."""
    methods = _operation_methods()
    ops = []
    for item in [s.strip() for s in (spec or "").split(",") if s.strip()]:
        name, *values = [v.strip() for v in item.split(":")]
        if name not in methods:
            raise BalanceError(f"unknown Augmentor operation {name!r} in {item!r}; known: {sorted(methods)}")
        if name in COLOUR_OPERATIONS and not allow_colour:
            raise BalanceError(f"{name!r} changes colours, which tell apple varieties apart; refused unless "
                               f"colour operations are allowed (--balance-allow-colour)")
        params = [p for p in methods[name].parameters.values() if p.name != "self"]
        required = [p for p in params if p.default is inspect.Parameter.empty]
        if not required[0:1] or not values:
            raise BalanceError(f"{item!r}: give at least the probability, e.g. '{name}:0.5'")
        if len(values) < len(required) or len(values) > len(params):
            names = ", ".join(p.name for p in params)
            raise BalanceError(f"{item!r}: {name} takes {len(required)} to {len(params)} values ({names})")
        args = {}
        for p, v in zip(params, values):
            args[p.name] = _parse_value(v, p.default, item)
        if not 0.0 <= float(args["probability"]) <= 1.0:
            raise BalanceError(f"{item!r}: probability must be between 0 and 1")
        ops.append(OperationSpec(name, args))
    if not ops:
        raise BalanceError("no balancing operations given")
    return ops


def _parse_value(text: str, default, item: str):
    if isinstance(default, bool) or text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if isinstance(default, str) or default is None:
        return text
    raise BalanceError(f"{item!r}: cannot read value {text!r}")


def create_pipeline(ops: Sequence[OperationSpec], with_masks: bool = False):
    """An Augmentor pipeline holding `ops`, built with its own methods (DataPipeline for image + mask)."""
    import Augmentor

    pipeline = Augmentor.DataPipeline([]) if with_masks else Augmentor.Pipeline()
    for op in ops:
        getattr(pipeline, op.name)(**op.args)
    return pipeline


# ----------------------------------------------------------------------------------------------- planning
def plan_balance(counts: dict[str, int], mode: str, classes: Sequence[str] | None = None) -> BalancePlan:
    """Number of images to generate per class for `mode` (see `parse_mode`), for `classes` (default all)."""
    kind, n = parse_mode(mode)
    chosen = list(counts) if not classes else list(classes)
    unknown = sorted(set(chosen) - set(counts))
    if unknown:
        raise BalanceError(f"classes to balance not in the training fold: {unknown}; there are {sorted(counts)}")
    goal = max(counts.values()) if kind == "max" else n
    extra = {}
    for c in chosen:
        if kind == "add":
            extra[c] = n
        elif kind in ("max", "target"):
            extra[c] = max(0, goal - counts[c])
    return BalancePlan(dict(counts), {c: e for c, e in extra.items() if e > 0})


def _split_classes(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


# --------------------------------------------------------------------------------------------- generation
def image_seed(seed: int, label: str, index: int) -> int:
    """The seed of generated image `index` of class `label`: independent of order, stable across runs."""
    digest = hashlib.sha256(f"{seed}|{label}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def augment_one(pipeline, images: list[Image.Image], seed: int, require_change: bool = True,
                ) -> tuple[list[Image.Image], list[str]]:
    """Apply the pipeline's operations to `images` (an image, or an image and its masks) with one seed.

    Every operation fires with its probability; its random draws (angles, distortion grid) are shared by all
    images of the list, so masks move with their image. With `require_change`, draws that fire nothing are
    redrawn, so a generated image is never a plain copy of its source.
    """
    random.seed(seed)
    np.random.seed(seed)
    for _ in range(100):
        fired = [op for op in pipeline.operations if random.random() < op.probability]
        if fired or not require_change:
            break
    out = list(images)
    for op in fired:
        out = op.perform_operation(out)
    return out, [_operation_name(op) for op in fired]


def _operation_name(op) -> str:
    name = type(op).__name__
    if name == "Rotate":
        return f"rotate{op.rotation}" if op.rotation != -1 else "rotate_random_90"
    if name == "Flip":
        return {"LEFT_RIGHT": "flip_left_right", "TOP_BOTTOM": "flip_top_bottom"}.get(op.top_bottom_left_right,
                                                                                      "flip_random")
    if name == "Distort":
        return f"random_distortion({op.grid_width}x{op.grid_height},{op.magnitude})"
    return name


def _snap_to_values(mask: Image.Image, values: np.ndarray) -> Image.Image:
    """Round every pixel of a resampled label mask to the nearest value the source mask had (Augmentor's
    distortion interpolates bicubically, which would invent labels at the edges)."""
    a = np.asarray(mask)
    idx = np.abs(a[..., None].astype(np.int16) - values.astype(np.int16)).argmin(-1)
    return Image.fromarray(values[idx].astype(a.dtype), mask.mode)


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    if fmt == "jpg":
        img.save(path, quality=95)
    else:
        img.save(path, compress_level=1)


def generate_images(sources: pd.DataFrame, plan: BalancePlan, cfg: BalanceConfig, seed: int, out_dir: Path,
                    max_pixels: int = 64_000_000) -> BalanceResult:
    """Write `plan.extra[c]` new images per class into `out_dir/<class>/` and a manifest.csv.

    `sources` holds the training rows (path, label[, mask]); each class's sources are used in turn in a seeded
    order, so each is the source of about the same number of new images.
    """
    fmt = cfg.image_format.lower().replace("jpeg", "jpg")
    if fmt not in ("png", "jpg"):
        raise BalanceError(f"image format must be 'png' or 'jpg', got {cfg.image_format!r}")
    with_masks = "mask" in sources.columns
    pipeline = create_pipeline(parse_operations(cfg.operations, cfg.allow_colour), with_masks)
    out_dir = Path(out_dir)
    rows, skipped = [], {}
    start = time.perf_counter()
    saved_state = random.getstate(), np.random.get_state()
    bar = Progress(total=sum(plan.extra.values()), desc="balancing", unit="img")
    for label, n_new in plan.extra.items():
        frame = sources[sources["label"] == label].sort_values("path").reset_index(drop=True)
        decoded = []
        for row in frame.itertuples():
            try:
                image = load_image(row.path, max_pixels)
                mask = Image.open(row.mask) if with_masks else None
                decoded.append((row, image, mask))
            except (BadImageError, OSError) as e:
                skipped[row.path] = str(e)
        if not decoded:
            raise BalanceError(f"class {label!r} has no readable training image to generate from")
        order = np.random.default_rng(image_seed(seed, label, -1)).permutation(len(decoded))
        class_dir = out_dir / _safe_name(label)
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n_new):
            row, image, mask = decoded[order[i % len(decoded)]]
            s = image_seed(seed, label, i)
            inputs = [image] if mask is None else [image, mask]
            outputs, ops = augment_one(pipeline, inputs, s)
            stem = Path(row.path).stem
            path = class_dir / f"aug{i:05d}_{stem}.{fmt}"
            _save(outputs[0].convert("RGB"), path, fmt)
            record = {"path": str(path), "label": label, "source": row.path, "operations": "+".join(ops),
                      "seed": s}
            if mask is not None:
                values = np.unique(np.asarray(mask))
                out_mask = _snap_to_values(outputs[1], values) if len(values) <= 16 else outputs[1]
                mask_path = out_dir / "masks" / _safe_name(label) / f"aug{i:05d}_{stem}.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                out_mask.save(mask_path, compress_level=1)
                record.update(mask=str(mask_path), source_mask=row.mask)
            rows.append(record)
            bar.update()
    bar.close()
    random.setstate(saved_state[0])
    np.random.set_state(saved_state[1])
    manifest = pd.DataFrame(rows, columns=["path", "label", "source", "operations", "seed"]
                            + (["mask", "source_mask"] if with_masks else []))
    write_csv(out_dir / MANIFEST, manifest)
    return BalanceResult(manifest, out_dir, plan, time.perf_counter() - start, False, skipped)


def _safe_name(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_. " else "_" for ch in label)


def balance_table(table: pd.DataFrame, cfg: BalanceConfig, seed: int, out_dir: str | Path,
                  max_pixels: int = 64_000_000) -> BalanceResult:
    """Balance a labelled table (path, label[, mask]) into `out_dir` (images + manifest.csv)."""
    counts = table.groupby("label").size().to_dict()
    plan = plan_balance(counts, cfg.mode, _split_classes(cfg.classes))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return generate_images(table, plan, cfg, seed, out_dir, max_pixels)


# ---------------------------------------------------------------------------------- training-fold balancing
def cache_key(train: pd.DataFrame, cfg: BalanceConfig, seed: int) -> str:
    """Hash of the training fold (paths, labels, file sizes and times), the settings and the seed."""
    h = hashlib.sha256()
    for path, label in sorted(zip(train["path"], train["label"])):
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{path}\t{label}\t{stamp}\n".encode())
    settings = {k: v for k, v in asdict(cfg).items() if k != "cache_dir"}
    h.update(json.dumps({"settings": settings, "seed": seed, "version": 1}, sort_keys=True).encode())
    return h.hexdigest()[:20]


def balance_training_fold(bundle: DataBundle, cfg: BalanceConfig, seed: int, cache_dir: str | Path,
                          max_pixels: int = 64_000_000) -> tuple[DataBundle, BalanceResult]:
    """Generate (or reuse from `cache_dir`) extra images for the training fold of `bundle` and append them as
    training rows with a `source` column; validation rows are never read and never get a copy."""
    train = bundle.subset("train")
    counts = {c: int((train["label"] == c).sum()) for c in bundle.classes}
    plan = plan_balance(counts, cfg.mode, _split_classes(cfg.classes))
    if not plan.extra:
        return bundle, BalanceResult(pd.DataFrame(columns=["path", "label", "source", "operations", "seed"]),
                                     Path(cache_dir), plan)
    folder = Path(cache_dir) / cache_key(train, cfg, seed)
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        manifest = pd.read_csv(manifest_path, dtype={"path": str, "label": str, "source": str,
                                                     "operations": str}, keep_default_na=False)
        if all(Path(p).is_file() for p in manifest["path"]):
            result = BalanceResult(manifest, folder, plan, 0.0, cached=True)
            return _append(bundle, manifest), result
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    result = generate_images(train, plan, cfg, seed, tmp, max_pixels)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    # paths were written under the temporary folder: point them at the final one
    manifest = result.manifest.copy()
    for col in [c for c in ("path", "mask") if c in manifest.columns]:
        manifest[col] = [str(folder / Path(p).relative_to(tmp)) for p in manifest[col]]
    write_csv(manifest_path, manifest)
    result.manifest, result.folder = manifest, folder
    return _append(bundle, manifest), result


def _append(bundle: DataBundle, manifest: pd.DataFrame) -> DataBundle:
    table = bundle.table.copy()
    if "source" not in table.columns:
        table["source"] = ""
    group = dict(zip(table["path"], table["group"]))
    extra = pd.DataFrame({"path": manifest["path"], "label": manifest["label"],
                          "group": [group[s] for s in manifest["source"]], "subset": "train",
                          "source": manifest["source"]})
    return DataBundle(pd.concat([table, extra], ignore_index=True), bundle.classes)
