"""Augmentor class balancing: counts per mode, manifest and labels, masks moved with their images, no colour
change, determinism, and no generated image outside the training fold."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pomona.cli.commands import run
from pomona.config import BalanceConfig
from pomona.data.balance import (BalanceError, balance_table, balance_training_fold, parse_mode, parse_operations,
                                 plan_balance)
from pomona.data.bundle import DataBundle
from pomona.data.index import index_folder
from pomona.training.loaders import create_weighted_sampler

from conftest import GROCERY, tiny_config

TINY = ["--model", "test_efficientnet", "--weights", "none", "--img-size", "64", "--out-features", "16",
        "--epochs", "1", "--batch-size", "8", "--frozen-epochs", "0", "--device", "cpu"]


@pytest.fixture
def synthetic(tmp_path) -> Path:
    """Three classes of 5, 3 and 2 random 40x32 photos."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for label, n in [("a", 5), ("b", 3), ("c", 2)]:
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(root / label / f"{label}{i}.png")
    return root


def _counts(manifest: pd.DataFrame) -> dict:
    return manifest.groupby("label").size().to_dict()


@pytest.mark.parametrize("mode, expected", [("target=6", {"a": 1, "b": 3, "c": 4}), ("max", {"b": 2, "c": 3}),
                                            ("add=4", {"a": 4, "b": 4, "c": 4}), ("+2", {"a": 2, "b": 2, "c": 2})])
def test_counts_labels_and_manifest_per_mode(synthetic, tmp_path, mode, expected):
    table = index_folder(synthetic)
    result = balance_table(table, BalanceConfig(mode=mode), seed=0, out_dir=tmp_path / "out")
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv", keep_default_na=False)
    assert _counts(manifest) == expected
    assert list(manifest.columns) == ["path", "label", "source", "operations", "seed"]
    source_label = dict(zip(table["path"], table["label"]))
    for row in manifest.itertuples():
        assert Path(row.path).is_file() and Path(row.path).parent.name == row.label
        assert source_label[row.source] == row.label  # traceable to a source of the same class
        assert row.operations  # never a plain copy
    # the sources of a class are used in turn, so each is used about equally often
    uses = manifest.groupby(["label", "source"]).size()
    for label in expected:
        assert uses[label].max() - uses[label].min() <= 1
    assert result.plan.after == {c: n + expected.get(c, 0) for c, n in {"a": 5, "b": 3, "c": 2}.items()}


def test_classes_setting_and_bad_settings(synthetic, tmp_path):
    counts = {"a": 5, "b": 3, "c": 2}
    assert plan_balance(counts, "target=4", ["c"]).extra == {"c": 2}
    with pytest.raises(BalanceError, match="not in the training fold"):
        plan_balance(counts, "max", ["zzz"])
    for bad in ["target", "add=x", "sometimes"]:
        with pytest.raises(BalanceError, match="unknown balance mode"):
            parse_mode(bad)
    with pytest.raises(BalanceError, match="unknown Augmentor operation"):
        parse_operations("flip_sideways:0.5")
    with pytest.raises(BalanceError, match="takes 4 to 4 values"):
        parse_operations("random_distortion:0.5:4")
    with pytest.raises(BalanceError, match="changes colours"):
        parse_operations("flip_left_right:0.5,random_brightness:0.5:0.7:1.3")
    assert [o.name for o in parse_operations("random_brightness:0.5:0.7:1.3", allow_colour=True)] == \
        ["random_brightness"]


def test_same_seed_same_files_other_seed_other_files(synthetic, tmp_path):
    table = index_folder(synthetic)
    runs = {}
    for name, seed in [("x", 3), ("y", 3), ("z", 4)]:
        m = balance_table(table, BalanceConfig(mode="max"), seed, tmp_path / name).manifest
        runs[name] = [Path(p).read_bytes() for p in m["path"]]
    assert runs["x"] == runs["y"]
    assert runs["x"] != runs["z"]


def test_mask_gets_the_same_transform_as_its_image(tmp_path):
    """Synthetic pair: the image is the mask painted in RGB, so after any shared geometric transform (flips,
    quarter turns, the bicubic random distortion) thresholding the image must give back the mask exactly."""
    rng = np.random.default_rng(1)
    root, masks = tmp_path / "img", tmp_path / "mask"
    rows = []
    for i in range(3):
        yy, xx = np.mgrid[:48, :64]
        cy, cx, r = rng.integers(14, 34), rng.integers(14, 50), rng.integers(6, 12)
        mask = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, 255, 0).astype(np.uint8)
        mask[:6, :10] = 255  # an asymmetric mark, so flips and turns show
        for d in (root / "a", masks / "a"):
            d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([mask] * 3, -1)).save(root / "a" / f"{i}.png")
        Image.fromarray(mask, "L").save(masks / "a" / f"{i}.png")
        rows.append({"path": str(root / "a" / f"{i}.png"), "label": "a", "mask": str(masks / "a" / f"{i}.png")})
    cfg = BalanceConfig(mode="add=12")
    manifest = balance_table(pd.DataFrame(rows), cfg, 0, tmp_path / "out").manifest
    assert {"mask", "source_mask"} <= set(manifest.columns)
    moved = 0
    for row in manifest.itertuples():
        image = np.asarray(Image.open(row.path))
        mask = np.asarray(Image.open(row.mask))
        assert image.shape[:2] == mask.shape
        assert set(np.unique(mask)) <= {0, 255}  # label values kept, none invented at edges
        assert np.array_equal(np.where(image[..., 0] >= 128, 255, 0), mask), row.operations
        source = np.asarray(Image.open(row.source_mask))
        moved += source.shape != mask.shape or not np.array_equal(source, mask)
    assert moved == len(manifest)
    # the same through the command line: masks found by class folder and file name
    assert run(["balance", "--data", str(root), "--masks", str(masks), "--out", str(tmp_path / "cli"),
                "--balance", "add=2"]) == 0
    cli = pd.read_csv(tmp_path / "cli" / "manifest.csv")
    assert len(cli) == 2 and all(Path(p).is_file() for p in cli["mask"])
    assert set(cli["source_mask"]) <= {r["mask"] for r in rows}


@pytest.mark.skipif(not GROCERY.is_dir(), reason="../shared/data/grocery-apples not present")
@pytest.mark.parametrize("ops", ["flip_left_right:1", "flip_top_bottom:1", "rotate90:1", "rotate270:1",
                                 "flip_left_right:1,rotate90:1"])
def test_flips_and_rotations_do_not_change_colours(tmp_path, ops):
    photo = sorted((GROCERY / "train" / "Pink-Lady").iterdir())[0]
    table = pd.DataFrame({"path": [str(photo)], "label": ["Pink-Lady"]})
    manifest = balance_table(table, BalanceConfig(mode="add=1", operations=ops), 0, tmp_path).manifest
    src = np.asarray(Image.open(photo).convert("RGB"))
    out = np.asarray(Image.open(manifest["path"][0]))
    assert not np.array_equal(src, out)  # it did transform the photo
    for ch in range(3):
        assert np.array_equal(np.bincount(src[..., ch].ravel(), minlength=256),
                              np.bincount(out[..., ch].ravel(), minlength=256)), ch


def test_balancing_only_sees_the_training_fold(synthetic, tmp_path):
    table = index_folder(synthetic).assign(subset="train")
    table.loc[table["path"].str.endswith(("a4.png", "b2.png", "c1.png")), "subset"] = "val"
    bundle = DataBundle(table, ["a", "b", "c"])
    balanced, result = balance_training_fold(bundle, BalanceConfig(mode="target=6"), 0, tmp_path / "cache")
    val_paths = set(table.loc[table["subset"] == "val", "path"])
    generated = balanced.table[balanced.table["source"] != ""]
    assert (generated["subset"] == "train").all()
    assert not set(generated["source"]) & val_paths
    assert balanced.subset("val").equals(bundle.subset("val").assign(source=""))
    assert balanced.subset("train").groupby("label").size().to_dict() == {"a": 6, "b": 6, "c": 6}
    again, cached = balance_training_fold(bundle, BalanceConfig(mode="target=6"), 0, tmp_path / "cache")
    assert cached.cached and again.table.equals(balanced.table)
    _, other = balance_training_fold(bundle, BalanceConfig(mode="target=6"), 1, tmp_path / "cache")
    assert not other.cached and other.folder != result.folder


def test_train_with_balance_groups_and_cache(grocery_small, tmp_path):
    """Group-aware split + --balance through the CLI: generated images are training rows whose sources are
    training images of whole training groups; the second run reuses the cache."""
    # groups per class: _001, _002, _003 alone and _004.._006 together (the regex matches '_00' for them)
    args = ["train", "--data", str(grocery_small), "--group-by", "_00[1-3]?", "--val-fraction", "0.34",
            "--balance", "target=9", "--weighted-sampler", *TINY]
    assert run([*args, "--out", str(tmp_path / "r1")]) == 0
    split = pd.read_csv(tmp_path / "r1" / "split.csv", keep_default_na=False)
    generated = split[split["source"] != ""]
    originals = split[split["source"] == ""]
    assert len(generated) > 0 and (generated["subset"] == "train").all()
    train_paths = set(originals.loc[originals["subset"] == "train", "path"])
    assert set(generated["source"]) <= train_paths
    val_groups = set(originals.loc[originals["subset"] == "val", "group"])
    assert val_groups and not set(generated["group"]) & val_groups
    assert split[split["subset"] == "train"].groupby("label").size().min() >= 9
    info = json.loads((tmp_path / "r1" / "balance.json").read_text())
    assert not info["cached"] and sum(info["generated"].values()) == len(generated)
    assert run([*args, "--out", str(tmp_path / "r2")]) == 0
    assert json.loads((tmp_path / "r2" / "balance.json").read_text())["cached"]
    assert (tmp_path / "r1" / "split.csv").read_text() == (tmp_path / "r2" / "split.csv").read_text()


def test_weighted_sampler_draws_classes_equally():
    targets = [0] * 90 + [1] * 10
    sampler = create_weighted_sampler(targets, 2, torch.Generator().manual_seed(0))
    drawn = np.bincount([targets[i] for _ in range(20) for i in sampler], minlength=2)
    assert abs(drawn[1] / drawn.sum() - 0.5) < 0.05


def test_balance_and_preview_commands(synthetic, tmp_path, capsys):
    assert run(["balance", "--data", str(synthetic), "--out", str(tmp_path / "b"), "--balance", "add=3",
                "--balance-classes", "b,c", "--balance-format", "jpg"]) == 0
    manifest = pd.read_csv(tmp_path / "b" / "manifest.csv")
    assert _counts(manifest) == {"b": 3, "c": 3} and manifest["path"].str.endswith(".jpg").all()
    assert "5 ->      5" in capsys.readouterr().out
    assert run(["balance", "--data", str(synthetic), "--out", str(tmp_path / "b2"), "--balance", "max",
                "--balance-ops", "invert:0.5"]) == 2
    assert "changes colours" in capsys.readouterr().err
    photo = next(synthetic.rglob("*.png"))
    assert run(["augment-preview", str(photo), "--out", str(tmp_path / "p.png"), "--n", "5", "--rot90", "0.5",
                "--elastic", "20", "--img-size", "32"]) == 0
    assert Image.open(tmp_path / "p.png").size[0] > 400


def test_ablate_smoke(grocery_small, tmp_path):
    from pomona.data.bundle import prepare_data
    from pomona.tools.ablate import AblationSettings, make_imbalanced, run_ablation

    cfg = tiny_config()
    cfg.data.data_dir, cfg.data.val_fraction = str(grocery_small), 0.34
    bundle = prepare_data(cfg.data)
    cut = make_imbalanced(bundle, ["Pink-Lady"], 0.25)
    assert cut.subset("train").groupby("label").size()["Pink-Lady"] == 1
    assert cut.subset("val").equals(bundle.subset("val"))
    result = run_ablation(cfg, tmp_path / "abl", AblationSettings(arms=["none", "augmentor", "sampler"], seeds=1,
                                                                   imbalance=0.25, minority=["Pink-Lady"],
                                                                   n_boot=50))
    rows = {r["arm"]: r for r in result.rows}
    assert rows["augmentor"]["train_images"] > rows["none"]["train_images"] == len(cut.subset("train"))
    assert "delta_ci95" in rows["sampler"] and "Pink-Lady" in rows["none"]["minority_f1"]
    md = (tmp_path / "abl" / "results.md").read_text()
    assert "| augmentor |" in md and "F1 Pink-Lady" in md
    assert json.loads((tmp_path / "abl" / "results.json").read_text())["info"]["minority"] == ["Pink-Lady"]
