"""Shared fixtures: small sets of real photos read from ../shared/data (never copied into the repository)."""

from __future__ import annotations

import os
from contextlib import contextmanager
import shutil
from pathlib import Path

import pytest

from pomona.config import Config

pytest_plugins = ["ci_skips"]  # under CI=true a skipped real component fails the run (tests/ci_skips.py)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GROCERY = SHARED / "grocery-apples"
FRUITS360 = SHARED / "fruits360-apples"

if os.environ.get("CI") and not GROCERY.is_dir():  # CI has ../shared/data: never let the real-data tests skip
    raise RuntimeError(f"CI run without the shared data at {SHARED}")

requires_grocery = pytest.mark.skipif(not GROCERY.is_dir(), reason="../shared/data/grocery-apples not present")


def _link_subset(src_root: Path, dst_root: Path, classes: list[str], per_class: int, start: int = 0) -> Path:
    for c in classes:
        (dst_root / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src_root / c).iterdir())[start:start + per_class]:
            (dst_root / c / f.name).symlink_to(f)
    return dst_root


def _grocery_subset(tmp_path_factory, split: str, per_class: int) -> Path:
    if not GROCERY.is_dir():
        pytest.skip("../shared/data/grocery-apples not present")
    root = tmp_path_factory.mktemp(f"grocery_{split}_small")
    return _link_subset(GROCERY / split, root, ["Granny-Smith", "Pink-Lady", "Golden-Delicious"], per_class)


@pytest.fixture(scope="session")
def grocery_small(tmp_path_factory) -> Path:
    """3 classes x 6 real grocery photos in a folder-per-class layout (symlinks into ../shared)."""
    return _grocery_subset(tmp_path_factory, "train", 6)


@pytest.fixture(scope="session")
def grocery_val_small(tmp_path_factory) -> Path:
    """The same 3 classes x 2 validation photos."""
    return _grocery_subset(tmp_path_factory, "val", 2)


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


SERVE_CLASSES = ["Granny-Smith", "Pink-Lady"]


@pytest.fixture(scope="session")
def apple_run(tmp_path_factory) -> Path:
    """A small real classifier, trained once per session and exported to ONNX: ImageNet Lite0 (offline package
    weights), frozen backbone, linear head, 128 px, Granny Smith vs Pink Lady from 8 shop photos each, 4 epochs
    (8 steps: with fewer, whether it learns depends on the data order of its seed). It recognises held-out photos
    of these varieties, so serving tests can check the right variety is shown."""
    if not GROCERY.is_dir():
        pytest.skip("../shared/data/grocery-apples not present")
    from pomona.inference.export import export_run
    from pomona.training.train import train_and_evaluate

    root = tmp_path_factory.mktemp("apple_run")
    cfg = tiny_config(epochs=4, lr=1e-2)
    cfg.model.name, cfg.model.weights, cfg.model.img_size = "tf_efficientnet_lite0", "package", 128
    cfg.model.freeze_backbone, cfg.model.out_features = True, 0
    cfg.data.data_dir = str(_link_subset(GROCERY / "train", root / "train", SERVE_CLASSES, 8))
    cfg.data.val_data = str(_link_subset(GROCERY / "val", root / "val", SERVE_CLASSES, 2))
    train_and_evaluate(cfg, root / "run")
    export_run(root / "run", "onnx")
    return root / "run"


def held_out_photo(variety: str, index: int = 0) -> Path:
    """A grocery photo of `variety` that no test model was trained on (the val folder, from its end)."""
    return sorted((GROCERY / "val" / variety).iterdir())[-1 - index].resolve()


SERVER_LIMITS = {"max_upload_mb": 0.5, "max_pixels": 10_000_000}


@contextmanager
def serving(run_dir: Path, flags: list[str], log_path: Path, wait: float = 180):
    """`pomona serve RUN_DIR FLAGS` started as a user would, on a free localhost port, its output in `log_path`;
    yields (url, port, pid) once /health answers (a loaded 2-core machine can take a while to import torch)."""
    import socket
    import subprocess
    import sys
    import time

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pomona", "serve", str(run_dir), "--port", str(port), *flags],
                                stdout=log, stderr=subprocess.STDOUT, cwd=repo,
                                env=dict(os.environ, PYTHONPATH=str(repo / "src")))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + wait
        while True:
            try:
                if requests.get(url + "/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("pomona serve did not start:\n" + log_path.read_text())
            time.sleep(0.3)
        try:
            yield url, port, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def server(apple_run):
    """`pomona serve` on the exported apple_run, with small limits (0.5 MB uploads, 10 MP images) so the limit
    tests stay light. Yields the base URL."""
    flags = ["--max-upload-mb", str(SERVER_LIMITS["max_upload_mb"]), "--max-pixels", str(SERVER_LIMITS["max_pixels"])]
    with serving(apple_run, flags, apple_run.parent / "server.log") as (url, _, _):
        yield url

