import json

import pytest

from pomona.cli.commands import build_parser, parse
from pomona.config import Config, merge, range_problems


def test_flags_override_config_file_overrides_defaults(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"train": {"epochs": 3, "lr": 0.01}, "model": {"dropout": 0.5}}))
    cfg = parse(["train", "--out", "x", "--config", str(tmp_path / "c.json"), "--lr", "0.002",
                 "--freeze-backbone", "--img-size", "none", "--group-by", "^(r_)?"]).settings.config
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.002 and cfg.model.dropout == 0.5
    assert cfg.model.freeze_backbone is True and cfg.model.img_size is None and cfg.data.group_by == "^(r_)?"
    assert cfg.train.batch_size == Config().train.batch_size


def test_unknown_settings_raise_and_config_round_trips(tmp_path):
    with pytest.raises(KeyError, match="unknown setting train.epoch"):
        merge(Config(), {"train": {"epoch": 3}})
    cfg = merge(Config(), {"seed": 5, "data": {"val_fraction": 0.3}})
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg


def test_help_comes_from_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help-all"])
    out = capsys.readouterr().out
    assert "Hidden width of the head" in out and "--freeze-backbone" in out and "--group-by" in out


def test_shipped_config_files_are_valid():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").glob("*.json"))
    assert files
    for f in files:
        assert not range_problems(merge(Config(), json.loads(f.read_text()))), f


def test_tta_takes_a_list_of_views_or_a_boolean_in_flags_and_files(tmp_path, capsys):
    def tta(*argv, config=None):
        extra = ["--config", str(config)] if config else []
        return parse(["train", "--out", "x", *extra, *argv]).settings.config.train.tta

    assert tta("--tta", "identity,hflip,vflip") == ["identity", "hflip", "vflip"]
    assert tta("--tta") is True and tta("--no-tta") is False and tta() is True
    listed = tmp_path / "views.yaml"
    listed.write_text("train:\n  tta: [identity, rot90]\n")
    assert tta(config=listed) == ["identity", "rot90"] and tta("--no-tta", config=listed) is False
    from pomona.models.tta import views_for

    assert views_for(tta(config=listed)) == ("identity", "rot90")
    for argv in (["--tta", "identity,flop"], ["--tta", ","]):  # refused while the command line is read
        with pytest.raises(SystemExit) as e:
            parse(["train", "--out", "x", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "error: argument --tta: " in err and "identity, hflip, vflip" in err
    listed.write_text("train:\n  tta: [identity, flop]\n")
    with pytest.raises(SystemExit) as e:
        parse(["train", "--out", "x", "--config", str(listed)])
    assert e.value.code == 2 and "train.tta must be true or false or a list of identity, hflip" in \
        capsys.readouterr().err
