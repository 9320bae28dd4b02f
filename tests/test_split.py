import pandas as pd
import pytest

from pomona.config import DataConfig
from pomona.data.bundle import prepare_data
from pomona.data.index import assign_groups
from pomona.data.split import split_train_val


def _table(n_classes=3, passes=("r0_", "r1_", "r2_"), frames=20):
    rows = [(f"C{c}/{p}{i}.jpg", f"C{c}") for c in range(n_classes) for p in passes for i in range(frames)]
    return assign_groups(pd.DataFrame(rows, columns=["path", "label"]).assign(group=""), r"^(r\d?_)?")


def test_no_leakage_and_every_class_validated():
    table = pd.DataFrame({"path": [f"{c}/{i}.jpg" for c in "ABC" for i in range(30)],
                          "label": [c for c in "ABC" for _ in range(30)]})
    table["group"] = table["path"]
    out = split_train_val(table, 0.2, seed=1)
    train, val = set(out.loc[out.subset == "train", "path"]), set(out.loc[out.subset == "val", "path"])
    assert not train & val and len(train | val) == 90
    assert set(out.loc[out.subset == "val", "label"]) == {"A", "B", "C"}
    assert (out.subset == "val").groupby(out.label).sum().tolist() == [6, 6, 6]  # stratified


def test_groups_stay_together_and_split_is_reproducible():
    table = _table()
    a = split_train_val(table, 0.3, seed=7)
    b = split_train_val(table, 0.3, seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert (a.groupby("group")["subset"].nunique() == 1).all()  # a whole filming pass on one side
    assert set(a.loc[a.subset == "val", "label"]) == {"C0", "C1", "C2"}


def test_holdout_last_takes_the_last_pass():
    out = split_train_val(_table(passes=("r0_", "r1_", "r2_")), 0.2, holdout="last")
    assert set(out.loc[out.subset == "val", "group"].str.split("/").str[1]) == {"r2_"}


def test_single_group_class_stays_in_training():
    table = _table(n_classes=2)
    table = pd.concat([table, pd.DataFrame({"path": ["D/x.jpg"], "label": ["D"], "group": ["D/only"]})])
    with pytest.warns(UserWarning, match="single group"):
        out = split_train_val(table, 0.3)
    assert out.loc[out.label == "D", "subset"].tolist() == ["train"]


def test_prepare_data_with_val_folder(grocery_small, grocery_val_small):
    bundle = prepare_data(DataConfig(data_dir=str(grocery_small), val_data=str(grocery_val_small)))
    assert bundle.classes == ["Golden-Delicious", "Granny-Smith", "Pink-Lady"]
    assert (bundle.table.subset == "val").sum() == 6 and (bundle.table.subset == "train").sum() == 18
    with pytest.raises(ValueError, match="also training images"):
        prepare_data(DataConfig(data_dir=str(grocery_small), val_data=str(grocery_small)))
