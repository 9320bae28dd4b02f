"""Run folders and the command line against planted, damaged and mismatched files (issue "Safe with untrusted
files and clients", points 1, 4, 5, 6 and 8): nothing from a checkpoint is ever run, an existing run is never
replaced by accident, a killed write leaves the old file, run folders do not lie, and every failure is one line
with its fix. Real files, the real CLI; few trainings (timm's tiny test model, seconds each)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from pomona.cli.commands import COMMANDS, Command, run
from pomona.config import Config, ReportCommand
from pomona.inference.loaded import load_run
from pomona.inference.runfolder import RunFolderError, load_training_state, sha256_file
from pomona.training.train import train_and_evaluate

from conftest import GROCERY, held_out_photo, tiny_config

SRC = Path(__file__).resolve().parents[1] / "src"
TINY_FLAGS = ["--model", "test_efficientnet", "--weights", "none", "--img-size", "64", "--out-features", "16",
              "--epochs", "1", "--batch-size", "8", "--frozen-epochs", "0", "--warmup-epochs", "0", "--device", "cpu",
              "--val-fraction", "0.34"]
"""tiny_config() as flags: a run that trains in seconds."""


def one_line_error(capsys, command: str) -> str:
    """The captured stderr, checked to be one error line of `pomona COMMAND` and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"pomona {command}: error: "), err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(grocery_small, tmp_path_factory) -> Path:
    """A finished tiny run on 3 classes x 6 grocery photos."""
    cfg = tiny_config()
    cfg.data.data_dir, cfg.data.val_fraction = str(grocery_small), 0.34
    out = tmp_path_factory.mktemp("tiny") / "run"
    train_and_evaluate(cfg, out)
    return out


# ------------------------------------------------------------------------------ 1. no pickle from last.pt
class Planted:
    """Pickles as a call of `exec`: what a planted last.pt would run when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('planted code ran')",)


def test_a_planted_pickle_in_last_pt_is_refused_and_never_run(tiny_run, tmp_path, capsys):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    marker = tmp_path / "PWNED"
    genuine = load_training_state(run_dir / "last.pt")  # a genuine state loads with weights_only=True
    assert genuine["classes"] == json.loads((run_dir / "run.json").read_text())["classes"]
    torch.save({**genuine, "history": [Planted(marker)]}, run_dir / "last.pt")
    with pytest.raises(RunFolderError, match=r"holds a pickled (builtins\.)?exec, .*refused, nothing in it was run"):
        load_training_state(run_dir / "last.pt")
    assert run(["train", "--resume", str(run_dir)]) == 2
    assert "nothing in it was run" in one_line_error(capsys, "train")
    assert not marker.exists()  # neither load ran the payload
    proof = subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(run_dir / 'last.pt')!r}, "
                            "weights_only=False)"], capture_output=True, timeout=120)
    assert proof.returncode == 0 and marker.read_text() == "planted code ran"  # (the payload is real)


def test_every_torch_load_in_the_package_is_weights_only():
    calls = [(p.name, line.strip()) for p in SRC.joinpath("pomona").rglob("*.py")
             for line in p.read_text().splitlines() if re.search(r"torch\.load\(", line)
             and not line.strip().startswith(("#", '"', "`"))]
    assert calls and all("weights_only=True" in line for _, line in calls), calls
    assert not any("pickle.load" in p.read_text() for p in SRC.joinpath("pomona").rglob("*.py"))


# ------------------------------------------------------------------------ 4. an existing run is never replaced
def test_an_existing_run_is_refused_and_overwrite_replaces_it_only_after_every_check(tiny_run, grocery_small,
                                                                                     tmp_path, capsys):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    (run_dir / "export.json").write_text("{}")  # files of the old run that the new one must not inherit
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "notes.txt").write_text("mine")  # not pomona's: kept
    before = snapshot(run_dir)
    start = time.monotonic()
    assert run(["train", "--data", str(grocery_small), "--out", str(run_dir), *TINY_FLAGS]) == 2
    assert "already holds a pomona run" in one_line_error(capsys, "train") and time.monotonic() - start < 5
    assert snapshot(run_dir) == before

    bad_data = tmp_path / "bad_data"  # 3 unreadable photos of 21: over the 5% limit
    shutil.copytree(grocery_small, bad_data, symlinks=True)
    for i in range(3):
        (bad_data / "Pink-Lady" / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff truncated")
    assert run(["train", "--data", str(bad_data), "--out", str(run_dir), "--overwrite", "--seed", "5",
                *TINY_FLAGS]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert snapshot(run_dir) == before  # the failed attempt left config.json (and everything else) as it was
    with pytest.raises(SystemExit) as e:  # a bad setting: refused while the command line is read
        run(["train", "--data", str(grocery_small), "--out", str(run_dir), "--overwrite", "--optimizer", "adamz"])
    assert e.value.code == 2 and "invalid choice: 'adamz'" in capsys.readouterr().err
    assert snapshot(run_dir) == before

    assert run(["train", "--data", str(grocery_small), "--out", str(run_dir), "--overwrite", "--seed", "5",
                *TINY_FLAGS]) == 0
    assert Config.load(run_dir / "config.json").seed == 5
    assert not (run_dir / "export.json").exists() and (run_dir / "notes.txt").read_text() == "mine"
    assert (run_dir / "eval" / "metrics.json").is_file()  # the new run's evaluation, not the old folder's


def test_overwrite_removes_all_the_old_run_wrote_and_a_self_trained_run_keeps_its_teacher(tiny_run, grocery_small,
                                                                                          tmp_path):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    (run_dir / "test").mkdir()  # the old run's test score
    (run_dir / "test" / "metrics.json").write_text('{"macro_f1": 1.0}')
    for part in ("teacher", "student-3"):  # the parts of an old self-trained run
        (run_dir / part).mkdir()
        (run_dir / part / "run.json").write_text("{}")
    pool = tmp_path / "unlabelled"
    pool.mkdir()
    for f in sorted((GROCERY / "val" / "Granny-Smith").iterdir())[:2]:  # photos grocery_small does not hold
        (pool / f.name).symlink_to(f)
    assert run(["train", "--data", str(grocery_small), "--out", str(run_dir), "--overwrite", "--unlabeled",
                str(pool), "--pseudo-threshold", "0", *TINY_FLAGS]) == 0
    assert not (run_dir / "test").exists() and not (run_dir / "student-3").exists()
    teacher = load_run(run_dir / "teacher", device="cpu", engine="torch")  # the new run's own teacher, kept
    assert teacher.info["member_sha256"] and teacher.classes == load_run(run_dir, device="cpu").classes
    assert len(pd.read_csv(run_dir / "pseudo_labels.csv")) == 2 and (run_dir / "eval" / "metrics.json").is_file()


def test_resume_keeps_the_saved_settings_and_names_conflicting_flags(tiny_run, tmp_path, capsys):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    before = snapshot(run_dir)
    saved_lr = Config.load(run_dir / "config.json").train.lr
    assert run(["train", "--resume", str(run_dir), "--lr", "0.5"]) == 2
    line = one_line_error(capsys, "train")
    assert f"these differ: train.lr 0.5 (saved: {saved_lr})" in line
    assert run(["train", "--resume", str(run_dir), "--out", str(tmp_path / "elsewhere")]) == 2
    assert "drop --out" in one_line_error(capsys, "train")
    assert snapshot(run_dir) == before and not (tmp_path / "elsewhere").exists()


# ------------------------------------------------------------------------------- 5. atomic run files
WRITER = """
import sys
from pomona.core.atomic import write_json
path, n = sys.argv[1], 0
big = {"classes": ["a", "b"], "padding": "x" * 4_000_000}
print("ready", flush=True)
while True:
    n += 1
    write_json(path, {**big, "n": n})
"""


def test_a_kill_while_run_json_is_rewritten_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"n": 0}))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(SRC)))
    try:
        assert proc.stdout.readline().strip() == "ready"
        seen = set()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # readers never see a partial file
            seen.add(json.loads(path.read_text())["n"])
        os.kill(proc.pid, signal.SIGKILL)  # most likely in the middle of a write
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(seen) > 2, seen  # it was rewriting all along
    assert json.loads(path.read_text())["n"] >= max(seen)  # intact: the last complete version
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "run.json"]
    assert all(name.startswith(".run.json.") and name.endswith(".tmp") for name in leftovers), leftovers


# ------------------------------------------------------------------------------ 6. run folders that do not lie
class Interrupted(Exception):
    pass


class StopAfterFirstEpoch:
    def on_epoch_end(self, epoch, metrics):
        if epoch == 0:
            raise Interrupted


def test_split_paths_and_bad_images_survive_resume_from_another_folder(grocery_small, tmp_path, monkeypatch, capsys):
    data = tmp_path / "work" / "photos"
    shutil.copytree(grocery_small, data, symlinks=True)
    (data / "Granny-Smith" / "broken.jpg").write_bytes(b"not a photo")
    monkeypatch.chdir(tmp_path / "work")  # training runs with relative paths, from here
    cfg = tiny_config(epochs=2)
    cfg.data.data_dir, cfg.data.val_fraction, cfg.data.max_bad_fraction = "photos", 0.34, 0.1
    with pytest.raises(Interrupted):
        train_and_evaluate(cfg, "run", callbacks=[StopAfterFirstEpoch()])
    run_dir = (tmp_path / "work" / "run").resolve()
    split = pd.read_csv(run_dir / "split.csv")
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in split["path"])
    broken = str(data / "Granny-Smith" / "broken.jpg")
    assert list(json.loads((run_dir / "bad_images.json").read_text())) == [broken]

    monkeypatch.chdir(tmp_path)  # resume (which then evaluates on the split's validation photos) from elsewhere
    assert run(["train", "--resume", str(run_dir)]) == 0
    assert len(pd.read_csv(run_dir / "history.csv")) == 2
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["n"] == (split["subset"] == "val").sum()
    assert list(json.loads((run_dir / "bad_images.json").read_text())) == [broken]  # kept, not wiped to {}
    capsys.readouterr()


def _old_style(run_dir: Path) -> None:
    """Make `run_dir` look like a run written before classes and SHA-256 were recorded with the weights."""
    info = json.loads((run_dir / "run.json").read_text())
    info.pop("member_sha256", None)
    (run_dir / "run.json").write_text(json.dumps(info))
    save_file(load_file(str(run_dir / "model.safetensors")), str(run_dir / "model.safetensors"))  # no metadata


def _reorder_classes(run_dir: Path) -> None:
    info = json.loads((run_dir / "run.json").read_text())
    info["classes"] = info["classes"][::-1]
    (run_dir / "run.json").write_text(json.dumps(info))


def test_reordered_classes_and_replaced_files_are_refused_everywhere(apple_run, tmp_path, capsys):
    photo = str(held_out_photo("Pink-Lady"))
    reordered = shutil.copytree(apple_run, tmp_path / "reordered")
    _reorder_classes(reordered)
    for engine in ("torch", "onnx", "auto"):  # caught by the classes inside model.safetensors
        with pytest.raises(RunFolderError, match="model.safetensors has .* edited or reordered"):
            load_run(reordered, engine=engine)
    assert run(["predict", str(reordered), photo]) == 2
    assert "edited or reordered" in one_line_error(capsys, "predict")

    old = shutil.copytree(apple_run, tmp_path / "old")  # an older run folder: export.json, then ONNX metadata
    _old_style(old)
    info = json.loads((old / "export.json").read_text())
    info["onnx"]["source_sha256"] = sha256_file(old / "model.safetensors")
    (old / "export.json").write_text(json.dumps(info))
    assert load_run(old).engine_name == "onnx"
    _reorder_classes(old)
    with pytest.raises(RunFolderError, match="but export.json has"):
        load_run(old)
    del info["onnx"]["classes"]
    (old / "export.json").write_text(json.dumps(info))
    with pytest.raises(RunFolderError, match="but the metadata of model.onnx has"):
        load_run(old, engine="onnx")

    replaced = shutil.copytree(apple_run, tmp_path / "replaced")  # other weights under the recorded name
    state = load_file(str(replaced / "model.safetensors"))
    state["head.1.bias"] = state["head.1.bias"] + 1
    save_file(state, str(replaced / "model.safetensors"))
    with pytest.raises(RunFolderError, match="does not match the SHA-256 that run.json records"):
        load_run(replaced)
    swapped = shutil.copytree(apple_run, tmp_path / "swapped")  # model.onnx replaced after its export
    (swapped / "model.onnx").write_bytes((swapped / "model.onnx").read_bytes() + b"\0")
    assert load_run(swapped).engine_name == "torch"  # auto: not used
    assert run(["predict", str(swapped), photo, "--engine", "onnx"]) == 2
    assert "changed after it was exported" in one_line_error(capsys, "predict")


# ------------------------------------------------------------------------------ 8. one line, with the fix
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated weights": (lambda r: _truncate(r / "model.safetensors"), "does not match the SHA-256"),
    "truncated weights, old run": (lambda r: (_old_style(r), _truncate(r / "model.safetensors")),
                                   "not a readable safetensors file"),
    "garbage weights, old run": (lambda r: (_old_style(r), (r / "model.safetensors").write_bytes(os.urandom(999))),
                                 "not a readable safetensors file"),
    "one class too many, old run": (lambda r: (_old_style(r), r.joinpath("run.json").write_text(
        json.dumps({**json.loads(r.joinpath("run.json").read_text()), "classes": ["A", "B", "C"]}))),
        "lists 3 classes but .* has 2 outputs"),
    "empty run.json": (lambda r: (r / "run.json").write_text(""), "run.json is empty: the file is damaged"),
    "truncated run.json": (lambda r: _truncate(r / "run.json"), "run.json is not valid JSON"),
    "broken export.json": (lambda r: _truncate(r / "export.json"), "export.json is not valid JSON"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_run_files_are_one_line_errors(apple_run, tmp_path, capsys, damage):
    run_dir = shutil.copytree(apple_run, tmp_path / "run")
    spoil, message = DAMAGE[damage]
    spoil(run_dir)
    assert run(["predict", str(run_dir), str(held_out_photo("Pink-Lady"))]) == 2
    assert re.search(message, one_line_error(capsys, "predict"))


def test_config_files_and_bad_settings_are_one_line_usage_errors(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  epochs: 3\n  optimizer: sgd\n")
    assert run(["train", "--out", str(tmp_path / "r"), "--config", str(recipe), "--print-config", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["optimizer"] == "sgd"
    cases = {"broken.yaml": ("train:\n  epochs: [3\n", r"broken.yaml: not valid YAML at line \d"),
             "yaml.json": ("train:\n  epochs: 3\n", "not valid JSON.*a YAML file needs a .yaml or .yml name"),
             "section.yaml": ("train: 3\n", "train holds settings"),
             "type.yaml": ("train:\n  epochs: many\n", "train.epochs must be an integer, not 'many'"),
             "choice.yaml": ("train:\n  optimizer: adamz\n", "train.optimizer must be one of adamw")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit) as e:
            run(["train", "--out", str(tmp_path / "r"), "--config", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and re.search(message, err) and "Traceback" not in err, (name, err)
    assert not (tmp_path / "r").exists()


MISSING = """
import sys
sys.modules[sys.argv[1]] = None  # as if the package were not installed
from pomona.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("module, argv, extra", [
    ("uvicorn", ["serve", "no-run"], "serve"),
    ("onnx", ["export", "no-run"], "serve"),
    ("optuna", ["tune", "--data", "d", "--out", "o"], "tune"),
])
def test_a_missing_extra_names_the_pip_command(tmp_path, module, argv, extra):
    proc = subprocess.run([sys.executable, "-c", MISSING, module, *argv], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(SRC), POMONA_NO_REEXEC="1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (f"pomona {argv[0]}: error: pomona {argv[0]} "
                                   f"needs the Python package {module}, which is not installed: "
                                   f"pip install 'pomona[{extra}]'  (from a clone: pip install -e '.[{extra}]')")
    assert not any(tmp_path.iterdir())


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def boom(settings):
        raise ZeroDivisionError("something deep inside")

    monkeypatch.setitem(COMMANDS, "report", Command(boom, ReportCommand))
    assert run(["report", "x"]) == 1
    assert one_line_error(capsys, "report").endswith(
        "ZeroDivisionError: something deep inside (unexpected; run again with --debug for the traceback)")
    with pytest.raises(ZeroDivisionError):
        run(["report", "x", "--debug"])
    with pytest.raises(ZeroDivisionError):
        run(["--debug", "report", "x"])
