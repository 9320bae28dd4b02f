"""The command line itself: help, --version and usage errors answer without PyTorch and without the malloc re-exec;
flags come from the settings dataclasses (choices from Literal types); YAML/JSON config files; --print-config."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pomona.cli.commands import COMMANDS, build_parser, main, parse, run
from pomona.config import Config, field_docs

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop("GLIBC_TUNABLES", None)
    env.pop("POMONA_NO_REEXEC", None)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)


# Runs main(argv) with os.execve recorded (not executed); prints the exit code, whether torch/numpy were imported
# and whether the re-exec was asked for.
PROBE = """
import json, os, sys
calls = []
os.execve = lambda *a: calls.append(a[1]) or (_ for _ in ()).throw(SystemExit(99))
from pomona.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "numpy": "numpy" in sys.modules,
                  "pandas": "pandas" in sys.modules, "reexec": bool(calls)}), file=sys.stderr)
"""


def _probe(*argv: str) -> dict:
    proc = _python(PROBE, *argv)
    return json.loads(proc.stderr.strip().splitlines()[-1]) | {"stdout": proc.stdout}


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["train", "--help"], 0), (["tune", "--help"], 0),
                                        (["train", "--help-all"], 0), (["train", "--epoch", "1"], 2),
                                        (["train", "--out", "x", "--batch-size", "0"], 2),
                                        (["data", "fetch", "--help"], 0), (["--version"], 0),
                                        (["train", "--optimizer", "adan"], 2), (["nosuch"], 2), (["predict"], 2),
                                        (["serve", "run", "--engine", "tensorrt"], 2)])
def test_help_version_and_usage_errors_load_no_torch_and_do_not_reexec(argv, code):
    got = _probe(*argv)
    assert got["code"] == code
    assert not got["torch"] and not got["numpy"] and not got["pandas"] and not got["reexec"]
    if argv == ["--version"]:
        assert got["stdout"].strip() == "pomona 0.1.0"


def test_a_real_command_reexecs_after_parsing(tmp_path):
    got = _probe("report", str(tmp_path / "no-run"))
    assert got["reexec"] and got["code"] == 99


def test_help_is_fast():
    env = dict(os.environ, PYTHONPATH=SRC)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pomona", "train", "--help"], env=env, capture_output=True,
                          text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0 and "--freeze-backbone" in proc.stdout
    assert seconds < 3.0, f"pomona train --help took {seconds:.1f} s"  # ~0.4 s on a quiet 2-core machine


def test_every_subcommand_has_help_from_its_dataclass(capsys):
    parser = build_parser()
    for name, command in COMMANDS.items():
        with pytest.raises(SystemExit):
            parser.parse_args([*name.split(), "--help-all" if command.brief_help else "--help"])
        out = " ".join(capsys.readouterr().out.split())
        docs = field_docs(command.settings)
        assert docs and all(doc[:30] in out for doc in docs.values()), name


def test_literal_choices_are_checked_in_flags_and_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse(["train", "--out", "x", "--schedule", "linear"])
    assert e.value.code == 2 and "invalid choice: 'linear'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  optimizer: adan\n")
    with pytest.raises(SystemExit) as e:
        parse(["train", "--out", "x", "--config", str(bad)])
    assert e.value.code == 2 and "train.optimizer must be one of adamw, adam, rmsprop, sgd" in capsys.readouterr().err


def test_yaml_config_print_config_round_trip_touches_no_run_folder(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  freeze_backbone: true\ntrain:\n  epochs: 3\n  lr: 0.01\nseed: 4\n")
    out = tmp_path / "run"
    assert run(["train", "--out", str(out), "--config", str(recipe), "--lr", "0.002", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 3 and printed["train"]["lr"] == 0.002 and printed["seed"] == 4
    assert printed["model"]["freeze_backbone"] is True and not out.exists()
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(printed))
    assert parse(["train", "--out", "x", "--config", str(tmp_path / "resolved.yaml")]).settings.config == \
        Config.from_dict(printed)
    assert run(["tune", "--out", str(out), "--trials", "3", "--print-config", "json"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["tune"]["trials"] == 3 and tuned["model"]["freeze_backbone"] is True  # tune's own defaults
    assert tuned["train"]["epochs"] == 4 and not out.exists()


def test_consistent_flag_names_and_colour_spelling(tmp_path):
    cfg = parse(["train", "--out", "x", "--color-jitter", "0.2", "--balance-allow-color"]).settings.config
    assert cfg.train.colour_jitter == 0.2 and cfg.balance.allow_colour is True
    s = parse(["balance", "--data", "d", "--out", "o", "--balance", "max", "--balance-ops", "rotate90:1",
               "--balance-allow-colour"]).settings
    assert s.balance.mode == "max" and s.balance.operations == "rotate90:1" and s.balance.allow_colour
    old = Config().to_dict()  # a config.json written before the rename still loads
    old["train"]["color_jitter"] = old["train"].pop("colour_jitter") or 0.3
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert Config.load(tmp_path / "config.json").train.colour_jitter == 0.3


def test_main_exits_with_the_command_status(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POMONA_NO_REEXEC", "1")
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "missing")])
    assert e.value.code == 2 and "error" in capsys.readouterr().err
