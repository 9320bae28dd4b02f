"""`pomona doctor` and `pomona suggest` on real grocery photos with planted faults: a flipped label is among the top
suspects, a resized and re-compressed copy of a training photo in the test folder is a test leak, a darkened and
a blurred photo are flagged (and no real photo is), the blocked neighbour search gives the groups of
`pomona.data.groups`; suggest picks n photos from n different near-duplicate groups. The page's screenshot is taken in
Chromium."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from conftest import GROCERY, SERVE_CLASSES
from test_browser import _not_blank, browser  # noqa: F401  (the Chromium fixture)

pytest.importorskip("cleanlab", reason="pip install 'pomona[doctor]'")
pytest.importorskip("imagehash", reason="pip install 'pomona[doctor]'")

CLASSES = ["Granny-Smith", "Pink-Lady", "Golden-Delicious"]
PER_CLASS = 12
FLIPPED = 3  # the Granny Smith photo filed under Pink Lady


def _files(split: str, label: str) -> list:
    return sorted((GROCERY / split / label).iterdir())


def _jpeg(img: Image.Image, path, quality: int = 90) -> None:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A small labelled folder (3 classes x 12 real photos) with planted faults, a test folder with a copy of a
    training photo, and `pomona doctor` run once on them."""
    if not GROCERY.is_dir():
        pytest.skip("../shared/data/grocery-apples not present")
    from pomona.cli.commands import run

    root = tmp_path_factory.mktemp("doctor")
    train, test = root / "train", root / "test"
    for label in CLASSES:
        (train / label).mkdir(parents=True)
        for f in _files("train", label)[:PER_CLASS]:
            (train / label / f.name).symlink_to(f)
    flipped = train / "Pink-Lady" / "flipped.jpg"  # a green Granny Smith filed under Pink Lady
    (train / "Granny-Smith" / _files("train", "Granny-Smith")[FLIPPED].name).rename(flipped)
    golden = _files("train", "Golden-Delicious")
    dark, blurred = train / "Golden-Delicious" / "dark.jpg", train / "Golden-Delicious" / "blurred.jpg"
    _jpeg(Image.eval(Image.open(golden[PER_CLASS]).convert("RGB"), lambda v: v // 7), dark)
    _jpeg(Image.open(golden[PER_CLASS + 1]).convert("RGB").filter(ImageFilter.GaussianBlur(5)), blurred)
    original = _files("train", "Granny-Smith")[0]
    img = Image.open(original).convert("RGB")
    for label in SERVE_CLASSES:
        (test / label).mkdir(parents=True)
        for f in _files("val", label)[:2]:
            (test / label / f.name).symlink_to(f)
    copy = test / "Granny-Smith" / "copy.jpg"
    _jpeg(img.resize((img.width * 3 // 5, img.height * 3 // 5)), copy, quality=40)
    out = root / "doctor"
    assert run(["doctor", "--data", str(train), "--test-data", str(test), "--out", str(out), "--device", "cpu",
                "--keep-features"]) == 0
    issues = pd.read_csv(out / "issues.csv", keep_default_na=False)
    return {"train": train, "test": test, "out": out, "issues": issues, "flipped": str(flipped), "dark": str(dark),
            "blurred": str(blurred), "copy": str(copy), "original": str(train / "Granny-Smith" / original.name)}


def test_the_flipped_label_is_among_the_top_suspects(planted):
    suspects = planted["issues"][planted["issues"]["kind"] == "suspect label"]
    top = list(suspects["photo"][:5])
    assert planted["flipped"] in top, suspects[["photo", "suggested_label", "score"]]
    row = suspects[suspects["photo"] == planted["flipped"]].iloc[0]
    assert row["label"] == "Pink-Lady" and row["suggested_label"] == "Granny-Smith"


def test_a_resized_recompressed_copy_in_the_test_folder_is_a_test_leak(planted):
    issues = planted["issues"]
    leaks = issues[issues["kind"] == "test leak"]
    assert list(leaks["photo"]) == [planted["copy"]], leaks
    assert leaks.iloc[0]["other_photo"] == planted["original"] and leaks.iloc[0]["set"] == "test"
    assert issues.iloc[0]["kind"] == "test leak"  # the worst finding comes first
    summary = json.loads((planted["out"] / "summary.json").read_text())
    assert summary["test_leaks"] == 1 and summary["findings"]["test leak"] == 1


def test_the_dark_and_the_blurred_photo_are_flagged_and_no_real_photo_is(planted):
    issues = planted["issues"]
    quality = issues[issues["kind"].isin(["unreadable", "blurred", "too dark", "too bright", "tiny",
                                          "extreme aspect ratio"])]
    assert set(zip(quality["photo"], quality["kind"])) == {(planted["dark"], "too dark"),
                                                          (planted["blurred"], "blurred")}


def test_the_files_agree(planted):
    out = planted["out"]
    summary = json.loads((out / "summary.json").read_text())
    issues = planted["issues"]
    assert {k: int((issues["kind"] == k).sum()) for k in summary["findings"]} == summary["findings"]
    groups = pd.read_csv(out / "groups.csv")
    assert len(groups) == 3 * PER_CLASS + 2 + 5 and set(groups["set"]) == {"data", "test"}
    assert np.load(out / "features.npy").shape[0] == len(groups)
    assert summary["balance"]["per_class"]["Pink-Lady"]["photos"] == PER_CLASS + 1
    page = (out / "report.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= 4 and 'src="http' not in page  # opens offline


def test_the_groups_are_those_of_pomona_groups_and_the_neighbours_are_blocked(planted):
    from pathlib import Path

    from pomona.curation.doctor_checks import neighbours
    from pomona.data.groups import capture_times, cosine_distances, near_duplicate_groups, nearest_distances

    groups = pd.read_csv(planted["out"] / "groups.csv")
    data = (groups["set"] == "data").to_numpy()
    features = np.load(planted["out"] / "features.npy")[data]
    labels, paths = groups["label"][data].to_numpy(dtype=object), list(groups["path"][data])
    expected = near_duplicate_groups(features, labels, [Path(p).name for p in paths], capture_times(paths))
    assert list(groups["group"][data]) == list(expected.groups)
    nb = neighbours(features, labels, k=3, block=7)
    d = cosine_distances(features)
    np.fill_diagonal(d, np.inf)
    assert np.allclose(nb.knn_dist, np.sort(d, 1)[:, :3], atol=1e-5)
    assert np.allclose(nb.other_dist, nearest_distances(features, labels)[1], atol=1e-5)
    assert all(labels[nb.other] != labels)


def test_a_cross_validation_run_s_out_of_fold_probabilities_rank_the_suspects(planted, tmp_path):
    from pomona.curation.doctor import doctor
    from pomona.data.index import index_folder

    table = index_folder(planted["train"])
    classes = sorted(set(table["label"]))
    probs = np.array([[0.9 if c == label else 0.1 / (len(classes) - 1) for c in classes] for label in table["label"]])
    flipped = table.index[table["path"] == planted["flipped"]][0]
    probs[flipped] = [0.9 if c == "Granny-Smith" else 0.05 for c in classes]
    oof = pd.DataFrame({"path": table["path"], "label": table["label"], "predicted": "", "repeat": 0, "fold": 0,
                        **{f"prob_{c}": probs[:, k] for k, c in enumerate(classes)}})
    (tmp_path / "run").mkdir()
    oof.to_csv(tmp_path / "run" / "oof.csv", index=False)
    features = np.load(planted["out"] / "features.npy")[:len(table)]
    result = doctor(table, tmp_path / "out", run=tmp_path / "run", features=features)
    assert list(result.suspects["path"]) == [planted["flipped"]]
    assert "oof.csv" in result.summary["suspects"]["probabilities"]


def test_a_missing_package_is_one_line_with_the_pip_command(tmp_path, monkeypatch, capsys):
    from pomona.cli.commands import run

    monkeypatch.setitem(sys.modules, "cleanlab", None)
    assert run(["doctor", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'pomona[doctor]'" in err
    assert not (tmp_path / "out").exists()


def test_the_page_shows_the_duplicate_pairs_side_by_side(planted, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    browser.get((planted["out"] / "report.html").as_uri())
    pairs = browser.find_elements(By.CSS_SELECTOR, "#leaks .pair")
    assert len(pairs) == 1
    images = pairs[0].find_elements(By.TAG_NAME, "img")
    assert len(images) == 2 and all(browser.execute_script("return arguments[0].complete && "
                                                           "arguments[0].naturalWidth > 0", i) for i in images)
    left, right = (i.rect for i in images)
    assert abs(left["y"] - right["y"]) < 2 and right["x"] > left["x"] + left["width"] - 1  # side by side
    assert "copy.jpg" in pairs[0].text and "Granny-Smith" in pairs[0].text
    assert browser.find_elements(By.CSS_SELECTOR, "#suspects .photo img")
    shot = planted["out"] / "doctor_page.png"
    browser.save_screenshot(str(shot))
    assert _not_blank(shot)


# ---------------------------------------------------------------------------------------------- suggest
def test_choose_next_takes_one_photo_per_group_most_uncertain_first():
    from pomona.curation.suggest import choose_next, uncertainty

    rng = np.random.default_rng(0)
    centres = np.eye(12, 32)  # 12 shelves, 8 shots of the first
    features = np.concatenate([centres[0] + 0.001 * rng.normal(size=(8, 32)), centres[1:]])
    scores = np.concatenate([np.full(8, 0.9), np.linspace(0.8, 0.1, 11)])
    predicted = np.array(["A", "B"] * 9 + ["A"], dtype=object)
    picked, cand, groups = choose_next(scores, features, predicted, 5, cut=0.5)
    assert list(picked) == [0, 8, 9, 10, 11]  # one of the shelf, then the next most uncertain
    assert len(set(groups[:8])) == 1 and len(set(groups)) == 12
    picked, _, _ = choose_next(scores, features, predicted, 14, cut=0.5)
    assert list(picked) == [0, *range(8, 19), 1, 2]  # 12 groups: then the shelf gives a second and a third
    assert uncertainty(np.array([[0.5, 0.5], [1.0, 0.0]]), "margin").tolist() == [1.0, 0.0]
    assert uncertainty(np.array([[0.5, 0.5], [1.0, 0.0]]), "entropy") == pytest.approx([1.0, 0.0])


def test_suggest_picks_n_photos_of_n_groups(apple_run, tmp_path):
    from pomona.cli.commands import run
    from pomona.curation.suggest import suggest

    pool = tmp_path / "pool"
    pool.mkdir()
    for label in [*SERVE_CLASSES, "Golden-Delicious"]:
        for f in _files("train", label)[8:14]:
            (pool / f"{label}_{f.name}").symlink_to(f)
    trained = pd.read_csv(apple_run / "split.csv")["path"].iloc[0]
    (pool / "already_labelled.jpg").symlink_to(trained)
    img = Image.open(_files("train", "Golden-Delicious")[20]).convert("RGB")
    variants = [img, img.resize((200, 200)), img.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                img.crop((10, 10, img.width - 10, img.height - 10))]
    for k, v in enumerate(variants):  # four shots of one shelf
        _jpeg(v, pool / f"shelf_{k}.jpg", quality=70)
    result = suggest(apple_run, pool, tmp_path / "out", n=5, device="cpu")
    picked = result.picked
    assert result.candidates["group"].nunique() >= 5  # enough groups for five photos ...
    assert len(picked) == 5 and picked["group"].nunique() == 5  # ... so five groups
    assert list(picked["rank"]) == list(range(1, 6))
    assert not picked["path"].str.endswith("already_labelled.jpg").any() and len(result.skipped) == 1
    shelf = result.candidates[result.candidates["path"].str.contains("shelf_")]
    assert len(shelf) == 4 and shelf["group"].nunique() == 1  # one group ...
    assert picked["path"].str.contains("shelf_").sum() <= 1  # ... so at most one of them
    assert picked["uncertainty"].is_monotonic_decreasing  # most uncertain first
    assert run(["suggest", "--run", str(apple_run), "--unlabeled", str(pool), "-n", "5", "--out",
                str(tmp_path / "cli"), "--device", "cpu"]) == 0
    assert len(pd.read_csv(tmp_path / "cli" / "suggest.csv")) == 5
    assert (tmp_path / "cli" / "suggest.html").read_text().count("data:image/jpeg;base64,") == 5
