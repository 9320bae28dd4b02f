"""int8 quantisation that holds up: every layer quantised when that keeps the model's answers, else the layers
quantisation hurts most left in float, found by a sensitivity sweep (`quantize_with_sweep`), judged on augmented
views of training photos (`training_views`) against fp32's own outputs (`logit_error`): no label and no held-out
photo is used, so the parity on held-out photos that `pomona export` measures next is not chosen on."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..core.progress import Progress
from ..data.preprocessing import Preprocessing
from .engine import OnnxEngine
from .loaded import PARITY_MIN_TOP1_AGREEMENT
from .onnx_io import layer_groups, preprocess_for_quantization, quantize_onnx

SWEEP_TARGET = 1 / 2
"""The int8 model's error (`logit_error` from fp32) that the sensitivity sweep aims at, as a fraction of the
error with every layer quantised: the most sensitive layers are left in float until it is reached (or half of
them are)."""


def training_views(paths: Sequence[str], pre: Preprocessing, info: dict, max_pixels: int, views: int = 2,
                   batch_size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """`views` augmented views of each photo, as the run's training augmentation makes them (crops, turns, flips),
    in batches: wider-ranging inputs than the photos themselves, on which int8 errors show (seeded)."""
    from ..config import Config
    from ..data.augment import augment_spec
    from ..data.images import BadImageError, load_image
    from ..data.preprocessing import create_resize, create_train_transform

    spec = augment_spec(Config.from_dict(info.get("config", {})).train)
    augment, resize = create_train_transform(pre, spec), create_resize(pre)
    out = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for path in paths:
            try:
                image = resize(load_image(path, max_pixels, pre.resize_size))
            except BadImageError:
                continue
            out += [augment(image).numpy() for _ in range(views)]
    return [np.stack(out[i:i + batch_size]) for i in range(0, len(out), batch_size)]


def logit_error(logits: np.ndarray, reference: np.ndarray) -> float:
    """Mean over images of |logits - reference| / the spread of the reference's logits (both L2): unlike
    probabilities, it does not vanish on the photos a model is sure of."""
    spread = np.linalg.norm(reference - reference.mean(1, keepdims=True), axis=1)
    return float(np.mean(np.linalg.norm(logits - reference, axis=1) / np.maximum(spread, 1e-6)))


def quantize_with_sweep(fp32_onnx: Path, out: str | Path, calibration: list[np.ndarray], probe: list[np.ndarray],
                        threads: int | None = None, sweep: bool = False) -> dict:
    """Quantise `fp32_onnx` to int8 at `out`: every layer when that keeps the top class of at least
    PARITY_MIN_TOP1_AGREEMENT of the `probe` batches, else with the layers quantisation hurts most left in float,
    found by a sensitivity sweep. The probe batches are augmented views of training photos other than the
    `calibration` ones (`training_views`), compared with fp32's own outputs: no label and no held-out photo is
    used, so the parity on held-out photos that follows is not chosen on. The sweep leaves each layer group
    (`onnx_io.layer_groups`) in float alone; the one whose float copy brings the outputs closest to fp32
    (`logit_error`) is kept in float first, and so on, until the top class agrees as above and the error is at
    most SWEEP_TARGET of the all-int8 error (or half the groups are in float). `sweep=True` sweeps even when the
    all-int8 model agrees on the probe (`pomona export` does when it then fails its parity gate). Returns what it
    found."""
    fp32 = OnnxEngine(fp32_onnx, threads)
    reference = np.concatenate([fp32.logits(x) for x in probe])

    def measure(exclude: Sequence[str], path: str | Path) -> tuple[float, float]:
        quantize_onnx(pre, path, calibration, exclude, preprocessed=True)
        engine = OnnxEngine(path, threads)
        logits = np.concatenate([engine.logits(x) for x in probe])
        return logit_error(logits, reference), float((logits.argmax(1) == reference.argmax(1)).mean())

    def good(err: float, agree: float) -> bool:
        return agree >= PARITY_MIN_TOP1_AGREEMENT and err <= SWEEP_TARGET * full

    with tempfile.TemporaryDirectory(prefix="pomona-sweep-") as tmp:
        pre = preprocess_for_quantization(fp32_onnx, Path(tmp) / "pre.onnx")
        full, agree = measure([], out)
        found = {"views_error_all_int8": full, "views_agreement_all_int8": agree, "float_layers": [],
                 "excluded_nodes": []}
        if agree >= PARITY_MIN_TOP1_AGREEMENT and not sweep:
            return found
        trial = Path(tmp) / "trial.onnx"
        groups = layer_groups(pre)
        alone = {g: measure(nodes, trial)[0] for g, nodes in Progress(
            groups.items(), desc="int8 sensitivity sweep", total=len(groups), unit="layer")}
        kept: list[str] = []
        err = full
        for g in sorted(alone, key=alone.get):
            if good(err, agree) or alone[g] >= full or len(kept) >= len(groups) // 2:
                break
            kept.append(g)
            err, agree = measure([n for k in kept for n in groups[k]], trial)
        excluded = [n for k in kept for n in groups[k]]
        if kept:  # the last model the loop measured is this one
            shutil.copyfile(trial, out)
    return {**found, "views_error": err, "views_agreement": agree, "float_layers": kept, "excluded_nodes": excluded,
            "sweep": {g: round(e, 5) for g, e in alone.items()}}
