"""Turning a data layout into one table of `path, label, group`.

Two layouts are read: folder-per-class (`train/Fuji/1.jpg`) and the competition layout (a CSV of
`img_id,label` plus an image folder). `group` names near-duplicate groups (see `--group-by`); without it
every image is its own group.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import pandas as pd

from ..core.errors import PomonaError
from .images import IMAGE_EXTENSIONS

COLUMNS = ["path", "label", "group"]


class DataLayoutError(PomonaError, ValueError):
    """The data folder or CSV does not have the expected layout; the message names the offending rows."""


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def assign_groups(table: pd.DataFrame, group_by: str | None) -> pd.DataFrame:
    """Fill the `group` column: `label/<regex match>` of the file name, or the path itself without a regex.

    The regex's first capture group is used when it has one, else the whole match; a name it does not match
    forms its own group. Groups never span classes.
    """
    table = table.copy()
    if group_by in (None, "", "none", "auto"):  # 'auto' groups are found later from the photos (training.grouping)
        table["group"] = table["path"]
        return table
    pattern = re.compile(group_by)

    def key(row) -> str:
        name = Path(row.path).name
        m = pattern.search(name)
        if m is None:
            return f"{row.label}/{name}"
        token = m.group(1) if pattern.groups else m.group(0)
        return f"{row.label}/{token or ''}"

    table["group"] = [key(r) for r in table.itertuples()]
    return table


def _label_key(label: str) -> str:
    """Spellings of one label that differ only in case, spaces, '-' or '_' share this key."""
    return re.sub(r"[\s_\-]+", "", label).casefold()


def _spelling_clashes(labels: pd.Series) -> list[list[str]]:
    """Groups of distinct labels that are one label spelled differently (see `_label_key`)."""
    spellings: dict[str, set[str]] = {}
    for label in labels.unique():
        spellings.setdefault(_label_key(label), set()).add(label)
    return [sorted(group) for group in spellings.values() if len(group) > 1]


SPELLING_HELP = "labels that differ only in case, spaces, '-' or '_' would become separate classes"


def _lines(index: pd.Index, limit: int = 10) -> str:
    numbers = [str(i + 2) for i in index[:limit]]
    more = f" and {len(index) - limit} more" if len(index) > limit else ""
    return ("line " if len(index) == 1 else "lines ") + ", ".join(numbers) + more


def index_folder(root: str | Path, group_by: str | None = None) -> pd.DataFrame:
    """Index a folder-per-class layout: every image below `root/<class>/` is labelled `<class>`."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"data folder not found: {root}")
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(class_dir.rglob("*")):
            if _is_image(f):
                rows.append((str(f), class_dir.name))
    if not rows:
        raise DataLayoutError(
            f"no images found in {root}: expected one sub-folder per class holding "
            f"{', '.join(IMAGE_EXTENSIONS)} files")
    labels = pd.Series([label for _, label in rows])
    clashes = _spelling_clashes(labels)
    if clashes:
        counts = labels.value_counts()
        listing = "\n".join("  " + ", ".join(f"{root / label}/ ({counts[label]} images)" for label in group)
                            for group in clashes)
        raise DataLayoutError(f"{root}: class folders named alike; {SPELLING_HELP}:\n{listing}\n"
                              "Rename or merge them so that each variety has one folder.")
    return assign_groups(pd.DataFrame(rows, columns=["path", "label"]).assign(group=""), group_by)[COLUMNS]


def _find_files(images: Path) -> dict[str, Path]:
    """Map both `name.ext` and `name` to the file, for ids given with or without extension."""
    found: dict[str, Path] = {}
    for f in sorted(images.rglob("*")):
        if _is_image(f):
            rel = f.relative_to(images).as_posix()
            found.setdefault(rel, f)
            found.setdefault(rel.rsplit(".", 1)[0], f)
    return found


def _format_rows(rows: pd.DataFrame, limit: int = 10) -> str:
    lines = [f"  line {i + 2}: {dict(r)}" for i, r in rows.head(limit).iterrows()]
    more = len(rows) - limit
    return "\n".join(lines + ([f"  ... and {more} more"] if more > 0 else []))


def read_id_csv(csv: str | Path, id_column: str = "img_id") -> pd.DataFrame:
    """Read a CSV of image ids (a test.csv, or train.csv), checking the id column exists."""
    csv = Path(csv)
    if not csv.is_file():
        raise DataLayoutError(f"CSV not found: {csv}")
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    if id_column not in df.columns:
        raise DataLayoutError(f"{csv}: no column {id_column!r} (columns: {list(df.columns)}); set --id-column")
    return df


def resolve_ids(df: pd.DataFrame, images: str | Path, id_column: str, csv_name: str = "CSV") -> list[str]:
    """Image paths for the ids of `df`, in row order; unknown or empty ids raise, naming their lines."""
    images = Path(images)
    if not images.is_dir():
        raise DataLayoutError(f"image folder not found: {images}")
    files = _find_files(images)
    ids = df[id_column].str.strip()
    missing = df[(ids == "") | ~ids.isin(files.keys())]
    if len(missing):
        raise DataLayoutError(f"{csv_name}: {len(missing)} row(s) name no image in {images}:\n"
                              + _format_rows(missing))
    return [str(files[i]) for i in ids]


def index_csv(csv: str | Path, images: str | Path, id_column: str = "img_id", label_column: str = "label",
              group_by: str | None = None) -> pd.DataFrame:
    """Index the competition layout: `csv` rows of (id, label), ids naming files in `images`."""
    df = read_id_csv(csv, id_column)
    if label_column not in df.columns:
        raise DataLayoutError(f"{csv}: no column {label_column!r} (columns: {list(df.columns)}); "
                              "set --label-column")
    empty = df[df[label_column].str.strip() == ""]
    if len(empty):
        raise DataLayoutError(f"{csv}: {len(empty)} row(s) without a label:\n" + _format_rows(empty))
    dup = df[df[id_column].duplicated(keep=False)]
    if len(dup):
        raise DataLayoutError(f"{csv}: {len(dup)} row(s) repeat an image id:\n" + _format_rows(dup))
    paths = resolve_ids(df, images, id_column, str(csv))
    files = pd.Series([str(Path(p).resolve()) for p in paths], index=df.index)
    same = files[files.duplicated(keep=False)]
    if len(same):
        listing = "\n".join(
            f"  {paths[df.index.get_loc(rows.index[0])]}: "
            + ", ".join(f"line {i + 2} {df.at[i, id_column]!r} ({df.at[i, label_column].strip()})" for i in rows.index)
            for _, rows in list(same.groupby(same, sort=False))[:10])
        raise DataLayoutError(f"{csv}: {len(same)} rows name the same image file (an id with and without its "
                              f"extension, or with spaces, is one photo):\n{listing}")
    labels = df[label_column].str.strip()
    clashes = _spelling_clashes(labels)
    if clashes:
        listing = "\n".join("  " + ", ".join(f"{label!r} ({_lines(labels.index[labels == label])})"
                                             for label in group) for group in clashes)
        raise DataLayoutError(f"{csv}: {SPELLING_HELP}:\n{listing}\nWrite each variety one way.")
    table = pd.DataFrame({"path": paths, "label": labels, "group": ""})
    return assign_groups(table, group_by)[COLUMNS]


def check_readable_classes(table: pd.DataFrame, bad: Mapping[str, str]) -> None:
    """Raise DataLayoutError when every training image of a class is unreadable (`bad`: path -> reason), as the
    class would be trained with no images; the message names the class and its files. Rows whose `subset` is
    not 'train' are ignored."""
    rows = table[table["subset"] == "train"] if "subset" in table.columns else table
    if not len(rows) or not bad:
        return
    unreadable = rows["path"].isin(set(bad)).groupby(rows["label"]).all()
    empty = sorted(unreadable[unreadable].index)
    if not empty:
        return
    parts = []
    for label in empty:
        paths = list(rows.loc[rows["label"] == label, "path"])
        listing = "".join(f"\n    {p}: {bad[p]}" for p in paths[:5])
        more = f"\n    ... and {len(paths) - 5} more" if len(paths) > 5 else ""
        parts.append(f"  {label!r}: all {len(paths)} training image(s) unreadable:{listing}{more}")
    raise DataLayoutError(f"{len(empty)} class(es) would have no training images:\n" + "\n".join(parts))
