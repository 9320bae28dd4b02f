"""Benchmark: Optuna trials per hour with the frozen-feature fast path vs the original system's way.

    flock /tmp/pomona-cpu.lock python benchmarks/tune.py [--out runs/bench-tune] [--fast-trials 20] [--full-trials 3]

The original system's search (head width 400-800, dropout 0.3-0.5, Adam/RMSprop, learning rate 1e-5..1e-3 log,
plus weight decay and label smoothing here) over a frozen ImageNet Lite0 backbone on ../shared/data/grocery-apples
(train -> val), 4 epochs per trial, MedianPruner + seeded TPE, no tracker. Three studies, measured in this one run:

- fast path: backbone features of every image computed once (ONNX Runtime), heads trained on them;
- original way: every epoch runs the backbone over every image, no on-the-fly augmentation (the original
  system augmented offline, before training), i.e. the same objective as the fast path;
- pomona full path: the same with pomona's default on-the-fly augmentation (what the fast path gives up).

All studies use the same sampler seed, so their first trials draw the same settings; `best_f1_first_n` compares
the best macro-F1 over those shared first trials. trials/hour = 3600 / median seconds of a **complete** trial
(pruned trials stop early and would flatter the path that prunes more; they are counted, not timed); the one-time
set-up (decoding, feature extraction) is listed separately and included in `trials_per_hour_50` (a 50-trial study).
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import print_table  # noqa: E402

from pomona.config import Config, TuneConfig, merge  # noqa: E402
from pomona.core.runtime import reexec_with_malloc_tuning  # noqa: E402
from pomona.tuning.tune import tune  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery-apples"


def run_study(name: str, cfg: Config, trials: int, fast_path: str, out: Path, first_n: int) -> dict:
    start = time.perf_counter()
    study, best = tune(cfg, TuneConfig(trials=trials, study=name, tracker="none", fast_path=fast_path), out / name)
    wall = time.perf_counter() - start
    finished = [t for t in study.trials if t.datetime_complete is not None]
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in finished]
    complete = [(t.datetime_complete - t.datetime_start).total_seconds() for t in finished
                if t.state.name == "COMPLETE"]
    per_trial = statistics.median(complete or seconds)
    setup = wall - sum(seconds)
    first = [t.value for t in finished if t.number < first_n and t.value is not None]
    return {"way": name, "trials": len(finished), "pruned": sum(t.state.name == "PRUNED" for t in finished),
            "timed_complete": len(complete),
            "s_per_trial": per_trial, "setup_s": setup, "trials_per_hour": 3600 / per_trial,
            "trials_per_hour_50": 50 / ((setup + 50 * per_trial) / 3600), "best_f1": best.get("best_val_macro_f1"),
            "best_f1_first_n": max(first) if first else None, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-tune")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--fast-trials", type=int, default=20)
    parser.add_argument("--full-trials", type=int, default=3)
    parser.add_argument("--augmented-trials", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists: the benchmark measures fresh studies; remove it or pass --out")
    base = merge(Config(), {"data": {"data_dir": f"{args.data}/train", "val_data": f"{args.data}/val"},
                            "model": {"name": "tf_efficientnet_lite0", "weights": "package", "freeze_backbone": True},
                            "train": {"epochs": 4}})
    plain = merge(base, {"train": {"augment": False}})
    first_n = args.full_trials
    rows = [run_study("fast path (cached features)", plain, args.fast_trials, "on", out, first_n),
            run_study("original way (backbone every epoch)", plain, args.full_trials, "off", out, first_n)]
    if args.augmented_trials:
        rows.append(run_study("pomona full path + augmentation", base, args.augmented_trials, "off", out, first_n))
    ref = rows[1]
    for r in rows:
        r["speedup"] = r["trials_per_hour"] / ref["trials_per_hour"]
        r["speedup_50"] = r["trials_per_hour_50"] / ref["trials_per_hour_50"]
    from pomona.data.preprocessing import resolve_preprocessing

    size = resolve_preprocessing(base.model.name, base.model.img_size).input_size
    print(f"\ngrocery-apples, frozen {base.model.name} @{size} px, {base.train.epochs} epochs per trial, "
          f"best F1 over the first {first_n} (shared) trials in best_f1_first_n")
    text = print_table(rows, ["way", "trials", "pruned", "timed_complete", "s_per_trial", "setup_s", "trials_per_hour",
                              "trials_per_hour_50", "speedup", "speedup_50", "best_f1", "best_f1_first_n"])
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    reexec_with_malloc_tuning(os.environ)
    main()
