"""Low-precision CPU engines: onnx-int8 (static quantisation calibrated on the run's training photos) and
torch-bf16 (bfloat16 autocast), their parity with fp32 recorded by `pomona export`, and `--engine auto` using
one only when its parity passes."""

import json
import shutil

import numpy as np
import pytest

import pomona.checkpoint as checkpoint
from pomona.checkpoint import choose_engine, load_run, parity_passes, sha256_file
from pomona.cli import run
from pomona.engine import EngineError
from pomona.export import export_run

from conftest import SERVE_CLASSES, held_out_photo


@pytest.fixture(scope="module")
def low_precision_run(apple_run, tmp_path_factory):
    """A copy of the exported apple_run with both low-precision exports (the session's apple_run stays fp32)."""
    copy = tmp_path_factory.mktemp("low_precision") / "run"
    shutil.copytree(apple_run, copy)
    assert run(["export", str(copy), "--format", "onnx-int8", "--calibration", "8"]) == 0
    export_run(copy, "torch-bf16")
    return copy


def _photos() -> list:
    return [held_out_photo(c, i) for c in SERVE_CLASSES for i in range(3)]


def test_int8_export_records_parity_and_predicts_like_fp32(low_precision_run):
    info = json.loads((low_precision_run / "export.json").read_text())
    entry = info["onnx-int8"]
    assert (low_precision_run / "model.int8.onnx").is_file() and entry["path"] == "model.int8.onnx"
    parity = entry["parity"]
    assert parity["n"] == 4 and "split.csv" in parity["photos"]  # the run's validation photos
    assert {"top1_agreement", "macro_f1", "macro_f1_fp32", "macro_f1_diff", "max_prob_diff"} <= set(parity)
    assert entry["passed"] == parity_passes(entry)[0] and entry["details"]["calibration_photos"] == 8
    assert entry["source_sha256"] == info["onnx"]["source_sha256"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(low_precision_run / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantised
    fast = load_run(low_precision_run, engine="onnx-int8", tta=False)
    ref = load_run(low_precision_run, engine="torch", tta=False)
    a, b = fast.predict(_photos()), ref.predict(_photos())
    assert a.labels == b.labels == [p.parent.name for p in _photos()]
    assert np.abs(a.probs - b.probs).max() < 0.25  # 8 calibration photos, a 2-class head trained at lr 1e-2


def test_bf16_export_records_parity(low_precision_run):
    entry = json.loads((low_precision_run / "export.json").read_text())["torch-bf16"]
    assert entry["path"] == "" and entry["parity"]["n"] == 4 and "cpu_bf16_native" in entry["details"]
    assert entry["passed"] == parity_passes(entry)[0]


def _set_parity(run_dir, fmt: str, **values) -> None:
    path = run_dir / "export.json"
    info = json.loads(path.read_text())
    info[fmt]["parity"].update(values)
    path.write_text(json.dumps(info))


def test_auto_uses_a_low_precision_engine_only_when_its_parity_passes(low_precision_run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(low_precision_run, copy)
    monkeypatch.setattr(checkpoint, "cpu_supports_bf16", lambda: True)
    _set_parity(copy, "onnx-int8", top1_agreement=1.0, macro_f1_diff=0.0)
    _set_parity(copy, "torch-bf16", top1_agreement=1.0, macro_f1_diff=0.0)
    assert choose_engine(copy) == "onnx-int8"
    _set_parity(copy, "onnx-int8", top1_agreement=0.98)  # one photo in 50 changes class: fails the gate
    assert choose_engine(copy) == "torch-bf16"
    assert choose_engine(copy, "onnx-int8") == "onnx-int8"  # asked for by name: used all the same
    _set_parity(copy, "torch-bf16", macro_f1_diff=-0.01)
    assert choose_engine(copy) == "onnx"  # both fail: fp32 ONNX Runtime
    loaded = load_run(copy)
    assert loaded.engine_name == "onnx" and loaded._onnx.path.name == "model.onnx"
    _set_parity(copy, "torch-bf16", macro_f1_diff=0.004)
    monkeypatch.setattr(checkpoint, "cpu_supports_bf16", lambda: False)  # a CPU without native bfloat16
    assert choose_engine(copy) == "onnx"
    with pytest.raises(EngineError, match="bfloat16"):
        choose_engine(copy, "torch-bf16")


def classes_of(run_dir):
    return json.loads((run_dir / "run.json").read_text())["classes"]


def test_stale_low_precision_exports_are_not_used(low_precision_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "run"
    shutil.copytree(low_precision_run, copy)
    _set_parity(copy, "onnx-int8", top1_agreement=1.0, macro_f1_diff=0.0)
    assert choose_engine(copy) == "onnx-int8"
    state = load_file(str(copy / "model.safetensors"))
    state["head.1.bias"] = state["head.1.bias"] + 1  # trained further after the exports
    save_file(state, str(copy / "model.safetensors"), metadata={"pomona.classes": json.dumps(classes_of(copy))})
    info = json.loads((copy / "run.json").read_text())  # as training further rewrites run.json
    info["member_sha256"] = [sha256_file(copy / "model.safetensors")]
    (copy / "run.json").write_text(json.dumps(info))
    assert choose_engine(copy) == "torch"
    with pytest.raises(EngineError, match="other weights"):
        choose_engine(copy, "onnx-int8")
    assert run(["predict", str(copy), str(held_out_photo("Pink-Lady")), "--engine", "torch-bf16"]) == 2
    assert "export again" in capsys.readouterr().err


def test_predict_and_serve_settings_take_the_new_engines(low_precision_run, capsys):
    assert run(["predict", str(low_precision_run), *map(str, _photos()), "--engine", "onnx-int8",
                "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in records] == [p.parent.name for p in _photos()]
    from pomona.engine import cpu_supports_bf16

    code = run(["predict", str(low_precision_run), str(_photos()[0]), "--engine", "torch-bf16"])
    assert code == (0 if cpu_supports_bf16() else 2)
