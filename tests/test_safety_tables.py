"""Bad tables are errors naming the rows (issue "Safe with untrusted files and clients", point 7): one photo under
two ids, one variety under two spellings, a class whose photos are all unreadable."""

from pathlib import Path

import pandas as pd
import pytest

from pomona.data.index import DataLayoutError, check_readable_classes, index_csv, index_folder
from pomona.training.train import train_and_evaluate

from conftest import GROCERY, requires_grocery, tiny_config


def _photos(tmp_path: Path, n: int = 3) -> Path:
    """A competition image folder of real grocery photos (symlinks) named img_0000.jpg, img_0001.jpg, ..."""
    images = tmp_path / "imgs"
    images.mkdir()
    for i, src in enumerate(sorted((GROCERY / "train" / "Royal-Gala").iterdir())[:n]):
        (images / f"img_{i:04d}.jpg").symlink_to(src)
    return images


@requires_grocery
@pytest.mark.parametrize("alias", ["img_0000.jpg", " img_0000", "img_0000 ", " img_0000.jpg "])
def test_one_photo_under_two_ids_is_an_error_naming_both_rows(tmp_path, alias):
    images = _photos(tmp_path)
    csv = tmp_path / "train.csv"
    pd.DataFrame({"img_id": ["img_0000", "img_0001", alias], "label": ["Fuji", "Gala", "Gala"]}).to_csv(
        csv, index=False)
    with pytest.raises(DataLayoutError, match="name the same image file") as e:
        index_csv(csv, images)
    message = str(e.value)
    assert "line 2 'img_0000' (Fuji)" in message and f"line 4 {alias!r} (Gala)" in message
    assert "img_0000.jpg" in message and "line 3" not in message


@requires_grocery
def test_labels_spelled_two_ways_are_an_error_naming_the_rows(tmp_path):
    images = _photos(tmp_path)
    csv = tmp_path / "train.csv"
    for spelling in ["pink-lady", "Pink_Lady", "Pink Lady", "PINK-LADY"]:
        csv.write_text(f"img_id,label\nimg_0000,Pink-Lady\nimg_0001,Fuji\nimg_0002,{spelling}\n")
        with pytest.raises(DataLayoutError, match="differ only in case, spaces") as e:
            index_csv(csv, images)
        assert "'Pink-Lady' (line 2)" in str(e.value) and f"{spelling!r} (line 4)" in str(e.value)
        assert "Fuji" not in str(e.value)
    csv.write_text("img_id,label\nimg_0000,Pink-Lady\nimg_0001,Fuji\nimg_0002, Pink-Lady\n")  # spaces around: one label
    assert index_csv(csv, images)["label"].tolist() == ["Pink-Lady", "Fuji", "Pink-Lady"]


@requires_grocery
def test_class_folders_spelled_two_ways_are_an_error(tmp_path):
    for folder, variety in [("Pink-Lady", "Pink-Lady"), ("pink-lady", "Pink-Lady"), ("Royal-Gala", "Royal-Gala")]:
        (tmp_path / folder).mkdir()
        for src in sorted((GROCERY / "train" / variety).iterdir())[:2]:
            (tmp_path / folder / src.name).symlink_to(src)
    with pytest.raises(DataLayoutError, match="class folders named alike") as e:
        index_folder(tmp_path)
    assert f"{tmp_path / 'Pink-Lady'}/ (2 images)" in str(e.value) and f"{tmp_path / 'pink-lady'}/" in str(e.value)


def test_check_readable_classes_names_the_class_and_its_files():
    table = pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "label": ["Fuji", "Fuji", "Gala", "Gala"],
                          "subset": ["train", "train", "train", "val"]})
    check_readable_classes(table, {"a.jpg": "empty file (0 bytes)", "d.jpg": "not an image"})  # fine: Fuji has b
    with pytest.raises(DataLayoutError, match="no training images") as e:
        check_readable_classes(table, {"a.jpg": "empty file (0 bytes)", "b.jpg": "not an image"})
    assert "'Fuji': all 2 training image(s) unreadable" in str(e.value)
    assert "a.jpg: empty file (0 bytes)" in str(e.value) and "b.jpg: not an image" in str(e.value)


@requires_grocery
def test_training_stops_when_a_class_has_only_unreadable_photos(tmp_path):
    data = tmp_path / "data"
    for variety in ["Royal-Gala", "Granny-Smith"]:
        (data / variety).mkdir(parents=True)
        for src in sorted((GROCERY / "train" / variety).iterdir())[:6]:
            (data / variety / src.name).symlink_to(src)
    (data / "Braeburn").mkdir()
    (data / "Braeburn" / "empty.jpg").write_bytes(b"")
    (data / "Braeburn" / "text.jpg").write_text("img_id,label\n")
    val = tmp_path / "val"
    for variety in ["Royal-Gala", "Granny-Smith"]:
        (val / variety).mkdir(parents=True)
        (val / variety / "v.jpg").symlink_to(sorted((GROCERY / "val" / variety).iterdir())[0])
    cfg = tiny_config()
    cfg.data.data_dir, cfg.data.val_data = str(data), str(val)
    cfg.data.max_bad_fraction = 0.5  # two bad photos in fourteen are allowed: the class check must still stop it
    with pytest.raises(DataLayoutError, match="'Braeburn': all 2 training image") as e:
        train_and_evaluate(cfg, tmp_path / "run")
    assert "empty.jpg: empty file" in str(e.value) and "text.jpg: not an image" in str(e.value)
