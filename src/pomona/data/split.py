"""Seeded, stratified, group-aware train/validation split: a validation image never appears in training."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd


def split_train_val(table: pd.DataFrame, val_fraction: float = 0.2, seed: int = 0,
                    holdout: str = "random") -> pd.DataFrame:
    """Return `table` with a `subset` column, 'train' or 'val'.

    Whole groups go to one side (see `index.assign_groups`); within each class, groups are drawn in a seeded
    order until at least `val_fraction` of the class's images are held out, always leaving one group for
    training. `holdout='last'` holds out the groups that sort last instead (e.g. the last filming pass).
    A class with a single group stays entirely in training, with a warning.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if holdout not in ("random", "last"):
        raise ValueError(f"holdout must be 'random' or 'last', got {holdout!r}")
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    lonely = []
    for label in sorted(table["label"].unique()):
        sizes = table.loc[table["label"] == label].groupby("group").size().sort_index()
        if len(sizes) < 2:
            lonely.append(label)
            continue
        order = list(sizes.index[::-1]) if holdout == "last" else list(sizes.index[rng.permutation(len(sizes))])
        need, taken = val_fraction * sizes.sum(), 0
        for g in order[:-1]:
            val_groups.add(g)
            taken += sizes[g]
            if taken >= need:
                break
    if lonely:
        warnings.warn(f"classes with a single group stay in training only: {lonely}", stacklevel=2)
    out = table.copy()
    out["subset"] = np.where(out["group"].isin(val_groups), "val", "train")
    return out
