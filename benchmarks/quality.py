"""Benchmark: recipe quality in-domain (cross-validated) and on photos from another source, in one run.

    python benchmarks/quality.py [--recipes default,frozen,...] [--folds 5] [--out runs/bench-quality]

For every recipe: `pomona train --folds K` over all 300 grocery-apples photos (train + val) gives the out-of-fold
macro-F1 (each photo predicted by the fold model that never saw it; bootstrap 95% CI over photos) and the
calibration (ECE before/after the temperature fitted on the out-of-fold predictions, cross-fitted). The K fold
models' ensemble (the run itself) and each fold model alone then predict **fruits360-apples frames of the same
four varieties** (Apple Golden 1-3 -> Golden-Delicious, Granny Smith 1, Pink Lady 1, Red Delicious 1; every 10th
frame: 388 turntable photos on white, a source the models never saw). Macro-F1 there counts a predicted
Royal-Gala (a class with no photo there) against the score. Caveat: those 388 frames show only 6 physical apples,
so the transfer CI over frames is far too narrow as a statement about apples in general.

The first row is the reference: frozen ImageNet Lite0 features at 224 px + logistic regression, on the same folds
and the same transfer set. Nothing is selected on the scored photos: every recipe keeps its last epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).parent))

from common import frozen_features_cv, print_table  # noqa: E402

from pomona.checkpoint import load_run  # noqa: E402
from pomona.config import Config, load_overrides, merge  # noqa: E402
from pomona.cv import train_folds  # noqa: E402
from pomona.metrics import bootstrap_ci, macro_f1  # noqa: E402
from pomona.runtime import reexec_with_malloc_tuning  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FRUITS360_4 = {"Apple Golden 1": "Golden-Delicious", "Apple Golden 2": "Golden-Delicious",
               "Apple Golden 3": "Golden-Delicious", "Apple Granny Smith 1": "Granny-Smith",
               "Apple Pink Lady 1": "Pink-Lady", "Apple Red Delicious 1": "Red-Delicious"}

# Each recipe: overrides of the default Config. "previous default" is the recipe this project shipped before
# (fine-tuning with batch-norm statistics re-estimated, crops of >= 35% of the photo, no probe, EMA), at 224 px
# like the others.
RECIPES = {
    "default": {},
    "previous default (224 px)": {"train": {"freeze_bn": False, "crop_scale": 0.35, "head_init": "random",
                                            "frozen_epochs": 2, "ema_epochs": 2.0}},
    "default - frozen BN statistics": {"train": {"freeze_bn": False}},
    "default - small crops (0.35)": {"train": {"crop_scale": 0.35}},
    "default with crops 0.02": {"train": {"crop_scale": 0.02}},
    "default - probe head init": {"train": {"head_init": "random"}},
    "default + photometric": {"train": {"photometric": 0.8, "blur": 0.2, "jpeg": 0.2, "noise": 0.2}},
    "default + WiSE-FT 0.5": {"train": {"wise_alpha": 0.5}},
    "default + multi-view TTA": {"train": {"tta": ["identity", "hflip", "vflip", "rot90", "rot270"]}},
    "default's models + WiSE-FT 0.5": "@rescore",
    "default's models + multi-view TTA": "@rescore",
    "default 320 px": {"model": {"img_size": 320}},
    "frozen (configs/frozen.json)": "configs/frozen.json",
    "default + self-training (fruits360 pool)": {"data": {"unlabeled": "@fruits360-pool"}},
}
"""`@fruits360-pool`: unlabelled fruits360 frames of the four varieties, every 10th frame from the 6th on, so none
is a transfer frame; they show the same 6 apples as the transfer set, so a transfer gain there is what unlabelled
photos of the target source give (the competition case: the test photos come unlabelled), not a gain on new
apples. No grocery photo is in the pool: the scored folds' photos never are."""


MULTI_VIEW = ["identity", "hflip", "vflip", "rot90", "rot270"]


def rescore(name: str, default_dir: Path, folds: int, transfer: pd.DataFrame, device: str) -> dict:
    """A row from the default recipe's own fold models, changed only at inference: "+ multi-view TTA" predicts
    with 5 views instead of the identity and its flip; "+ WiSE-FT 0.5" averages each fold model's weights with its
    linear probe's (probe.safetensors) before predicting. Out-of-fold and transfer scores as for a trained row."""
    from pomona.checkpoint import PROBE_WEIGHTS, load_weights
    from pomona.train import interpolate_weights

    if not (default_dir / "folds.csv").is_file():
        raise SystemExit(f"{name!r} re-scores the models of the 'default' row: run that row first (into {default_dir})")
    folds_table = pd.read_csv(default_dir / "folds.csv")
    folds_table = folds_table[folds_table["repeat"] == 0]
    tta = MULTI_VIEW if "TTA" in name else None

    def load(member: Path):
        run = load_run(member, device=device, engine="torch", tta=tta)
        if "WiSE" in name:
            model = run.models[0]
            model.load_state_dict(interpolate_weights(load_weights(member / PROBE_WEIGHTS), model.state_dict(), 0.5))
        return run

    members = [default_dir / "folds" / f"0-{k}" for k in range(folds)]
    runs = [load(m) for m in members]
    classes = runs[0].classes
    index = {c: i for i, c in enumerate(classes)}
    y_oof, p_oof = [], []
    for k, run in enumerate(runs):
        held = folds_table[folds_table["fold"] == k]
        p_oof.append(run.predict(held["path"]).probs.argmax(1))
        y_oof += [index[c] for c in held["label"]]
    y_oof, p_oof = np.array(y_oof), np.concatenate(p_oof)
    lo, hi = bootstrap_ci(y_oof, p_oof)
    y = np.array([index[c] for c in transfer["label"]])
    probs = [run.predict(transfer["path"]).probs for run in runs]
    pred = np.mean(probs, axis=0).argmax(1)
    tlo, thi = bootstrap_ci(y, pred)
    return {"recipe": name, "oof_f1": macro_f1(y_oof, p_oof), "oof_ci": f"{lo:.2f}-{hi:.2f}",
            "transfer_f1": macro_f1(y, pred), "transfer_ci": f"{tlo:.2f}-{thi:.2f}",
            "transfer_single": float(np.mean([macro_f1(y, p.argmax(1)) for p in probs]))}


def fruits360_pool(out: Path, every: int = 10, offset: int = 5) -> Path:
    """A folder of symlinks to the unlabelled pool frames (flat, no labels)."""
    pool = out / "fruits360-pool"
    pool.mkdir(parents=True, exist_ok=True)
    for folder in FRUITS360_4:
        for p in sorted((SHARED / "fruits360-apples" / "all" / folder).glob("*.jpg"))[offset::every]:
            link = pool / f"{folder.replace(' ', '_')}_{p.name}"
            if not link.exists():
                link.symlink_to(p)
    return pool


def fruits360_four(every: int = 10) -> pd.DataFrame:
    rows = []
    for folder, label in FRUITS360_4.items():
        paths = sorted((SHARED / "fruits360-apples" / "all" / folder).glob("*.jpg"))
        rows += [(str(p), label, folder) for p in paths[::every]]
    return pd.DataFrame(rows, columns=["path", "label", "apple"])


def present_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Macro-F1 over the varieties the transfer frames show (a predicted Royal-Gala still costs the true class its
    recall, but Royal-Gala itself, with no frame, is not averaged in as a fifth class with F1 0)."""
    return float(f1_score(y, pred, labels=sorted(set(y)), average="macro", zero_division=0))


def transfer_scores(run_dir: Path, members: list[Path], table: pd.DataFrame, device: str) -> dict:
    """Macro-F1 (and CI over frames) of the ensemble, the same over the four varieties present, and the mean of
    the fold models alone."""
    classes = load_run(run_dir, device=device).classes
    y = np.array([classes.index(c) for c in table["label"]])
    probs = load_run(run_dir, device=device, engine="torch").predict(table["path"]).probs
    pred = probs.argmax(1)
    single = [macro_f1(y, load_run(m, device=device, engine="torch").predict(table["path"]).probs.argmax(1))
              for m in members]
    lo, hi = bootstrap_ci(y, pred)
    return {"transfer_f1": macro_f1(y, pred), "transfer_ci": f"{lo:.2f}-{hi:.2f}",
            "transfer_f1_present": present_f1(y, pred), "transfer_single": float(np.mean(single))}


def score_run(run_dir: Path, folds: int) -> None:
    """Transfer scores of a finished run beside the reference's, with the confusion over the fruits360 folders."""
    from pomona.cv import assign_folds, labelled_table

    grocery = SHARED / "grocery-apples"
    base = merge(Config(), {"data": {"data_dir": str(grocery / "train"), "val_data": str(grocery / "val")}})
    transfer = fruits360_four()
    table = labelled_table(base)
    ref = frozen_features_cv(table, assign_folds(table, folds, 0, base.seed), transfer)
    run = load_run(run_dir, device="cpu", engine="torch")
    y = np.array([run.classes.index(c) for c in transfer["label"]])
    pred = run.predict(transfer["path"]).probs.argmax(1)
    rows = [{"model": "reference: frozen Lite0@224 + logistic regression", **{k: ref[k] for k in
             ("transfer_f1", "transfer_f1_present")}},
            {"model": str(run_dir), "transfer_f1": macro_f1(y, pred), "transfer_f1_present": present_f1(y, pred),
             **dict(zip(run.classes, f1_score(y, pred, labels=range(len(run.classes)), average=None,
                                              zero_division=0)))}]
    print_table(rows, ["model", "transfer_f1", "transfer_f1_present", *run.classes])
    print(pd.crosstab(transfer["apple"], np.asarray(run.classes)[pred]).to_string())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-quality")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names of RECIPES")
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    parser.add_argument("--score-run", help="only score this finished --folds run (and the reference) on the "
                                            "transfer frames, both ways of averaging, per variety")
    args = parser.parse_args()
    if args.score_run:
        return score_run(Path(args.score_run), args.folds)
    out = Path(args.out)
    grocery = SHARED / "grocery-apples"
    base = merge(Config(), {"data": {"data_dir": str(grocery / "train"), "val_data": str(grocery / "val")}})
    transfer = fruits360_four()
    rows = []
    for name in ["reference"] + [r for r in args.recipes.split(",") if r]:
        start = time.perf_counter()
        if name == "reference":
            from pomona.cv import assign_folds, labelled_table

            table = labelled_table(base)
            fold = assign_folds(table, args.folds, 0, base.seed)
            ref = frozen_features_cv(table, fold, transfer)
            rows.append({"recipe": "reference: frozen Lite0@224 + logistic regression", **ref,
                         "seconds": time.perf_counter() - start})
            print_table(rows[-1:], list(rows[-1]))
            continue
        spec = RECIPES[name]
        if spec == "@rescore":
            rows.append({**rescore(name, out / "default", args.folds, transfer, base.device),
                         "seconds": time.perf_counter() - start})
            print_table(rows[-1:], list(rows[-1]))
            continue
        cfg = merge(base, load_overrides(ROOT / spec) if isinstance(spec, str) else spec)
        if cfg.data.unlabeled == "@fruits360-pool":
            cfg.data.unlabeled = str(fruits360_pool(out))
        if args.epochs:
            cfg.train.epochs = args.epochs
        run_dir = out / name.replace(" ", "_").replace("(", "").replace(")", "").replace("/", "-")
        result = train_folds(cfg, run_dir, args.folds)
        seconds = time.perf_counter() - start
        cv = result.cv
        members = [run_dir / "folds" / f"0-{k}" for k in range(args.folds)]
        rows.append({"recipe": name, "oof_f1": cv["oof_macro_f1"],
                     "oof_ci": f"{cv['oof_macro_f1_ci95'][0]:.2f}-{cv['oof_macro_f1_ci95'][1]:.2f}",
                     **transfer_scores(run_dir, members, transfer, cfg.device),
                     "ece_before": cv["ece_before"], "ece_after": cv["ece_after"], "seconds": seconds})
        print_table(rows[-1:], list(rows[-1]))
    columns = ["recipe", "oof_f1", "oof_ci", "transfer_f1", "transfer_ci", "transfer_f1_present", "transfer_single",
               "ece_before", "ece_after", "seconds"]
    print(f"\ngrocery-apples: {args.folds}-fold CV over all 300 photos; transfer: {len(transfer)} fruits360 frames "
          f"of 4 varieties (6 apples); ensemble = the {args.folds} fold models averaged")
    text = print_table(rows, columns)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    reexec_with_malloc_tuning(os.environ)
    main()
