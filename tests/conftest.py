"""Shared fixtures: small sets of real photos read from ../shared/data (never copied into the repository)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pomona.config import Config

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GROCERY = SHARED / "grocery-apples"
FRUITS360 = SHARED / "fruits360-apples"

requires_grocery = pytest.mark.skipif(not GROCERY.is_dir(), reason="../shared/data/grocery-apples not present")


def _link_subset(src_root: Path, dst_root: Path, classes: list[str], per_class: int, start: int = 0) -> Path:
    for c in classes:
        (dst_root / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src_root / c).iterdir())[start:start + per_class]:
            (dst_root / c / f.name).symlink_to(f)
    return dst_root


@pytest.fixture(scope="session")
def grocery_small(tmp_path_factory) -> Path:
    """3 classes x 6 real grocery photos in a folder-per-class layout (symlinks into ../shared)."""
    if not GROCERY.is_dir():
        pytest.skip("../shared/data/grocery-apples not present")
    root = tmp_path_factory.mktemp("grocery_small")
    return _link_subset(GROCERY / "train", root, ["Granny-Smith", "Pink-Lady", "Golden-Delicious"], 6)


@pytest.fixture(scope="session")
def grocery_val_small(tmp_path_factory) -> Path:
    if not GROCERY.is_dir():
        pytest.skip("../shared/data/grocery-apples not present")
    root = tmp_path_factory.mktemp("grocery_val_small")
    return _link_subset(GROCERY / "val", root, ["Granny-Smith", "Pink-Lady", "Golden-Delicious"], 2)


def tiny_config(**train) -> Config:
    """A config that trains in seconds: timm's test_efficientnet at 64 px, random init, 1 epoch."""
    cfg = Config()
    cfg.model.name = "test_efficientnet"
    cfg.model.weights = "none"
    cfg.model.img_size = 64
    cfg.model.out_features = 16
    cfg.train.epochs = 1
    cfg.train.batch_size = 8
    cfg.train.frozen_epochs = 0
    cfg.train.warmup_epochs = 0
    cfg.device = "cpu"
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture
def copy_tree():
    def copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst, symlinks=False)
        return dst

    return copy
