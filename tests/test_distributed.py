"""`torchrun --nproc_per_node 2 -m pomona train` on CPU (gloo) matches a single-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
# Full-batch steps on a frozen backbone, no augmentation or dropout: the averaged gradient of two half-batches
# equals the full-batch gradient, so both runs should agree up to float rounding. Balancing (6 -> 8 images a
# class, deterministic) is generated once by rank 0 and read from the cache by rank 1.
ARGS = ["--model", "tf_efficientnet_lite0", "--weights", "package", "--img-size", "64", "--out-features", "32",
        "--dropout", "0", "--freeze-backbone", "--no-augment", "--epochs", "3", "--batch-size", "24", "--lr", "0.003",
        "--balance", "target=8",
        "--schedule", "constant", "--patience", "0", "--device", "cpu", "--no-channels-last"]


def _train(cmd_prefix, grocery_small, grocery_val_small, out):
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    cmd = [*cmd_prefix, "-m", "pomona", "train", "--data", str(grocery_small), "--val-data", str(grocery_val_small),
           "--out", str(out), *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pd.read_csv(out / "history.csv"), proc


def test_two_processes_match_one(grocery_small, grocery_val_small, tmp_path):
    single, _ = _train([sys.executable], grocery_small, grocery_val_small, tmp_path / "single")
    ddp, proc = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                       grocery_small, grocery_val_small, tmp_path / "ddp")
    assert len(ddp) == len(single) == 3
    for col in ["train_loss", "val_loss", "val_macro_f1", "val_accuracy"]:
        assert ddp[col].tolist() == pytest.approx(single[col].tolist(), abs=2e-3), col
    info = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert info["world_size"] == 2
    # rank 0 alone writes and reports: one summary line, one report
    assert proc.stdout.count("validation macro-F1") == 1
    assert (tmp_path / "ddp" / "report.html").is_file()
    split = pd.read_csv(tmp_path / "ddp" / "split.csv")
    assert (split.subset == "train").sum() == 24 and json.loads((tmp_path / "ddp" / "balance.json").read_text())
    assert not list((tmp_path / "ddp").glob(".rank*"))
