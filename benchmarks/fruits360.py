"""Benchmark: ../shared/data/fruits360-apples with a filming-pass split (train on the earlier passes of every
class, validate on its last pass), against the frozen-features reference, in one run.

    python benchmarks/fruits360.py [--out runs/bench-fruits360] [--every-nth 3]

A random per-image split would score ~1.0 here and mean nothing: consecutive frames are near-duplicates.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import frozen_features_baseline, report_against_reference  # noqa: E402

from pomona.config import Config, load_overrides, merge  # noqa: E402
from pomona.core.runtime import reexec_with_malloc_tuning  # noqa: E402
from pomona.data.bundle import prepare_data  # noqa: E402
from pomona.inference.loaded import load_run  # noqa: E402
from pomona.inference.predict import score_table  # noqa: E402
from pomona.training.train import train_and_evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fruits360-apples" / "all"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-fruits360")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--every-nth", type=int, default=None, help="thin training frames (default: config's)")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    overrides = load_overrides(ROOT / "configs" / "fruits360.json")
    cfg = merge(merge(Config(), overrides), {"data": {"data_dir": args.data}})
    if args.every_nth:
        cfg.data.train_every_nth = args.every_nth
    if args.epochs:
        cfg.train.epochs = args.epochs
    bundle = prepare_data(cfg.data, cfg.seed)
    train, val = bundle.subset("train"), bundle.subset("val")
    passes = sorted(set(val["group"].str.split("/").str[1]))
    print(f"fruits360-apples: {len(bundle.classes)} classes, train {len(train)} images (earlier passes, every "
          f"{cfg.data.train_every_nth}th frame), validate {len(val)} (last pass of each class: {passes})")
    assert set(train["group"]).isdisjoint(val["group"]), "a filming pass on both sides"

    rows = [{"recipe": "reference: frozen Lite0@224 + logistic regression", **frozen_features_baseline(train, val)}]
    start = time.perf_counter()
    out = Path(args.out)
    result = train_and_evaluate(cfg, out / "pomona", bundle=bundle, overwrite=True)
    seconds = time.perf_counter() - start
    metrics, _ = score_table(load_run(out / "pomona", device=cfg.device), val)
    epochs = [h for h in result.history if not h["backbone_frozen"]] or result.history
    rows.append({"recipe": "pomona default + configs/fruits360.json", "macro_f1": metrics["macro_f1"],
                 "ci95": f"{metrics['macro_f1_ci95'][0]:.2f}-{metrics['macro_f1_ci95'][1]:.2f}",
                 "accuracy": metrics["accuracy"], "seconds": seconds,
                 "s_per_epoch": sum(h["train_seconds"] for h in epochs) / len(epochs),
                 "train_img_s": sum(h["train_images_per_s"] for h in epochs) / len(epochs)})
    report_against_reference(rows, ["recipe", "macro_f1", "ci95", "accuracy", "f1_vs_ref", "seconds", "time_vs_ref",
                                    "s_per_epoch", "train_img_s"], out)

if __name__ == "__main__":
    reexec_with_malloc_tuning(os.environ)
    main()
