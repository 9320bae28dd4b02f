"""Export parity (ONNX, TorchScript), the ONNX engine behind `predict`, and when it is (not) picked."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from pomona.cli.commands import run
from pomona.data.images import load_image
from pomona.data.preprocessing import Preprocessing, create_eval_transform_np
from pomona.inference.engine import EngineError, OnnxEngine, iter_batches
from pomona.inference.export import ExportError, export_run
from pomona.inference.loaded import choose_engine, load_run
from pomona.inference.runfolder import sha256_file

from conftest import GROCERY, SERVE_CLASSES, held_out_photo


def _real_batch(run_dir, n_per_class=3) -> np.ndarray:
    transform = create_eval_transform_np(load_run(run_dir).preprocessing)
    paths = [held_out_photo(c, i) for c in SERVE_CLASSES for i in range(n_per_class)]
    return np.stack([transform(load_image(p)) for p in paths])


def test_onnx_export_matches_pytorch_on_real_photos(apple_run):
    info = json.loads((apple_run / "export.json").read_text())["onnx"]
    assert info["max_abs_diff"] <= 1e-3 and info["argmax_agree"]
    assert info["classes"] == SERVE_CLASSES and info["preprocessing"]["input_size"] == 128
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(apple_run / "model.onnx")).metadata_props}
    assert json.loads(meta["pomona.classes"]) == SERVE_CLASSES

    x = _real_batch(apple_run)  # independent of export's own check: real photos, batch of 6
    model = load_run(apple_run, engine="torch").model
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = OnnxEngine(apple_run / "model.onnx").logits(x)
    assert np.abs(got - expected).max() < 1e-3
    assert (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_export_to_other_folder(apple_run, tmp_path, capsys):
    out = tmp_path / "ts"
    assert run(["export", str(apple_run), "--format", "torchscript", "--out", str(out)]) == 0
    assert "max |torchscript - PyTorch| logit difference" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["classes"] == SERVE_CLASSES  # the folder is self-contained
    info = json.loads((out / "export.json").read_text())["torchscript"]
    assert info["max_abs_diff"] <= 1e-3
    x = _real_batch(apple_run, 1)
    model = load_run(apple_run, engine="torch").model
    with torch.no_grad():
        scripted = torch.jit.load(str(out / "model.torchscript.pt"))(torch.from_numpy(x))
        assert torch.allclose(scripted, model(torch.from_numpy(x)), atol=1e-3)


def test_export_refuses_an_export_that_disagrees(apple_run, tmp_path, monkeypatch):
    import pomona.inference.export as export_module

    real_export = export_module.export_onnx

    def export_broken(model, example, path, opset=17, metadata=None):
        broken = load_run(apple_run, engine="torch").model
        with torch.no_grad():
            broken.head[-1].bias += 0.5  # what a wrong conversion would look like: shifted logits
        real_export(broken, example, path, opset, metadata)

    monkeypatch.setattr(export_module, "export_onnx", export_broken)
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        export_run(apple_run, "onnx", out=tmp_path / "x")
    assert not list((tmp_path / "x").glob("*model.onnx*"))  # nothing left behind, not even a temporary file


def test_predict_uses_onnx_when_exported_and_matches_torch(apple_run, tmp_path, capsys):
    photos = [held_out_photo(c, i) for c in SERVE_CLASSES for i in range(3)]
    (tmp_path / "empty.jpg").write_bytes(b"")
    paths = photos[:3] + [tmp_path / "empty.jpg"] + photos[3:]
    fast, slow = load_run(apple_run), load_run(apple_run, engine="torch")
    assert fast.engine_name == "onnx" and slow.engine_name == "torch"
    a, b = fast.predict(paths), slow.predict(paths)
    assert np.isnan(a.probs[3]).all() and "empty" in a.bad[str(tmp_path / "empty.jpg")]
    assert np.allclose(np.delete(a.probs, 3, 0), np.delete(b.probs, 3, 0), atol=1e-4)
    assert [l for l in a.labels if l] == [p.parent.name for p in photos]  # held-out photos, right varieties

    out = tmp_path / "preds.csv"
    assert run(["predict", str(apple_run), *map(str, paths), "--engine", "onnx", "--out", str(out)]) == 0
    frame = pd.read_csv(out, keep_default_na=False)
    assert frame["label"].tolist() == a.labels and frame["error"].tolist()[3].startswith("empty")


def test_stale_or_missing_export_is_not_used(apple_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(apple_run, copy)
    assert choose_engine(copy) == "onnx"
    state = load_file(str(copy / "model.safetensors"))
    state["head.1.bias"] = state["head.1.bias"] + 1  # the run was trained further after the export
    save_file(state, str(copy / "model.safetensors"))
    info = json.loads((copy / "run.json").read_text())  # (training records the new weights' SHA-256 in run.json)
    info["member_sha256"] = [sha256_file(copy / "model.safetensors")]
    (copy / "run.json").write_text(json.dumps(info))
    assert choose_engine(copy) == "torch"
    with pytest.raises(EngineError, match="exported from other weights"):
        choose_engine(copy, "onnx")
    (copy / "model.onnx").unlink()
    assert run(["predict", str(copy), str(held_out_photo("Pink-Lady")), "--engine", "onnx"]) == 2
    assert "pomona export" in capsys.readouterr().err


def test_iter_batches_keeps_order_and_reports_bad_files(apple_run, tmp_path):
    pre = Preprocessing.from_dict(json.loads((apple_run / "run.json").read_text())["preprocessing"])
    good = sorted((GROCERY / "val" / "Pink-Lady").iterdir())[:5]
    (tmp_path / "junk.jpg").write_text("no image")
    paths = [str(p) for p in good[:2]] + [str(tmp_path / "junk.jpg")] + [str(p) for p in good[2:]]
    batches = list(iter_batches(paths, pre, 64_000_000, batch_size=2, workers=2, prefetch=1))
    indices = [i for idx, _, _ in batches for i in idx]
    assert indices == [0, 1, 3, 4, 5]
    assert [x.shape for _, x, _ in batches if x is not None][0] == (2, 3, 128, 128)
    bad = {k: v for _, _, b in batches for k, v in b.items()}
    assert bad == {str(tmp_path / "junk.jpg"): "not an image"}


def test_predict_json_globs_batch_size_and_missing_photos(apple_run, capsys):
    pattern = str(GROCERY / "val" / "Pink-Lady" / "*.jpg")  # quoted on a shell: pomona expands it
    assert run(["predict", str(apple_run), pattern, "--format", "json", "--batch-size", "2", "--top-k", "1"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in records] == sorted(str(p) for p in (GROCERY / "val" / "Pink-Lady").glob("*.jpg"))
    assert all(len(r["top"]) == 1 and r["label"] in SERVE_CLASSES for r in records)
    assert run(["predict", str(apple_run), str(GROCERY / "val" / "Pink-Lady" / "*.png")]) == 2
    assert "no file matches" in capsys.readouterr().err
    assert run(["predict", str(apple_run), str(GROCERY / "val" / "no-such-photo.jpg")]) == 2
    assert "photo not found" in capsys.readouterr().err


def test_python_api_load_run_predict(apple_run):
    import pomona

    run_ = pomona.load_run(apple_run)
    preds = run_.predict([held_out_photo("Granny-Smith"), held_out_photo("Pink-Lady")])
    assert preds.labels == ["Granny-Smith", "Pink-Lady"] and run_.classes == SERVE_CLASSES
    assert preds.top_k(1)[0][0][0] == "Granny-Smith" and len(run_.info["members"]) == 1
