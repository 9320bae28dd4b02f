"""Near-duplicate groups (`--group-by auto`): the cues, the data-chosen cut, and the recovery of fruits360's filming
passes from real frames."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pomona.data.groups import (capture_times, choose_threshold, cosine_distances, cross_set_duplicates, name_templates,
                                near_duplicate_groups, split_clumped)
from pomona.training.grouping import check_unlabeled_against_test

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_name_templates_separate_passes_and_keep_one_sequence_per_camera():
    names = [f"r{p}_{i}_100.jpg" for p in range(3) for i in range(40)] + [f"{i}_100.jpg" for i in range(40)]
    templates, positions = name_templates(names)
    assert len(set(templates)) == 4  # r0_, r1_, r2_ and no prefix
    assert positions[:3] == [0, 1, 2]
    shop = [f"Pink-Lady_{i:03d}.jpg" for i in range(1, 60)]
    assert len(set(name_templates(shop)[0])) == 1


def _blobs(rng, centres: int, per: int, spread: float, dim: int = 64) -> np.ndarray:
    c = rng.normal(size=(centres, dim))
    return np.concatenate([c[k] + spread * rng.normal(size=(per, dim)) for k in range(centres)])


def test_groups_are_near_duplicates_within_a_class_and_never_span_classes():
    rng = np.random.default_rng(0)
    # two classes, each photographed in 4 sessions of 6 near-identical shots
    a, b = _blobs(rng, 4, 6, 0.05), _blobs(rng, 4, 6, 0.05)
    features = np.concatenate([a, b])
    labels = np.array(["A"] * 24 + ["B"] * 24, dtype=object)
    g = near_duplicate_groups(features, labels)
    assert len(set(g.groups)) == 8
    for grp in set(g.groups):
        assert len(set(labels[g.groups == grp])) == 1
    truth = np.repeat(np.arange(8), 6)
    assert all(len(set(truth[g.groups == grp])) == 1 for grp in set(g.groups))


def test_the_cut_is_the_median_distance_to_another_class():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(30, 8))
    labels = np.array(["A", "B", "C"] * 10, dtype=object)
    d = cosine_distances(features)
    np.fill_diagonal(d, np.inf)
    other = np.where(labels[:, None] != labels[None, :], d, np.inf).min(1)
    assert choose_threshold(features, labels) == pytest.approx(np.median(other), rel=1e-5)


def test_a_clumped_class_is_cut_finer_with_a_warning_that_says_what_to_do():
    rng = np.random.default_rng(2)
    features = np.concatenate([_blobs(rng, 5, 4, 0.02), _blobs(rng, 1, 12, 0.02)])
    labels = np.array(["A"] * 20 + ["B"] * 12, dtype=object)
    g = split_clumped(near_duplicate_groups(features, labels), labels, features, needed=3)
    assert "B" in g.forced
    assert all(len(set(g.groups[labels == c])) >= 3 for c in "AB")
    warning = g.warnings[g.forced.index("B")]
    assert "--folds" in warning and warning.startswith("B:")


def test_exif_capture_time_joins_a_session(tmp_path):
    paths = []
    for i, (minute, colour) in enumerate([(0, "red"), (1, "green"), (2, "blue"), (30, "yellow"), (31, "white")]):
        img = Image.new("RGB", (32, 32), colour)
        exif = Image.Exif()
        exif.get_ifd(0x8769)[36867] = f"2026:05:01 10:{minute:02d}:00"
        path = tmp_path / f"photo{i}.jpg"
        img.save(path, exif=exif)
        paths.append(str(path))
    times = capture_times(paths + [str(tmp_path / "missing.jpg")])
    assert np.isnan(times[-1]) and times[1] - times[0] == 60
    features = np.eye(5)  # every photo looks different: only time can join them
    g = near_duplicate_groups(features, np.array(["A"] * 5, dtype=object), times=times[:5], threshold=0.5)
    assert len(set(g.groups[:3])) == 1 and len(set(g.groups[3:])) == 1 and g.groups[0] != g.groups[3]
    assert "EXIF" in g.method


def test_cross_set_duplicates_find_copies_only():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(20, 16))
    b = np.concatenate([a[:3] + 0.001 * rng.normal(size=(3, 16)), rng.normal(size=(10, 16))])
    found = cross_set_duplicates(b, a, cut=0.5)
    assert sorted((i, j) for i, j, _ in found) == [(0, 0), (1, 1), (2, 2)]


def _fruits_frames(classes: list[str], every: int) -> pd.DataFrame:
    root = SHARED / "fruits360-apples" / "all"
    rows = []
    for c in classes:
        files = sorted((root / c).glob("*.jpg"), key=lambda p: (re.sub(r"\d+_100", "", p.name), len(p.name), p.name))
        for i, f in enumerate(files):
            if i % every == 0:
                rows.append((str(f), c, c + "/" + (re.match(r"^(r\d?_)?", f.name).group(0) or "-")))
    return pd.DataFrame(rows, columns=["path", "label", "truth"])


@pytest.mark.slow
def test_auto_groups_recover_the_filming_passes_of_fruits360_frames():
    """Real frames of 4 classes (every 8th; 2-3 passes each): the groups are the passes (adjusted Rand index >= 0.9)
    and no pass is spread over two folds."""
    from sklearn.metrics import adjusted_rand_score

    from pomona.data.groups import group_table
    from pomona.training.cv import assign_folds
    from pomona.training.grouping import compute_grouping_features

    table = _fruits_frames(["Apple 10", "Apple 11", "Apple Golden 1", "Apple Red Yellow 2"], every=8)
    grouped, grouping = group_table(table, compute_grouping_features(list(table["path"])), needed=2)
    assert adjusted_rand_score(table["truth"], grouped["group"]) >= 0.9, grouping.summary()
    fold = assign_folds(grouped, 2, 0, 0)
    assert (pd.Series(fold).groupby(table["truth"].to_numpy()).nunique() == 1).all()


def test_unlabelled_near_duplicates_of_test_photos_are_refused(tmp_path):
    from pomona.core.errors import PomonaError

    val = SHARED / "grocery-apples" / "val"
    test = pd.DataFrame([(str(p), p.parent.name) for c in ("Granny-Smith", "Royal-Gala")
                         for p in sorted((val / c).glob("*.jpg"))[:3]], columns=["path", "label"])
    pool = tmp_path / "pool"
    pool.mkdir()
    Image.open(test["path"][0]).resize((300, 300)).save(pool / "copy.jpg", quality=70)  # a re-compressed copy
    train = SHARED / "grocery-apples" / "train" / "Pink-Lady"
    for p in sorted(train.glob("*.jpg"))[:3]:
        Image.open(p).save(pool / p.name)
    with pytest.raises(PomonaError, match="near-duplicate"):
        check_unlabeled_against_test(test, sorted(str(p) for p in pool.glob("*.jpg")))
    (pool / "copy.jpg").unlink()
    check_unlabeled_against_test(test, sorted(str(p) for p in pool.glob("*.jpg")))  # new photos pass


def test_the_report_shows_the_groups_with_example_thumbnails(tmp_path):
    from pomona.config import Config
    from pomona.data.groups import describe_given_groups, write_groups
    from pomona.reporting.report import build_report

    photos = sorted((SHARED / "grocery-apples" / "train" / "Granny-Smith").glob("*.jpg"))[:6]
    table = pd.DataFrame({"path": [str(p) for p in photos], "label": "Granny-Smith",
                          "group": ["Granny-Smith/g0"] * 4 + ["Granny-Smith/g1", "Granny-Smith/g2"]})
    Config().save(tmp_path / "config.json")
    summary = {"by": "auto", "method": "average linkage (test)", "n_groups": 3, "warnings": ["Granny-Smith: clumped"]}
    write_groups(tmp_path, table, summary, Config().data)
    page = build_report(tmp_path).read_text()
    section = page[page.index('<section id="groups">'):]
    section = section[:section.index("</section>")]
    assert "3 groups, by <b>auto</b>" in section and "Warning: Granny-Smith: clumped" in section
    assert section.count("<img") == 4  # the one group of more than one photo, as thumbnails
    assert describe_given_groups(table, Config().data)["by"] == "auto"
