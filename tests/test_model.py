import pytest
import torch
from PIL import Image

from pomona.data.preprocessing import create_eval_transform, create_resize, resolve_preprocessing
from pomona.models.model import (Head, WeightsError, convert_lite_state_dict, create_backbone, create_model,
                                 packaged_weights_file, read_state_dict)

from conftest import GROCERY, requires_grocery


def test_lite0_package_weights_map_strictly():
    import timm

    model = timm.create_model("tf_efficientnet_lite0")
    state = convert_lite_state_dict(read_state_dict(packaged_weights_file("tf_efficientnet_lite0")), model)
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)


@requires_grocery
def test_offline_imagenet_head_calls_granny_smith_948():
    model = create_backbone("tf_efficientnet_lite0", "package", num_classes=1000).eval()
    pre = resolve_preprocessing(model)
    assert pre.input_size == 224 and pre.mean == (0.5, 0.5, 0.5)
    path = sorted((GROCERY / "train" / "Granny-Smith").iterdir())[0]
    x = create_eval_transform(pre)(create_resize(pre)(Image.open(path).convert("RGB")))[None]
    with torch.no_grad():
        top = model(x).softmax(-1).topk(3)
    assert top.indices[0, 0].item() == 948  # ImageNet 'Granny Smith'


def test_head_shapes_and_plain_linear_head():
    head = Head(1280, 5, out_features=600, dropout=0.4)
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert head[0].out_features == 600 and head[2].p == 0.4 and head[3].out_features == 5
    plain = Head(1280, 5, out_features=0)
    assert [type(m).__name__ for m in plain] == ["Dropout", "Linear"]


def test_create_model_offline_default_and_freeze():
    model = create_model("tf_efficientnet_lite0", num_classes=4, weights="auto")
    reference = create_backbone("tf_efficientnet_lite0", "package")
    assert torch.equal(model.backbone.conv_stem.weight, reference.conv_stem.weight)  # pretrained, not random
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    model.set_backbone_trainable(False)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_weights_errors_are_clear(tmp_path):
    with pytest.raises(WeightsError, match="no packaged offline weights"):
        create_model("efficientnet_b0", 3, weights="package")
    with pytest.raises(WeightsError, match="not found"):
        create_model("test_efficientnet", 3, weights=str(tmp_path / "nope.pth"))
    torch.save({"junk.weight": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(WeightsError, match="do not fit"):
        create_model("test_efficientnet", 3, weights=str(tmp_path / "junk.pth"))


def test_weights_from_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    source = create_backbone("test_efficientnet", "none", num_classes=1000)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = create_model("test_efficientnet", 3, weights=str(tmp_path / "w.safetensors"))
    assert torch.equal(model.backbone.conv_stem.weight, source.conv_stem.weight)


def test_offline_a_model_without_packaged_weights_fails_at_once_with_the_fix(monkeypatch, tmp_path):
    import time

    import pomona.models.model as model
    from pomona.cli.commands import run

    monkeypatch.setattr(model, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(model.WeightsError, match="--weights FILE"):
        model.create_backbone("efficientnet_b0", "auto")
    assert time.perf_counter() - start < 5
    grocery = GROCERY
    code = run(["train", "--data", str(grocery / "train"), "--model", "efficientnet_b0", "--out", str(tmp_path / "r")])
    assert code == 2 and not (tmp_path / "r").exists()
    model.create_backbone("tf_efficientnet_lite0", "auto")  # packaged weights need no hub
