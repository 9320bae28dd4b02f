"""Every value is checked at the door: each number setting of every subcommand declares its range (field metadata
ge/gt/le/lt, or "unbounded"), and a value outside it is one line naming the flag, exit code 2, nothing written.
Also the parser itself (no abbreviated flags, "did you mean", short usage errors), `predict` on a folder, a
missing run folder, the pip hint of a missing extra, and the basic --help against --help-all."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from pomona.cli.commands import COMMANDS, build_parser, parse, run
from pomona.config import BOUNDS, Config, out_of_range

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _numeric(hint) -> bool:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    return any(a in (int, float) for a in args)


def number_settings(cls: type, prefix: str = "", skip=()):
    """(dotted name, field, type hint) of every int/float setting of a settings dataclass and the ones in it."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from number_settings(hints[f.name], f"{prefix}{f.name}.", f.metadata.get("skip", ()))
        elif _numeric(hints[f.name]):
            yield prefix + f.name, f, hints[f.name]


def _flag(f: dataclasses.Field) -> str:
    return "--" + f.metadata.get("flag", f.name).replace("_", "-")


def out_of_range_values(f: dataclasses.Field, hint) -> list:
    """Values just outside each bound of the field (the bound itself where it is exclusive)."""
    integer = int in (typing.get_args(hint) or (hint,))
    step = 1 if integer else 0.5
    m = f.metadata
    return ([m["ge"] - step] if "ge" in m else []) + ([m["gt"]] if "gt" in m else []) + \
        ([m["le"] + step] if "le" in m else []) + ([m["lt"]] if "lt" in m else [])


def required_args(name: str, tmp_path: Path) -> list[str]:
    """The positional arguments and required flags of a subcommand, pointing into tmp_path (nothing exists)."""
    values = {"run": str(tmp_path / "run"), "photo": str(tmp_path / "photo.jpg"),
              "image": str(tmp_path / "photo.jpg"), "name": "grocery-apples"}
    argv = [*name.split()]
    for f in dataclasses.fields(COMMANDS[name].settings):
        if f.metadata.get("positional") and f.name in values:
            argv.append(values[f.name])
        elif f.name == "out":
            argv += ["--out", str(tmp_path / "out")]
    return argv


def _exit_code(argv: list[str]) -> int:
    try:
        return run(argv)
    except SystemExit as e:
        return e.code


def test_every_number_setting_declares_its_range():
    """A new int/float setting without bounds (or an explicit "unbounded": True) fails here."""
    undeclared, both = [], []
    for name, command in COMMANDS.items():
        for dotted, f, _ in number_settings(command.settings):
            bounded = any(k in f.metadata for k in BOUNDS)
            if not bounded and not f.metadata.get("unbounded"):
                undeclared.append(f"{name}: {dotted}")
            if bounded and f.metadata.get("unbounded"):
                both.append(f"{name}: {dotted}")
    assert not undeclared, f"number settings without a range (metadata ge/gt/le/lt or unbounded): {undeclared}"
    assert not both, f"number settings both bounded and unbounded: {both}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_out_of_range_number_is_refused_before_anything_is_written(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    checked = 0
    for dotted, f, hint in number_settings(COMMANDS[name].settings):
        for value in out_of_range_values(f, hint):
            argv = [*required_args(name, tmp_path), _flag(f), str(value)]
            code = _exit_code(argv)
            err = capsys.readouterr().err
            assert code == 2, (argv, err)
            assert err.startswith(f"pomona {name}: error: {_flag(f)} must be ") and err.count("\n") == 1, err
            assert not any(tmp_path.iterdir()), (argv, list(tmp_path.iterdir()))
            checked += 1
        assert out_of_range(f.default, f.metadata) is None, (name, dotted, f.default)  # defaults are in range
    assert checked or not any(number_settings(COMMANDS[name].settings))


def test_known_bad_values_are_one_line(tmp_path, capsys):
    cases = {("train", "--batch-size", "0"): "--batch-size must be >= 1, not 0",
             ("train", "--epochs", "0"): "--epochs must be >= 1, not 0",
             ("train", "--val-fraction", "1.5"): "--val-fraction must be > 0 and < 1, not 1.5",
             ("train", "--test-fraction", "0.5"): "--test-fraction must be >= 0 and < 0.5, not 0.5",
             ("train", "--lr", "nan"): "--lr must be a finite number, not nan",
             ("predict", "--top-k", "0"): "--top-k must be >= 1, not 0",
             ("predict", "--min-confidence", "2"): "--min-confidence must be >= 0 and <= 1, not 2.0"}
    for (name, flag, value), message in cases.items():
        assert _exit_code([*required_args(name, tmp_path), flag, value]) == 2
        assert capsys.readouterr().err == f"pomona {name}: error: {message}\n"
    assert not any(tmp_path.iterdir())


def test_a_bad_value_in_a_config_file_names_the_setting_and_the_file(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  batch_size: 0\n")
    assert _exit_code(["train", "--out", str(tmp_path / "run"), "--config", str(recipe)]) == 2
    assert capsys.readouterr().err == f"pomona train: error: train.batch_size (in {recipe}) must be >= 1, not 0\n"
    # a flag given on the command line overrides the file, and is then what is checked
    assert parse(["train", "--out", "x", "--config", str(recipe), "--batch-size", "4"]).settings.config.train \
        .batch_size == 4
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "--epochs", "0"], "pomona train: error: --epochs must be >= 1, not 0"),
    (["predict", "RUN", "photo.jpg", "--batch-size", "-3"], "pomona predict: error: --batch-size must be >= 1, not -3"),
])
def test_the_real_entry_point_refuses_bad_values(tmp_path, argv, message):
    argv = [a if a != "RUN" else str(tmp_path / "run") for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-m", "pomona", *argv], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=SRC, POMONA_NO_REEXEC="1"))
    assert proc.returncode == 2 and proc.stderr.strip() == message and not proc.stdout, proc.stderr
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- the parser
def test_abbreviated_flags_are_refused_with_the_nearest_flag(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["train", "--out", "x", "--epoch", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.splitlines() == ["usage: pomona train [options]",
                                                       "pomona train: error: unknown flag --epoch: did you mean "
                                                       "--epochs?"]
    with pytest.raises(SystemExit):
        parse(["predict", "run", "--top", "1"])  # prefix of --top-k: no longer taken for it
    assert "unknown flag --top: did you mean --top-k?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["train", "--out", "x", "--val-fraction=0.1", "--lr-warmup", "2"])
    assert capsys.readouterr().err.splitlines()[-1].startswith("pomona train: error: unknown flag --lr-warmup")
    assert parse(["train", "--out", "x", "--epochs", "2"]).settings.config.train.epochs == 2


def test_type_and_usage_errors_are_one_line_and_the_relevant_usage(capsys):
    expected = {
        ("train", "--out", "x", "--batch-size", "x"): [
            "usage: pomona train [options] [--batch-size INT]",
            "pomona train: error: argument --batch-size: invalid int value: 'x'"],
        ("predict",): ["usage: pomona predict [options] run [FILES ...]",
                       "pomona predict: error: the following arguments are required: run"],
        ("balance", "--data", "d"): ["usage: pomona balance [options] --out STR",
                                     "pomona balance: error: the following arguments are required: --out"],
        ("trian",): None,
    }
    for argv, lines in expected.items():
        with pytest.raises(SystemExit) as e:
            parse(list(argv))
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == 2, err
        if lines:
            assert err == lines
    assert err[1].startswith("pomona: error: argument COMMAND: invalid choice: 'trian'") and \
        err[1].endswith("did you mean 'train'?")


# ---------------------------------------------------------------------------------------------- predict
class FakeRun:
    """What `predict` needs of a loaded run: probabilities for readable photos, `bad` for the rest."""

    def __init__(self, unreadable=()):
        self.unreadable = set(unreadable)

    def predict(self, paths):
        import numpy as np

        from pomona.inference.engine import Predictions

        paths = [str(p) for p in paths]
        probs = np.array([[np.nan, np.nan] if p in self.unreadable else [0.9, 0.1] for p in paths])
        return Predictions(paths, probs, ["Fuji", "Gala"], {p: "not an image" for p in paths if p in self.unreadable})


def _photos(root: Path) -> list[str]:
    (root / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.PNG", "notes.txt"):
        (root / name).write_bytes(b"")
    return [str(root / "a.jpg"), str(root / "sub" / "b.PNG")]


def test_predict_a_folder_given_as_an_argument(tmp_path, monkeypatch, capsys):
    import pomona.inference.loaded

    photos = _photos(tmp_path / "photos")
    monkeypatch.setattr(pomona.inference.loaded, "load_run", lambda *a, **k: FakeRun())
    assert run(["predict", str(tmp_path / "run"), str(tmp_path / "photos"), "--format", "json"]) == 0
    assert [r["path"] for r in json.loads(capsys.readouterr().out)] == photos  # recursive, images only


def test_predicting_nothing_usable_is_an_error(tmp_path, monkeypatch, capsys):
    import pomona.inference.loaded

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("no photo")
    assert run(["predict", str(tmp_path / "run"), str(tmp_path / "docs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pomona predict: error: no photos in {tmp_path / 'docs'}") and len(err.splitlines()) == 1

    photos = _photos(tmp_path / "photos")
    monkeypatch.setattr(pomona.inference.loaded, "load_run", lambda *a, **k: FakeRun(unreadable=photos))
    out = tmp_path / "predictions.csv"
    assert run(["predict", str(tmp_path / "run"), *photos, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("pomona predict: error: none of the 2 file(s) could be read as a photo")
    assert len(captured.err.splitlines()) == 1 and not out.exists()
    monkeypatch.setattr(pomona.inference.loaded, "load_run", lambda *a, **k: FakeRun(unreadable=photos[:1]))
    assert run(["predict", str(tmp_path / "run"), *photos]) == 0  # one usable prediction is a result


def test_predict_a_folder_with_a_real_run(apple_run, capsys):
    from conftest import GROCERY

    folder = GROCERY / "val" / "Pink-Lady"
    assert run(["predict", str(apple_run), str(folder), "--format", "json", "--top-k", "1"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in records] == sorted(str(p) for p in folder.rglob("*.jpg"))
    assert all(r["label"] in ("Granny-Smith", "Pink-Lady") and len(r["top"]) == 1 for r in records)


# ---------------------------------------------------------------------------------------------- run folders
def test_a_missing_run_folder_is_not_found_and_an_empty_one_is_not_a_run(tmp_path, capsys):
    missing, empty = tmp_path / "no-such-run", tmp_path / "empty"
    empty.mkdir()
    for argv in (["evaluate", str(missing)], ["report", str(missing)], ["export", str(missing), "--format",
                                                                       "torchscript"],
                 ["train", "--resume", str(missing)]):
        assert _exit_code(argv) == 2
        assert capsys.readouterr().err == f"pomona {argv[0]}: error: run folder not found: {missing}\n", argv
    assert not missing.exists()  # export did not create it
    assert run(["evaluate", str(empty)]) == 2
    assert capsys.readouterr().err == f"pomona evaluate: error: {empty} is not a finished pomona run (no run.json)\n"


def test_the_missing_extra_hint_works_from_a_clone_too():
    from pomona.core.errors import missing_extra

    assert str(missing_extra("uvicorn", "pomona serve")).endswith(
        "pip install 'pomona[serve]'  (from a clone: pip install -e '.[serve]')")
    assert str(missing_extra("somepackage")).endswith("pip install somepackage")


# ---------------------------------------------------------------------------------------------- help
def _help(*argv: str) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(list(argv))
    assert e.value.code == 0


def test_train_help_lists_the_basic_settings_and_help_all_every_flag(capsys):
    _help("train", "--help")
    brief = capsys.readouterr().out
    listed = [line.split()[0].rstrip(",") for line in brief.splitlines() if line.startswith("  --")]
    settings = [f for f in listed if f not in ("--help-all", "--config", "--print-config", "--debug")]
    assert 12 <= len(settings) <= 18, settings
    for flag in ("--data", "--val-fraction", "--model", "--img-size", "--epochs", "--batch-size", "--lr", "--out",
                 "--resume"):
        assert flag in settings
    assert "--hflip" not in brief and "--help-all" in brief
    sections = [line[:-1] for line in brief.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert sections == ["options", "data", "model", "training", "run folder"], sections

    _help("train", "--help-all")
    full = capsys.readouterr().out
    parser = build_parser().commands["train"]
    hidden = {a.option_strings[0] for a in parser._actions if a.option_strings and a.help == argparse.SUPPRESS}
    assert "--hflip" in hidden and "--folds" in hidden
    every = build_parser(brief=False).commands["train"]._actions
    aliases = {a.option_strings[0] for a in every if a.option_strings and a.help == argparse.SUPPRESS}  # --color-...
    listed_in_full = {a.option_strings[0] for a in every if a.option_strings and a.help != argparse.SUPPRESS}
    assert hidden - aliases <= listed_in_full and all(flag in full for flag in listed_in_full)
    # a flag left out of --help still works
    cfg = parse(["train", "--out", "x", "--hflip", "0.2", "--color-jitter", "0.1"]).settings.config
    assert cfg.train.hflip == 0.2 and cfg.train.colour_jitter == 0.1 and cfg == Config.from_dict(cfg.to_dict())


def test_commands_without_brief_help_list_everything(capsys):
    _help("augment-preview", "--help")
    out = capsys.readouterr().out
    assert "--hflip" in out and "--rotate" in out and "--help-all" not in out


def test_size_presets_set_the_model_and_refuse_a_conflicting_choice(tmp_path, capsys):
    from pomona.cli.commands import run
    from pomona.config import MODEL_PRESETS, Config, apply_size
    from pomona.core.errors import UsageError

    for size, (name, img) in MODEL_PRESETS.items():
        cfg = apply_size(Config(), size)
        assert (cfg.model.name, cfg.model.img_size) == (name, img)
    with pytest.raises(UsageError, match="--size l"):
        apply_size(Config(model=dataclasses.replace(Config().model, img_size=300)), "l")
    assert run(["train", "--data", str(tmp_path), "--size", "l", "--model", "tf_efficientnet_lite1",
                "--out", str(tmp_path / "r")]) == 2
    assert "--size l" in capsys.readouterr().err and not (tmp_path / "r").exists()
