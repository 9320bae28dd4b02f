"""Benchmark: the default recipe on ../shared/data/grocery-apples (train -> val), against the reference baseline.

    python benchmarks/grocery.py [--out runs/bench-grocery] [--config configs/frozen.json ...]

Prints one table: macro-F1 (95% bootstrap CI) on the validation photos of the kept epoch (the last one by
default, so nothing was selected on them: `selected_on` says so per row), the last epoch's macro-F1, accuracy, wall time and training images/s for the frozen-features + logistic-regression reference and for each pomona recipe, with ratios to the
reference, all measured in this one run. Target for the default recipe: macro-F1 >= 0.92 in <= 15 minutes.
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

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery-apples"


def run_recipe(name: str, cfg: Config, out: Path) -> dict:
    start = time.perf_counter()
    result = train_and_evaluate(cfg, out / name, overwrite=True)
    seconds = time.perf_counter() - start
    bundle = prepare_data(cfg.data, cfg.seed)
    metrics, _ = score_table(load_run(out / name, device=cfg.device), bundle.subset("val"))
    train_ips = [h["train_images_per_s"] for h in result.history if not h["backbone_frozen"]] or \
                [h["train_images_per_s"] for h in result.history]
    return {"recipe": name, "macro_f1": metrics["macro_f1"], "last_epoch_f1": result.history[-1]["val_macro_f1"],
            "ci95": f"{metrics['macro_f1_ci95'][0]:.2f}-{metrics['macro_f1_ci95'][1]:.2f}",
            "accuracy": metrics["accuracy"], "seconds": seconds, "train_img_s": sum(train_ips) / len(train_ips),
            "kept_epoch": result.kept_epoch + 1, "selected_on": "val" if cfg.train.keep == "best" else "none"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-grocery")
    parser.add_argument("--config", action="append", default=[], help="extra recipes (config files) to compare")
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args()
    out = Path(args.out)
    base = merge(Config(), {"data": {"data_dir": f"{args.data}/train", "val_data": f"{args.data}/val"}})
    bundle = prepare_data(base.data)

    rows = [{"recipe": "reference: frozen Lite0@224 + logistic regression",
             **frozen_features_baseline(bundle.subset("train"), bundle.subset("val"))}]
    rows.append(run_recipe("default", base, out))
    for path in args.config:
        rows.append(run_recipe(Path(path).stem, merge(base, load_overrides(path)), out))
    print(f"\ngrocery-apples: train {len(bundle.subset('train'))} photos, validate on {len(bundle.subset('val'))}")
    report_against_reference(rows, ["recipe", "macro_f1", "ci95", "last_epoch_f1", "accuracy", "f1_vs_ref",
                                    "seconds", "time_vs_ref", "train_img_s", "kept_epoch", "selected_on"], out)

if __name__ == "__main__":
    reexec_with_malloc_tuning(os.environ)
    main()
