"""Benchmark: how training scales with data size and processes, on ../shared/data/fruits360-apples.

    python benchmarks/scale.py [--sizes 1000 5000 all] [--out runs/bench-scale]

For each data size: one epoch of `pomona train` (filming-pass split, images streamed from disk with the
default decoded-image cache on) in a fresh process; seconds per epoch, training images/s and the peak RSS of
the whole job: the sum over every process of it (under torchrun: the launcher and all ranks), sampled every
0.2 s from /proc. Then the 5k set again under `torchrun --nproc_per_node 2` (gloo, one thread each) against one
process with two threads, in the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))

from common import print_table  # noqa: E402

from pomona.core.runtime import MALLOC_TUNABLES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fruits360-apples" / "all"
TRAIN_ARGS = ["--group-by", r"^(r\d?_)?", "--holdout", "last", "--img-size", "96", "--epochs", "1",
              "--frozen-epochs", "0", "--batch-size", "64", "--patience", "0",
              "--ema-epochs", "0", "--device", "cpu"]


def make_subset(n: int | None, root: Path, seed: int = 0) -> Path:
    """A folder of symlinks holding `n` images drawn evenly from every class (all when n is None)."""
    rng = np.random.default_rng(seed)
    classes = sorted(p for p in DATA.iterdir() if p.is_dir())
    total = sum(len(list(c.iterdir())) for c in classes)
    for c in classes:
        files = sorted(c.iterdir())
        k = len(files) if n is None else max(2, round(n * len(files) / total))
        (root / c.name).mkdir(parents=True)
        for f in sorted(rng.choice(files, size=min(k, len(files)), replace=False)):
            (root / c.name / f.name).symlink_to(f)
    return root


def tree_rss_mib(pid: int) -> float:
    """Resident memory of `pid` and all its descendants together (MiB), from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total / 1024


def run_job(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command: the largest sum over all processes of the job at once."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: nothing blocks while it is polled
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, tree_rss_mib(proc.pid))
            time.sleep(0.2)
        if proc.returncode:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read()[-3000:]}")
    return time.perf_counter() - start, peak


def one_epoch(data: Path, out: Path, processes: int = 1) -> dict:
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES, PYTHONPATH=str(ROOT / "src"))
    if processes > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // processes))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    else:
        cmd = [sys.executable]
    wall, rss = run_job([*cmd, "-m", "pomona", "train", "--data", str(data), "--out", str(out), *TRAIN_ARGS], env)
    h = pd.read_csv(out / "history.csv").iloc[-1]
    split = pd.read_csv(out / "split.csv")
    return {"images": len(split), "train_images": int((split.subset == "train").sum()), "processes": processes,
            "s_per_epoch": float(h["train_seconds"]), "train_img_s": float(h["train_images_per_s"]),
            "val_macro_f1": float(h["val_macro_f1"]), "wall_s": wall, "peak_rss_mib": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1000", "5000", "all"])
    parser.add_argument("--ddp-size", default="5000")
    parser.add_argument("--out", default="runs/bench-scale")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for size in dict.fromkeys([*args.sizes, args.ddp_size]):
            folders[size] = make_subset(None if size == "all" else int(size), Path(tmp) / size)
        for size in args.sizes:
            rows.append({"run": f"{size} images, 1 process", **one_epoch(folders[size], out / f"n{size}")})
            print(rows[-1], flush=True)
        ddp = one_epoch(folders[args.ddp_size], out / f"ddp{args.ddp_size}", processes=2)
        rows.append({"run": f"{args.ddp_size} images, torchrun 2 processes", **ddp})
        if args.ddp_size not in args.sizes:
            rows.append({"run": f"{args.ddp_size} images, 1 process",
                         **one_epoch(folders[args.ddp_size], out / f"n{args.ddp_size}")})
    base = next(r for r in rows if r["run"] == f"{args.ddp_size} images, 1 process")
    small = rows[0]
    for r in rows:
        r["rss_vs_smallest"] = r["peak_rss_mib"] / small["peak_rss_mib"]
        r["img_s_vs_1proc"] = r["train_img_s"] / base["train_img_s"]
    text = print_table(rows, ["run", "images", "train_images", "s_per_epoch", "train_img_s", "img_s_vs_1proc",
                              "peak_rss_mib", "rss_vs_smallest", "val_macro_f1"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
