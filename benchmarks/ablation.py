"""Benchmark: does class balancing help? `pomona ablate` (the same code) on two real data sets, plus the speed of
Augmentor balancing.

    flock /tmp/pomona-cpu.lock python benchmarks/ablation.py [--only grocery|fruits360|speed] [--seeds N]

1. speed: generate 2,000 images from 348 px grocery photos with the default operations; prints images/s.
2. grocery: ../shared/data/grocery-apples/train split 70/30 (seeded, stratified; its val folder has only 22
   photos and no Red-Delicious), the two smallest training classes cut to 20% of their training images; arms none / augmentor (to the largest class) / class_weights / sampler.
3. fruits360: 8 confusable classes of ../shared/data/fruits360-apples, trained on the first filming pass and
   validated on the last one (every 8th frame of each pass), the two smallest classes cut to 20%.

The recipe is cheap but the same for every arm (the original system's frozen backbone: head-only training of
tf_efficientnet_lite0 with offline ImageNet weights, 5 epochs at 160 px), and each run is scored with its last
epoch.
Tables go to benchmarks/results/ablation-<dataset>.md (and .json next to the runs).
"""

from __future__ import annotations

import argparse
import os
import json
import shutil
import sys
import time
from pathlib import Path

from pomona.config import BalanceConfig, Config, merge
from pomona.core.runtime import reexec_with_malloc_tuning
from pomona.data.balance import balance_table
from pomona.data.index import index_folder
from pomona.tools.ablate import AblationSettings, run_ablation

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
FRUITS = ["Apple Golden 1", "Apple Golden 2", "Apple Golden 3", "Apple Red 1", "Apple Red 2", "Apple Red 3",
          "Apple Red Delicious 1", "Apple Pink Lady 1"]
RECIPE = {"model": {"freeze_backbone": True, "weights": "package", "img_size": 160},
          "train": {"epochs": 5, "optimizer": "adam", "lr": 2e-3, "patience": 0, "tta": False, "batch_size": 16,
                    "crop_scale": 0.6},
          "device": "cpu"}


def speed(out: Path) -> str:
    table = index_folder(SHARED / "grocery-apples" / "train")
    cfg = BalanceConfig(mode="add=2000", classes="Golden-Delicious")
    rows = []
    for fmt in ("png", "jpg"):
        cfg.image_format = fmt
        shutil.rmtree(out / fmt, ignore_errors=True)
        r = balance_table(table, cfg, 0, out / fmt)
        rows.append(f"| {fmt} | {len(r.manifest)} | {r.seconds:.1f} | {r.images_per_s:.0f} |")
    from PIL import Image

    sources = table[table["label"] == "Golden-Delicious"]["path"]
    sizes = sorted({Image.open(p).size for p in sources})
    shown = ", ".join(f"{w}x{h}" for w, h in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = (f"Augmentor balancing speed: 2,000 images generated from the {len(sources)} Golden-Delicious photos "
            f"({shown} px), default operations, one process on this {os.cpu_count()}-core machine (load average "
            f"{load} when it finished).\n\n| format | images | seconds | images/s |\n"
            "|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(text)
    return text


def grocery(out: Path, seeds: int) -> str:
    # the data set's own val folder has 22 photos and none of Red-Delicious: split its train folder instead
    base = merge(Config(), {**RECIPE, "data": {"data_dir": str(SHARED / "grocery-apples" / "train"),
                                               "val_fraction": 0.3}})
    run_ablation(base, out, AblationSettings(seeds=seeds, imbalance=0.2, n_minority=2))
    return (out / "results.md").read_text()


def fruits360(out: Path, seeds: int) -> str:
    subset = out / "data"
    subset.mkdir(parents=True, exist_ok=True)
    for c in FRUITS:
        link = subset / c
        if not link.exists():
            link.symlink_to(SHARED / "fruits360-apples" / "all" / c, target_is_directory=True)
    recipe = merge(Config(), RECIPE)
    recipe.model.img_size = 128
    base = merge(recipe, {"data": {"data_dir": str(subset), "group_by": r"^(r\d?_)?", "holdout": "last",
                                   "train_every_nth": 8}})
    run_ablation(base, out, AblationSettings(seeds=seeds, imbalance=0.2, n_minority=2, val_every_nth=8))
    return (out / "results.md").read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-ablation")
    parser.add_argument("--only", choices=["speed", "grocery", "fruits360"])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    out = Path(args.out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in (["speed", "grocery", "fruits360"] if not args.only else [args.only]):
        start = time.perf_counter()
        if name == "speed":
            text = speed(out / "speed")
        else:
            text = {"grocery": grocery, "fruits360": fruits360}[name](out / name, args.seeds)
        text += f"\nTotal wall time: {time.perf_counter() - start:.0f} s.\n"
        header = f"Command: `flock /tmp/pomona-cpu.lock python benchmarks/ablation.py --only {name}"
        if name == "speed":
            header += "`.\n\n"
        else:
            header += (f" --seeds {args.seeds}`. Recipe (all arms): `{json.dumps(RECIPE)}`"
                       + (" with img_size 128 (the photos are 100 px)" if name == "fruits360" else "") + ".\n\n")
        (RESULTS / f"ablation-{name}.md").write_text(f"# Ablation: {name}\n\n" + header + text)
        print(f"wrote {RESULTS / f'ablation-{name}.md'}", file=sys.stderr)


if __name__ == "__main__":
    reexec_with_malloc_tuning(os.environ)
    main()
