from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pomona.data.index import DataLayoutError, assign_groups, index_csv, index_folder


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


def test_folder_layout_labels_by_folder(tmp_path):
    _img(tmp_path / "Fuji" / "a.jpg")
    _img(tmp_path / "Fuji" / "b.png")
    _img(tmp_path / "Gala" / "c.jpeg")
    (tmp_path / "Gala" / "notes.txt").write_text("not an image")
    table = index_folder(tmp_path)
    assert list(table.columns) == ["path", "label", "group"]
    assert sorted(table["label"]) == ["Fuji", "Fuji", "Gala"]
    assert all(Path(p).suffix != ".txt" for p in table["path"])
    assert table["group"].tolist() == table["path"].tolist()  # no --group-by: each image its own group


def test_folder_layout_errors(tmp_path):
    with pytest.raises(DataLayoutError, match="not found"):
        index_folder(tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataLayoutError, match="no images"):
        index_folder(tmp_path)


def test_csv_layout_with_and_without_extension_and_custom_columns(tmp_path):
    for name in ["001.jpg", "002.jpg", "003.png"]:
        _img(tmp_path / "imgs" / name)
    pd.DataFrame({"image": ["001", "002.jpg", "003"], "variety": ["Fuji", "Gala", "Fuji"]}).to_csv(
        tmp_path / "train.csv", index=False)
    table = index_csv(tmp_path / "train.csv", tmp_path / "imgs", id_column="image", label_column="variety")
    assert [Path(p).name for p in table["path"]] == ["001.jpg", "002.jpg", "003.png"]
    assert table["label"].tolist() == ["Fuji", "Gala", "Fuji"]


def test_csv_bad_rows_are_named(tmp_path):
    _img(tmp_path / "imgs" / "1.jpg")
    _img(tmp_path / "imgs" / "2.jpg")
    csv = tmp_path / "train.csv"
    csv.write_text("img_id,label\n1,Fuji\nmissing_one,Gala\n2,Gala\n")
    with pytest.raises(DataLayoutError) as e:
        index_csv(csv, tmp_path / "imgs")
    assert "line 3" in str(e.value) and "missing_one" in str(e.value)

    csv.write_text("img_id,label\n1,Fuji\n2,\n")
    with pytest.raises(DataLayoutError, match="without a label") as e:
        index_csv(csv, tmp_path / "imgs")
    assert "line 3" in str(e.value)

    csv.write_text("img_id,label\n1,Fuji\n1,Gala\n")
    with pytest.raises(DataLayoutError, match="repeat an image id"):
        index_csv(csv, tmp_path / "imgs")

    csv.write_text("id,label\n1,Fuji\n")
    with pytest.raises(DataLayoutError, match="no column 'img_id'"):
        index_csv(csv, tmp_path / "imgs")


def test_group_by_regex_groups_within_class():
    table = pd.DataFrame({"path": ["A/r0_1.jpg", "A/r0_2.jpg", "A/r1_1.jpg", "A/3.jpg", "B/r0_1.jpg"],
                          "label": ["A", "A", "A", "A", "B"], "group": ""})
    groups = assign_groups(table, r"^(r\d?_)?")["group"].tolist()
    assert groups == ["A/r0_", "A/r0_", "A/r1_", "A/", "B/r0_"]
