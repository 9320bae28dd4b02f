"""Benchmark: does the near-duplicate grouping make cross-validation predict photos of new shelves and passes?

    python benchmarks/yardstick.py [--folds 5] [--every 1] [--run RUN --val-run VALRUN]

Three checks, in one table each:

1. **fruits360, where the truth is known.** Every frame of the 27 classes (or every `--every`th) is grouped by
   `--group-by auto`; the groups are compared with the filming passes (file-name prefix): adjusted Rand index, the
   number of passes spread over two groups, and whether any pass lands in two folds of a group-aware 2-fold split
   (every class has 2 or 3 passes).
   The same without file names (features alone) shows what the name templates add.
2. **grocery, frozen reference.** Frozen Lite0 features + logistic regression: trained on grocery `train`
   and scored on `val` (22 photos of shelves not in train, with the bootstrap CI), against K-fold out-of-fold
   scores on `train` with random folds and with group-aware folds. The group-aware estimate should fall inside the
   val score's CI; the random one overstates.
3. **grocery, a pomona run (optional).** `--run` a `--folds` run on grocery `train` (out-of-fold score over groups),
   `--val-run` a run trained on grocery `train` with `--val-data val` (its eval/metrics.json): the same comparison
   for a real recipe.

Nothing is selected here: the grouping rule has no setting tuned on these photos (its cut is the median distance
of a photo to its nearest photo of another class).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))

from common import print_table  # noqa: E402

from pomona.data.groups import group_table, near_duplicate_groups, split_clumped  # noqa: E402
from pomona.data.index import index_folder  # noqa: E402
from pomona.models.metrics import bootstrap_ci, macro_f1  # noqa: E402
from pomona.training.cv import assign_folds  # noqa: E402
from pomona.training.grouping import compute_grouping_features  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def fruits360_check(every: int, cache: Path | None = None) -> list[dict]:
    """Groups against filming passes, and a 2-fold group-aware split (every class has at least 2 passes; with more
    folds than passes a class must be cut finer than its passes, which `split_clumped` does and says)."""
    from sklearn.metrics import adjusted_rand_score

    folds = 2
    table = index_folder(SHARED / "fruits360-apples" / "all")
    table = table.iloc[::every].reset_index(drop=True) if every > 1 else table
    names = [Path(p).name for p in table["path"]]
    truth = table["label"] + "/" + [re.match(r"^(r\d?_)?", n).group(0) or "-" for n in names]
    start = time.perf_counter()
    if cache and cache.is_file():
        features = np.load(cache)
    else:
        features = compute_grouping_features(list(table["path"]))
        if cache:
            np.save(cache, features)
    feature_s = time.perf_counter() - start
    rows = []
    for how in ("features + file names", "features alone"):
        start = time.perf_counter()
        if how == "features alone":
            labels = table["label"].to_numpy(dtype=object)
            groups = split_clumped(near_duplicate_groups(features, labels), labels, features, folds).groups
        else:
            groups = group_table(table, features, folds)[0]["group"].to_numpy()
        fold = assign_folds(table.assign(group=groups), folds, 0, 0)
        spread = pd.Series(groups).groupby(truth.to_numpy()).nunique()
        rows.append({"fruits360": how, "frames": len(table), "passes": truth.nunique(),
                     "groups": len(set(groups)), "ARI": adjusted_rand_score(truth, groups),
                     "passes in >1 group": int((spread > 1).sum()),
                     "passes in >1 fold": int((pd.Series(fold).groupby(truth.to_numpy()).nunique() > 1).sum()),
                     "seconds": feature_s + time.perf_counter() - start})
    return rows


def grocery_reference(folds: int) -> list[dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = index_folder(SHARED / "grocery-apples" / "train")
    val = index_folder(SHARED / "grocery-apples" / "val")
    features = compute_grouping_features(list(train["path"]) + list(val["path"]))
    x, xv = features[:len(train)], features[len(train):]
    classes = sorted(set(train["label"]))
    y = np.array([classes.index(c) for c in train["label"]])
    yv = np.array([classes.index(c) for c in val["label"]])

    def fit(rows):
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)).fit(x[rows], y[rows])

    pred = fit(np.arange(len(y))).predict(xv)
    lo, hi = bootstrap_ci(yv, pred)
    rows = [{"estimate of the score on new shelves": "train -> val (22 photos of new shelves)",
             "macro_f1": macro_f1(yv, pred), "ci95": f"{lo:.2f}-{hi:.2f}"}]
    grouped, grouping = group_table(train, x, folds)
    fold_sets = {"random folds": list(StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y)),
                 "group-aware folds (auto)": None}
    for name, splits in fold_sets.items():
        scores, cis = [], []
        for seed in range(3):
            if splits is None:
                fold = assign_folds(grouped, folds, seed, 0)
                parts = [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in range(folds)]
            else:
                parts = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y))
            oof = np.empty(len(y), int)
            for tr, te in parts:
                oof[te] = fit(tr).predict(x[te])
            scores.append(macro_f1(y, oof))
            cis.append(bootstrap_ci(y, oof, groups=grouped["group"].to_numpy() if splits is None else None))
        rows.append({"estimate of the score on new shelves": f"{folds}-fold OOF on train, {name}",
                     "macro_f1": float(np.mean(scores)), "ci95": f"{cis[0][0]:.2f}-{cis[0][1]:.2f}",
                     "seeds": " ".join(f"{s:.3f}" for s in scores)})
    rows[-1]["groups"] = grouping.summary()["n_groups"]
    return rows


def grocery_runs(run: Path, val_run: Path) -> list[dict]:
    cv = json.loads((run / "cv.json").read_text())
    val = json.loads((val_run / "eval" / "metrics.json").read_text())
    ci = val.get("macro_f1_ci95") or val.get("macro_f1_ci") or ["", ""]
    return [{"estimate": f"{val_run}: train -> val", "macro_f1": val["macro_f1"],
             "ci95": f"{ci[0]:.2f}-{ci[1]:.2f}" if ci[0] != "" else ""},
            {"estimate": f"{run}: out-of-fold on train ({cv['grouping']['by']} groups)", "macro_f1": cv["oof_macro_f1"],
             "ci95": "{:.2f}-{:.2f}".format(*cv["oof_macro_f1_ci95"])}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--every", type=int, default=1, help="use every Nth fruits360 frame")
    parser.add_argument("--skip-fruits360", action="store_true")
    parser.add_argument("--skip-grocery", action="store_true")
    parser.add_argument("--run", type=Path, help="a --folds run on grocery train")
    parser.add_argument("--val-run", type=Path, help="a run trained on grocery train with --val-data val")
    args = parser.parse_args()
    if not args.skip_grocery:
        rows = grocery_reference(args.folds)
        print_table(rows, list(rows[-1]))
    if args.run and args.val_run:
        runs = grocery_runs(args.run, args.val_run)
        print()
        print_table(runs, list(runs[0]))
    if not args.skip_fruits360:
        print()
        fruits = fruits360_check(args.every, Path("runs") / f"fruits360-grouping-features-{args.every}.npy")
        print_table(fruits, list(fruits[0]))


if __name__ == "__main__":
    main()
