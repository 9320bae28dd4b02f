"""`make demo`'s script (scripts/demo.sh) on the shared grocery photos, as a newcomer runs it, with tiny settings
passed through to `pomona train` (a tiny random-init model at 64 px, one epoch: well under a minute; the real demo
trains the default recipe): it prints the training plan and the evaluation table once, a few right and wrong
answers, and names the report it wrote."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GROCERY, requires_grocery

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--model", "test_efficientnet", "--weights", "none", "--img-size", "64", "--out-features", "16",
         "--epochs", "1", "--probe-epochs", "1", "--batch-size", "32", "--device", "cpu"]


@pytest.mark.slow
@requires_grocery
def test_demo_script_prints_one_evaluation_and_names_the_report(tmp_path):
    bin_dir = tmp_path / "bin"  # `pomona` and `python` as this interpreter, whether or not the package is installed
    bin_dir.mkdir()
    for name, command in [("pomona", f'"{sys.executable}" -m pomona'), ("python", f'"{sys.executable}"')]:
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RUN=str(run_dir),
               PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), *QUICK], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.index("Training plan") < out.index("epoch 1/1")
    assert len(re.findall(r"^class\s+precision\s+recall", out, re.M)) == 1  # the evaluation table, once
    assert "near-duplicate groups" in out  # the validation split keeps whole groups
    n_val = sum(1 for p in (GROCERY / "val").rglob("*") if p.is_file())
    assert f"of {n_val} photos" in out and "right:" in out and "wrong:" in out
    report = run_dir / "report.html"
    assert report.is_file() and f"report:       {report}" in out
    assert (run_dir / "predictions.csv").is_file() and len(list((run_dir / "predicted").iterdir())) == n_val
    assert f"pomona serve {run_dir}" in out
