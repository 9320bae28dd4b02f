"""Low-precision CPU engines: onnx-int8 (static quantisation calibrated on the run's training photos) and
torch-bf16 (bfloat16 autocast), their parity with fp32 recorded by `pomona export`, and `--engine auto` using
one only when its parity passes."""

import json
import shutil

import numpy as np
import pytest

import pomona.inference.loaded as loading
from pomona.cli.commands import run
from pomona.inference.engine import EngineError
from pomona.inference.export import export_run
from pomona.inference.loaded import choose_engine, load_run, parity_passes
from pomona.inference.runfolder import sha256_file

from conftest import GROCERY, SERVE_CLASSES, _link_subset, held_out_photo


@pytest.fixture(scope="module")
def parity_photos(apple_run, tmp_path_factory):
    """24 labelled shop photos apple_run never trained on (it trained on the first 8 of each class)."""
    return _link_subset(GROCERY / "train", tmp_path_factory.mktemp("parity") / "photos", SERVE_CLASSES, 12, start=20)


@pytest.fixture(scope="module")
def low_precision_run(apple_run, parity_photos, tmp_path_factory):
    """A copy of the exported apple_run with both low-precision exports (the session's apple_run stays fp32)."""
    copy = tmp_path_factory.mktemp("low_precision") / "run"
    shutil.copytree(apple_run, copy)
    assert run(["export", str(copy), "--format", "onnx-int8", "--calibration", "8", "--parity-data",
                str(parity_photos)]) == 0
    export_run(copy, "torch-bf16", parity_data=parity_photos)
    return copy


def _photos() -> list:
    return [held_out_photo(c, i) for c in SERVE_CLASSES for i in range(3)]


def _measured_parity(run_dir, engine: str, folder) -> dict:
    """Parity computed here, independently of `pomona export`: the real fp32 model's probabilities and the
    low-precision engine's, one view, on every photo of `folder`."""
    from sklearn.metrics import f1_score

    from pomona.data.index import index_folder

    table = index_folder(folder)
    fp32 = load_run(run_dir, engine="torch", tta=False).predict(list(table["path"])).probs
    low = load_run(run_dir, engine=engine, tta=False).predict(list(table["path"])).probs
    y = [SERVE_CLASSES.index(c) for c in table["label"]]
    f1 = [f1_score(y, p.argmax(1), average="macro") for p in (fp32, low)]
    return {"n": len(y), "top1_agreement": float(np.mean(fp32.argmax(1) == low.argmax(1))), "macro_f1_fp32": f1[0],
            "macro_f1": f1[1], "max_prob_diff": float(np.abs(fp32 - low).max())}


def _check_recorded_parity(entry: dict, measured: dict) -> None:
    """The recorded parity is what fp32 and the engine really do, and `passed` is the gate applied to it."""
    parity = entry["parity"]
    assert parity["n"] == measured["n"] == 24 and "--parity-data" in parity["photos"]
    assert measured["max_prob_diff"] > 0  # the candidate really is another computation than fp32
    assert parity["max_prob_diff"] == pytest.approx(measured["max_prob_diff"], abs=1e-3)
    assert parity["top1_agreement"] == pytest.approx(measured["top1_agreement"], abs=1e-9)
    for key in ("macro_f1_fp32", "macro_f1"):
        assert parity[key] == pytest.approx(measured[key], abs=1e-9)
    gate = measured["top1_agreement"] >= loading.PARITY_MIN_TOP1_AGREEMENT and \
        abs(measured["macro_f1"] - measured["macro_f1_fp32"]) <= loading.PARITY_MAX_MACRO_F1_DIFF
    assert entry["passed"] is gate
    assert "fewer than 200" in parity["warning"]  # 24 photos: measured, with a warning


def test_int8_export_records_parity_and_predicts_like_fp32(low_precision_run, parity_photos):
    info = json.loads((low_precision_run / "export.json").read_text())
    entry = info["onnx-int8"]
    assert (low_precision_run / "model.int8.onnx").is_file() and entry["path"] == "model.int8.onnx"
    _check_recorded_parity(entry, _measured_parity(low_precision_run, "onnx-int8", parity_photos))
    assert entry["details"]["calibration_photos"] == 8
    assert entry["source_sha256"] == info["onnx"]["source_sha256"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(low_precision_run / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantised
    fast = load_run(low_precision_run, engine="onnx-int8", tta=False)
    ref = load_run(low_precision_run, engine="torch", tta=False)
    a, b = fast.predict(_photos()), ref.predict(_photos())
    assert a.labels == b.labels == [p.parent.name for p in _photos()]
    assert np.abs(a.probs - b.probs).max() < 0.25  # 8 calibration photos, a 2-class head trained at lr 1e-2


def test_bf16_export_records_parity(low_precision_run, parity_photos, monkeypatch):
    entry = json.loads((low_precision_run / "export.json").read_text())["torch-bf16"]
    assert entry["path"] == "" and "cpu_bf16_native" in entry["details"]
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: True)  # bfloat16 autocast runs (emulated) anyway
    _check_recorded_parity(entry, _measured_parity(low_precision_run, "torch-bf16", parity_photos))


def test_parity_needs_enough_held_out_photos_and_never_training_ones(apple_run, parity_photos, tmp_path, capsys):
    copy = shutil.copytree(apple_run, tmp_path / "run")
    assert run(["export", str(copy), "--format", "torch-bf16"]) == 2  # its split holds 4 validation photos
    err = capsys.readouterr().err
    assert "at least 20 held-out photos" in err and "has 4" in err and "--parity-data" in err
    trained = sorted((GROCERY / "train" / "Pink-Lady").iterdir())[0]  # one of apple_run's 16 training photos
    for how in ("link", "copy"):
        folder = shutil.copytree(parity_photos, tmp_path / f"with-{how}", symlinks=True)
        if how == "link":
            (folder / "Pink-Lady" / "again.jpg").symlink_to(trained)
        else:
            shutil.copyfile(trained, folder / "Pink-Lady" / "renamed-copy.jpg")
        assert run(["export", str(copy), "--format", "torch-bf16", "--parity-data", str(folder)]) == 2
        assert "holds 1 of the run's training photos" in capsys.readouterr().err
    assert not (copy / "export.json").read_text().count("torch-bf16")  # nothing recorded by the refused exports
    assert run(["export", str(copy), "--format", "torch-bf16", "--parity-data", str(parity_photos)]) == 0
    captured = capsys.readouterr()
    assert "warning: parity measured on only 24 held-out photos (fewer than 200)" in captured.err
    assert "on 24 held-out photos" in captured.out
    parity = json.loads((copy / "export.json").read_text())["torch-bf16"]["parity"]
    assert parity["n"] == 24 and "fewer than 200" in parity["warning"]


def test_the_gate_refuses_parity_on_too_few_photos():
    good = {"n": 200, "top1_agreement": 1.0, "macro_f1_diff": 0.0}
    assert parity_passes({"parity": good}) == (True, "")
    passed, why = parity_passes({"parity": {**good, "n": 19}})
    assert not passed and "only 19 photos" in why and "--parity-data" in why
    assert parity_passes({"parity": {**good, "n": 20}})[0]


def _set_parity(run_dir, fmt: str, **values) -> None:
    path = run_dir / "export.json"
    info = json.loads(path.read_text())
    info[fmt]["parity"].update(values)
    path.write_text(json.dumps(info))


def _set_speed(run_dir, **img_s) -> None:
    path = run_dir / "export.json"
    info = json.loads(path.read_text())
    for fmt, value in img_s.items():
        info[fmt.replace("_", "-")]["details"]["img_s"] = value
    path.write_text(json.dumps(info))


def test_every_export_is_timed_and_auto_takes_the_fastest_that_passes(low_precision_run, tmp_path, monkeypatch):
    info = json.loads((low_precision_run / "export.json").read_text())
    assert all(info[f]["details"]["img_s"] > 0 for f in ("onnx", "onnx-int8", "torch-bf16"))  # measured
    copy = shutil.copytree(low_precision_run, tmp_path / "run")
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: True)
    _set_parity(copy, "onnx-int8", top1_agreement=1.0, macro_f1_diff=0.0)
    _set_parity(copy, "torch-bf16", top1_agreement=1.0, macro_f1_diff=0.0)
    _set_speed(copy, onnx=100.0, onnx_int8=150.0, torch_bf16=200.0)
    assert choose_engine(copy) == "torch-bf16"  # the fastest on this machine, parity passing
    _set_speed(copy, torch_bf16=90.0)
    assert choose_engine(copy) == "onnx-int8"
    _set_parity(copy, "onnx-int8", top1_agreement=0.98)
    assert choose_engine(copy) == "onnx"  # int8 fails its gate; fp32 ONNX beats bf16 here


def test_export_with_no_format_makes_every_cpu_engine(apple_run, parity_photos, tmp_path, capsys):
    copy = shutil.copytree(apple_run, tmp_path / "run")
    assert run(["export", str(copy), "--calibration", "8", "--parity-data", str(parity_photos)]) == 0
    out = capsys.readouterr().out
    info = json.loads((copy / "export.json").read_text())
    made = {"onnx", "onnx-int8"} | ({"torch-bf16"} if loading.cpu_supports_bf16() else set())
    assert made <= set(info) and "--engine auto (predict, serve) now uses" in out
    assert f"now uses {choose_engine(copy)}:" in out


def test_layer_groups_cover_every_node_once_and_each_holds_a_layer(apple_run):
    import onnx

    from pomona.inference.onnx_io import WEIGHTED_OPS, layer_groups

    groups = layer_groups(apple_run / "model.onnx")
    nodes = {n.name: n.op_type for n in onnx.load(str(apple_run / "model.onnx")).graph.node}
    names = [n for members in groups.values() for n in members]
    assert sorted(names) == sorted(nodes)  # every node, once
    assert all(any(nodes[n] in WEIGHTED_OPS for n in members) for members in groups.values())
    assert any(g.endswith("blocks.0") for g in groups) and any("conv_stem" in g for g in groups)
    assert len(groups) >= 9  # the stem, the 7 stages of Lite0, the head conv / classifier


def test_the_sensitivity_sweep_leaves_the_most_sensitive_layers_in_float(low_precision_run, tmp_path,
                                                                          monkeypatch):
    import onnx

    import pomona.inference.quantize as quantize
    from pomona.inference.export import calibration_photos
    from pomona.inference.engine import iter_batches
    from pomona.inference.onnx_io import layer_groups

    run_dir = low_precision_run
    loaded = load_run(run_dir, engine="torch", tta=False)
    photos = calibration_photos(run_dir, 16)
    calib = [x for _, x, _ in iter_batches(photos[::2], loaded.preprocessing, loaded.max_pixels, 8)]
    views = quantize.training_views(photos[1::2], loaded.preprocessing, loaded.info, loaded.max_pixels, views=2)
    assert sum(map(len, views)) == 16 and views[0].shape[1:] == (3, 128, 128)
    easy = quantize.quantize_with_sweep(run_dir / "model.onnx", tmp_path / "a.onnx", calib, views)
    if easy["views_agreement_all_int8"] >= loading.PARITY_MIN_TOP1_AGREEMENT:
        assert easy["float_layers"] == [] and "sweep" not in easy  # every layer int8: no sweep needed
    monkeypatch.setattr(quantize, "PARITY_MIN_TOP1_AGREEMENT", 1.01)  # no int8 model can agree enough: sweep
    found = quantize.quantize_with_sweep(run_dir / "model.onnx", tmp_path / "b.onnx", calib, views)
    groups = layer_groups(run_dir / "model.onnx")
    assert set(found["sweep"]) == set(groups) and 1 <= len(found["float_layers"]) <= len(groups) // 2
    first = min(found["sweep"], key=found["sweep"].get)
    assert found["float_layers"][0] == first  # the layer whose float copy helps most goes first
    assert found["views_error"] <= found["views_error_all_int8"]

    def quantised_convs(path):
        graph = onnx.load(str(path)).graph
        dequantised = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return {n.name for n in graph.node if n.op_type == "Conv" and n.input[1] in dequantised}

    float_convs = {n for g in found["float_layers"] for n in groups[g]} & quantised_convs(tmp_path / "a.onnx")
    assert float_convs and not float_convs & quantised_convs(tmp_path / "b.onnx")  # really left in float


def test_auto_uses_a_low_precision_engine_only_when_its_parity_passes(low_precision_run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(low_precision_run, copy)
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: True)
    _set_speed(copy, onnx=100.0, onnx_int8=150.0, torch_bf16=120.0)
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
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: False)  # a CPU without native bfloat16
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
    _set_speed(copy, onnx=100.0, onnx_int8=150.0, torch_bf16=120.0)
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
    from pomona.inference.engine import cpu_supports_bf16

    code = run(["predict", str(low_precision_run), str(_photos()[0]), "--engine", "torch-bf16"])
    assert code == (0 if cpu_supports_bf16() else 2)
