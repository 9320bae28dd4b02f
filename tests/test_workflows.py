"""`pomona.workflows` is what the commands do: `pomona train ...` and `workflows.train_run(cfg, ...)` from Python,
with the same settings, make the same run folder (split, groups, test photos, scores)."""

import json

import pandas as pd

from pomona.cli.commands import run
from pomona.workflows import train_run

from conftest import tiny_config

FLAGS = ["--model", "test_efficientnet", "--weights", "none", "--img-size", "64", "--out-features", "16",
         "--epochs", "1", "--batch-size", "8", "--frozen-epochs", "0", "--warmup-epochs", "0", "--device", "cpu",
         "--val-fraction", "0.34", "--test-fraction", "0.3"]
"""tiny_config() and the data settings below, as flags."""


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_train_run_from_python_makes_the_run_pomona_train_makes(grocery_small, tmp_path, capsys):
    by_cli, by_python = tmp_path / "cli", tmp_path / "python"
    assert run(["train", "--data", str(grocery_small), "--out", str(by_cli), *FLAGS]) == 0
    printed = capsys.readouterr().out

    cfg = tiny_config()
    cfg.data.data_dir, cfg.data.val_fraction, cfg.data.test_fraction = str(grocery_small), 0.34, 0.3
    result = train_run(cfg, by_python)
    assert result.run_dir == by_python
    assert capsys.readouterr().out.replace(str(by_python), str(by_cli)).splitlines()[-3:] == \
        printed.splitlines()[-3:]  # the test set's scores, printed alike

    assert _files(by_python) == _files(by_cli)
    assert {"split.csv", "groups.csv", "eval/metrics.json", "test/metrics.json", "report.html"} <= set(_files(by_cli))
    assert json.loads((by_python / "config.json").read_text()) == json.loads((by_cli / "config.json").read_text())
    for table in ["split.csv", "groups.csv"]:
        pd.testing.assert_frame_equal(pd.read_csv(by_python / table), pd.read_csv(by_cli / table))
    for scores in ["eval/metrics.json", "test/metrics.json"]:
        ours, theirs = (json.loads((folder / scores).read_text()) for folder in (by_python, by_cli))
        assert ours["macro_f1"] == theirs["macro_f1"] and ours["n"] == theirs["n"], scores
