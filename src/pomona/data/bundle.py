"""From settings to a labelled, split table: the data stage of a run (index -> split)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from ..config import DataConfig
from .index import DataLayoutError, index_csv, index_folder
from .split import split_train_val


@dataclass
class DataBundle:
    """The split table (`path, label, group, subset`) and the class names, in index order."""

    table: pd.DataFrame
    classes: list[str]
    grouping: dict | None = None
    """How the `group` column was found, with `--group-by auto` (see `pomona.data.groups.Grouping.summary`)."""

    def subset(self, name: str) -> pd.DataFrame:
        return self.table[self.table["subset"] == name].reset_index(drop=True)

    def targets(self, frame: pd.DataFrame) -> list[int]:
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[label] for label in frame["label"]]

    def drop(self, paths: list[str]) -> "DataBundle":
        return DataBundle(self.table[~self.table["path"].isin(set(paths))].reset_index(drop=True), self.classes,
                          self.grouping)

    def with_absolute_paths(self) -> "DataBundle":
        """The same table with absolute paths (what split.csv stores: usable from any working folder)."""
        return DataBundle(self.table.assign(path=[os.path.abspath(p) for p in self.table["path"]]), self.classes,
                          self.grouping)


def index_data(cfg: DataConfig) -> pd.DataFrame:
    """The training table of the layout `cfg` names (folder-per-class or CSV + image folder)."""
    if cfg.csv:
        if not cfg.images:
            raise DataLayoutError("--csv needs --images, the folder holding the images it names")
        return index_csv(cfg.csv, cfg.images, cfg.id_column, cfg.label_column, cfg.group_by)
    if cfg.data_dir:
        return index_folder(cfg.data_dir, cfg.group_by)
    raise DataLayoutError("no training data: give --data FOLDER (one sub-folder per class) or --csv and --images")


Grouper = Callable[[pd.DataFrame, int], tuple[pd.DataFrame, dict]]
"""(table, groups needed per class) -> the table with near-duplicate groups, and how they were found
(`pomona.training.grouping.auto_grouper`, passed in by the training layer)."""


def group_photos(table: pd.DataFrame, group_by: str | None, grouper: Grouper | None,
                 needed: int = 2) -> tuple[pd.DataFrame, dict | None]:
    """With `--group-by auto`, the table's near-duplicate groups found by `grouper`; other settings keep the groups
    the index gave (a regex, or one photo per group)."""
    if group_by != "auto":
        return table, None
    if grouper is None:
        warnings.warn("--group-by auto needs the photos' features; every photo is its own group here", stacklevel=2)
        return table, None
    return grouper(table, needed)


def prepare_data(cfg: DataConfig, seed: int = 0, grouper: Grouper | None = None) -> DataBundle:
    """Index the training data and split it, or take `cfg.val_data` as the validation set. With
    `cfg.test_fraction`, a stratified, group-aware share of the data is first set aside as subset 'test', which
    training and validation never see. With `--group-by auto` the near-duplicate groups (`grouper`) decide what
    stays together whenever a split is drawn from the data."""
    table = index_data(cfg)
    grouping = None
    if not cfg.val_data or cfg.test_fraction:
        table, grouping = group_photos(table, cfg.group_by, grouper)
    test = table.iloc[:0]
    if cfg.test_fraction:
        if not 0.0 < cfg.test_fraction < 0.5:
            raise DataLayoutError(f"--test-fraction must be in (0, 0.5), not {cfg.test_fraction}")
        marked = split_train_val(table, cfg.test_fraction, seed + 7919, "random")
        table, test = marked[marked["subset"] == "train"].drop(columns="subset"), marked[marked["subset"] == "val"]
        test = test.assign(subset="test")
    if cfg.val_data:
        val = index_folder(cfg.val_data, cfg.group_by)
        overlap = set(Path(p).resolve() for p in table["path"]) & set(Path(p).resolve() for p in val["path"])
        if overlap:
            raise DataLayoutError(f"{len(overlap)} validation image(s) are also training images, e.g. "
                                  f"{sorted(overlap)[0]}")
        table = pd.concat([table.assign(subset="train"), val.assign(subset="val")], ignore_index=True)
    else:
        table = split_train_val(table, cfg.val_fraction, seed, cfg.holdout)
    if cfg.train_every_nth > 1:
        table = thin_training_frames(table, cfg.train_every_nth)
    table = pd.concat([table, test], ignore_index=True)
    classes = sorted(table.loc[table["subset"] == "train", "label"].unique())
    unknown = sorted(set(table.loc[table["subset"].isin(["val", "test"]), "label"]) - set(classes))
    if unknown:
        raise DataLayoutError(f"validation or test classes missing from training: {unknown}")
    if len(classes) < 2:
        raise DataLayoutError(f"need at least two classes to train, found {classes}")
    return DataBundle(table.reset_index(drop=True), classes, grouping)


def thin_training_frames(table: pd.DataFrame, every_nth: int) -> pd.DataFrame:
    """Keep every `every_nth` training image of each group (sorted by path); validation rows are kept whole."""
    train = table[table["subset"] == "train"].sort_values("path")
    keep = train.groupby("group", sort=False).cumcount() % every_nth == 0
    return pd.concat([train[keep], table[table["subset"] != "train"]]).sort_index()


def load_split(path: str | Path, classes: list[str]) -> DataBundle:
    """A split saved by a run (split.csv), e.g. to resume or evaluate it. Paths are absolute; the relative paths
    of older runs are resolved from the working folder when they exist there, else from the run folder or the
    nearest folder above it where they do (where `pomona train` ran). Labels the run does not know are an error."""
    path = Path(path)
    if not path.is_file():
        raise DataLayoutError(f"{path.parent} has no {path.name}: not a pomona run folder, or an incomplete one")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"path", "label", "subset"} - set(table.columns)
    if missing:
        raise DataLayoutError(f"{path} lacks the column(s) {sorted(missing)}: the file is damaged")
    unknown = sorted(set(table["label"]) - set(classes))
    if unknown:
        raise DataLayoutError(f"{path} has labels the run does not know: {unknown} (its classes: {classes})")
    relative = [p for p in table["path"] if not os.path.isabs(p)]
    if relative:  # an older run: find the folder training ran from (the working folder or one above the run)
        run_dir = path.resolve().parent
        base = next((b for b in (Path.cwd(), run_dir, *run_dir.parents) if (b / relative[0]).exists()), Path.cwd())
        table = table.assign(path=[p if os.path.isabs(p) else os.path.abspath(base / p) for p in table["path"]])
    return DataBundle(table, classes)
