"""Run folders (`pomona.inference.runfiles`, `pomona.inference.runfolder`, `pomona.inference.loaded`): every file a
run writes declared once, ensembles of members with a temperature, old run folders, exports of an ensemble; the
shared pieces beneath them: test-time views, atomic writes, progress lines."""

import json

import numpy as np
import pytest
import torch

from pomona.config import Config
from pomona.core.atomic import atomic_write, write_json
from pomona.core.progress import Progress
from pomona.data.preprocessing import Preprocessing
from pomona.inference.loaded import load_run
from pomona.inference.runfiles import RUN_FILES, RUN_MARKERS, RunFolder
from pomona.inference.runfolder import clear_run_folder, read_run_info, save_run
from pomona.models.model import create_model
from pomona.models.tta import VIEWS, apply_view, average_probs

from conftest import tiny_config

CLASSES = ["a", "b", "c"]
PRE = Preprocessing(48, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
SETTINGS = {"name": "test_efficientnet", "out_features": 8, "dropout": 0.0}


def _members(n: int) -> list[torch.nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(create_model("test_efficientnet", len(CLASSES), 8, 0.0, weights="none").eval())
    return out


def _softmax_views(model, x: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    with torch.no_grad():
        views = [model(x), model(torch.flip(x, dims=[3]))]
        return torch.stack([(v / temperature).softmax(-1) for v in views]).mean(0).numpy()


def test_every_file_a_run_writes_is_declared_once_and_overwrite_removes_them(grocery_small, grocery_val_small,
                                                                            tmp_path):
    """A real tiny run (trained, evaluated, reported, scored on test photos, exported) writes only files that
    `RunFolder` declares; `RUN_FILES` (what --overwrite removes) is what the declarations mark, and removing them
    leaves only what is not pomona's."""
    from pomona.inference.export import export_run
    from pomona.workflows import train_run

    cfg = tiny_config()
    cfg.data.data_dir, cfg.data.val_fraction, cfg.data.test_data = str(grocery_small), 0.34, str(grocery_val_small)
    run_dir = tmp_path / "run"
    train_run(cfg, run_dir)
    export_run(run_dir, "onnx")
    folder, declared = RunFolder(run_dir), RunFolder.files()
    names = [f.name for f in declared]
    assert len(set(names)) == len(names)
    assert folder.split == run_dir / "split.csv" == folder.path / RunFolder.split.name
    written = {p.name for p in run_dir.iterdir()}
    assert written <= set(names), f"not declared on RunFolder: {sorted(written - set(names))}"
    assert {folder.config.name, folder.run_info.name, folder.weights.name, folder.last.name, folder.split.name,
            folder.history.name, folder.groups.name, folder.eval_dir.name, folder.report.name, folder.test_dir.name,
            folder.onnx.name, folder.export_info.name} <= written
    assert RUN_FILES == tuple(f.name for f in declared if f.overwrite) and written <= set(RUN_FILES)
    assert RUN_MARKERS == ("config.json", "run.json", "last.pt", "split.csv")
    assert folder.read_run_info()["classes"] == sorted(set(folder.read_split()["label"]))
    assert folder.fold(1, 2) == run_dir / "folds" / "1-2" and folder.student(3) == run_dir / "student-3"
    (run_dir / "notes.txt").write_text("mine")
    clear_run_folder(run_dir)
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"]


def test_an_ensemble_run_averages_members_views_and_temperature(tmp_path):
    members = _members(2)
    save_run(tmp_path, members, CLASSES, PRE, SETTINGS, Config().to_dict(), {"best_epoch": 0}, temperature=2.0)
    info = read_run_info(tmp_path)
    assert info["members"] == ["members/0/model.safetensors", "members/1/model.safetensors"]
    assert info["temperature"] == 2.0 and (tmp_path / "members" / "1" / "model.safetensors").is_file()
    run = load_run(tmp_path, device="cpu", engine="torch", tta=True)
    assert len(run.models) == 2 and run.classes == CLASSES
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    expected = np.mean([_softmax_views(m, x, 2.0) for m in members], axis=0)
    assert run.predict_probs(x.numpy()) == pytest.approx(expected, abs=1e-5)


def test_an_old_run_folder_loads_as_one_member(tmp_path):
    (model,) = _members(1)
    save_run(tmp_path, model, CLASSES, PRE, SETTINGS, Config().to_dict())
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["members"] == ["model.safetensors"] and info["temperature"] == 1.0
    del info["members"], info["temperature"]  # as written before ensembles existed
    write_json(tmp_path / "run.json", info)
    run = load_run(tmp_path, device="cpu", tta=False)
    assert run.engine_name == "torch" and len(run.models) == 1 and run.module is run.models[0]
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert run.predict_probs(x) == pytest.approx(model(x).softmax(-1).numpy(), abs=1e-5)


def test_an_ensemble_exports_to_onnx_with_its_probabilities(tmp_path):
    from pomona.inference.export import export_run

    save_run(tmp_path, _members(2), CLASSES, PRE, SETTINGS, Config().to_dict(), temperature=1.5)
    result = export_run(tmp_path, "onnx")
    assert result.max_abs_diff <= 1e-3
    onnx_run, torch_run = load_run(tmp_path, "cpu", engine="auto"), load_run(tmp_path, "cpu", engine="torch")
    assert onnx_run.engine_name == "onnx"
    x = np.random.default_rng(0).normal(size=(4, 3, 48, 48)).astype(np.float32)
    assert onnx_run.predict_probs(x) == pytest.approx(torch_run.predict_probs(x), abs=1e-4)


@pytest.mark.parametrize("view", VIEWS)
def test_views_are_the_same_on_torch_and_numpy(view):
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    assert np.array_equal(apply_view(torch.from_numpy(x), view).numpy(), apply_view(x, view))


def test_average_probs_one_call_or_one_per_view():
    weights = np.random.default_rng(1).normal(size=(16, 3))

    def probs(x):
        z = x.reshape(len(x), -1) @ weights
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    x = np.random.default_rng(2).normal(size=(5, 1, 4, 4))
    separate = average_probs(probs, x, VIEWS)
    assert average_probs(probs, x, VIEWS, together=True) == pytest.approx(separate)
    assert separate == pytest.approx(np.mean([probs(apply_view(x, v)) for v in VIEWS], axis=0))


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    path = write_json(tmp_path / "run.json", {"v": 1})

    def broken(tmp):
        open(tmp, "w").write('{"v": 2')  # half written, then the process dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_progress_in_a_log_is_a_plain_line_with_rate_and_eta(capsys):
    batches = [(None, [0] * 8)] * 4
    for _ in Progress(batches, desc="epoch 1/3", unit="batch", count=lambda b: len(b[1]), interval=0.0):
        pass
    lines = capsys.readouterr().err.strip().splitlines()  # stdout is not a terminal under pytest
    assert len(lines) == 4 and lines[1].startswith("epoch 1/3: 2/4 batch, ") and "img/s" in lines[1]
    assert "ETA 0:00:00" in lines[1]
