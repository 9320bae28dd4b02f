"""The near-duplicate groups of a run's photos, found from the photos themselves: the frozen `GROUPING_MODEL`
features (`compute_grouping_features`), the grouper `prepare_data` calls (`auto_grouper`, `prepare_run_data`), and
the refusal of unlabelled photos that copy test photos (`check_unlabeled_against_test`). How features become groups
is `pomona.data.groups`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..core.errors import PomonaError
from ..core.progress import write
from ..data.groups import GROUPING_MODEL, GROUPING_SIZE, choose_threshold, cross_set_duplicates, group_table

if TYPE_CHECKING:
    from ..config import Config


def compute_grouping_features(paths: list[str], device: str = "cpu", max_pixels: int = 64_000_000,
                              workdir: str | Path | None = None) -> np.ndarray:
    """Frozen `GROUPING_MODEL` features of `paths` (unreadable photos get a zero row: each its own group)."""
    import tempfile

    import torch

    from ..data.preprocessing import resolve_preprocessing
    from ..models.model import create_backbone, resolve_device
    from .datasets import DecodedImages
    from .extract import create_extractor, extract_features, resolve_engine

    dev = resolve_device(device)
    backbone = create_backbone(GROUPING_MODEL, "auto")
    pre = resolve_preprocessing(backbone, GROUPING_SIZE)
    images = DecodedImages(pre, enabled=False, max_pixels=max_pixels)
    bad = set(images.scan(paths, desc="reading photos for near-duplicate groups"))
    readable = [p for p in paths if p not in bad]
    with tempfile.TemporaryDirectory() as tmp:
        extract, _ = create_extractor(backbone, pre, resolve_engine("auto", dev), dev, Path(workdir or tmp))
        with torch.inference_mode():
            feats = extract_features(extract, readable, images, pre, desc="near-duplicate groups")
    out = np.zeros((len(paths), feats.shape[1] if feats.size else 1), np.float32)
    index = {p: i for i, p in enumerate(paths)}
    for p, f in zip(readable, feats):
        out[index[p]] = f
    return out


def auto_grouper(device: str = "cpu", max_pixels: int = 64_000_000):
    """A `data.bundle.Grouper`: the near-duplicate groups of a table, each class cut into at least `needed` groups."""

    def grouper(table: pd.DataFrame, needed: int) -> tuple[pd.DataFrame, dict]:
        features = compute_grouping_features(list(table["path"]), device, max_pixels)
        grouped, grouping = group_table(table, features, needed)
        summary = grouping.summary()
        write(f"near-duplicate groups: {summary['n_groups']} groups of {len(table)} photos (largest "
              f"{summary['largest']}, {summary['singletons']} single photos); cut at cosine distance "
              f"{summary['threshold']:.3f}")
        for w in grouping.warnings:
            write(f"warning: {w}")
        return grouped, summary

    return grouper


def check_unlabeled_against_test(test: pd.DataFrame, unlabeled: list[str], device: str = "cpu",
                                 max_pixels: int = 64_000_000) -> None:
    """Refuse unlabelled photos that are test photos or near-duplicates of them: self-training would train on
    them with the model's own labels, and the test score would be flattered."""
    test_paths = list(test["path"])
    same = {str(Path(p).resolve()) for p in test_paths} & {str(Path(p).resolve()) for p in unlabeled}
    if same:
        raise PomonaError(f"--unlabeled holds {len(same)} photo(s) of --test-data, e.g. {sorted(same)[0]}: test "
                          "photos must never be trained on, not even with guessed labels")
    features = compute_grouping_features(test_paths + list(unlabeled), device, max_pixels)
    ft, fu = features[:len(test_paths)], features[len(test_paths):]
    cut = choose_threshold(ft, test["label"].to_numpy(dtype=object))
    close = cross_set_duplicates(fu, ft, cut)
    if close:
        i, j, d = close[0]
        raise PomonaError(f"--unlabeled holds {len(close)} near-duplicate(s) of --test-data photos, e.g. "
                          f"{unlabeled[i]} ~ {test_paths[j]} (cosine distance {d:.3f}): test photos must never be "
                          "trained on; remove them from the unlabelled folder")


def prepare_run_data(cfg: "Config"):
    """`data.bundle.prepare_data` for a run: its split keeps the near-duplicate groups of `--group-by auto` together."""
    from ..data.bundle import prepare_data

    return prepare_data(cfg.data, cfg.seed, auto_grouper(cfg.device, cfg.data.max_pixels))
