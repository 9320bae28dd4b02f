"""The parts of the training recipe: the probe that starts the head (LP-FT), batch-norm statistics kept while
fine-tuning, WiSE-FT, which epoch is kept, hue-keeping photometric augmentation and the decoded-image size."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pomona.config import TrainConfig
from pomona.data.augment import AugmentSpec, augment_spec
from pomona.data.preprocessing import ColourAugment, Preprocessing, create_eval_transform, create_train_transform
from pomona.inference.runfolder import PROBE_WEIGHTS
from pomona.models.model import create_model
from pomona.training.datasets import DecodedImages
from pomona.training.steps import train_one_epoch
from pomona.training.train import train_and_evaluate

from conftest import tiny_config


def _cfg(data, val, **train):
    cfg = tiny_config(**train)
    cfg.data.data_dir, cfg.data.val_data = str(data), str(val)
    cfg.train.probe_epochs = 3
    return cfg


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k or "running_var" in k}


def test_freeze_bn_keeps_the_running_statistics():
    model = create_model("test_efficientnet", 3, 16, 0.3, weights="none")
    before, weights = _bn_buffers(model), {k: v.clone() for k, v in model.named_parameters()}
    x, y = torch.randn(16, 3, 64, 64) * 3 + 1, torch.randint(0, 3, (16,))
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss = torch.nn.CrossEntropyLoss()
    train_one_epoch(model, loader, opt, sched, loss, torch.device("cpu"), False, False, freeze_bn=True)
    after = _bn_buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(weights[k], v) for k, v in model.named_parameters())  # it did train
    train_one_epoch(model, loader, opt, sched, loss, torch.device("cpu"), False, False, freeze_bn=False)
    assert any(not torch.equal(before[k], v) for k, v in _bn_buffers(model).items())


def test_probe_starts_the_head_and_wise_alpha_zero_keeps_the_probe(grocery_small, grocery_val_small, tmp_path):
    cfg = _cfg(grocery_small, grocery_val_small, wise_alpha=0.0, lr=0.05)
    cfg.seed = 3
    train_and_evaluate(cfg, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert 0 <= info["probe_val_macro_f1"] <= 1 and info["wise_alpha"] == 0.0
    assert info["keep"] == "last" and info["kept_epoch"] == 0 and info["selected_on"] is None
    kept, probe = load_file(str(tmp_path / "run" / "model.safetensors")), load_file(str(tmp_path / "run" / PROBE_WEIGHTS))
    assert all(torch.allclose(kept[k].float(), probe[k].float(), atol=1e-6) for k in kept)
    # the probe trained the head: it is no longer the initial head of the same seed
    torch.manual_seed(cfg.seed)
    fresh = create_model("test_efficientnet", 3, 16, cfg.model.dropout, weights="none").state_dict()
    assert not torch.allclose(fresh["head.0.weight"], probe["head.0.weight"])


def test_keep_best_selects_on_validation_and_says_so(grocery_small, grocery_val_small, tmp_path):
    cfg = _cfg(grocery_small, grocery_val_small, epochs=2, keep="best", head_init="random")
    result = train_and_evaluate(cfg, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert info["selected_on"] == "val" and info["keep"] == "best"
    assert info["kept_epoch"] == result.kept_epoch
    assert result.kept_macro_f1 == pytest.approx(history["val_macro_f1"].max())
    assert not (tmp_path / "run" / PROBE_WEIGHTS).exists()


def test_photometric_keeps_hue_and_range():
    torch.manual_seed(0)
    patch = torch.zeros(3, 32, 32, dtype=torch.uint8)
    patch[0], patch[1], patch[2] = 200, 120, 40  # an orange apple
    op = ColourAugment(AugmentSpec(photometric=1.0))

    def hue(x):
        r, g, b = (x[i].float().mean() for i in range(3))
        return float(torch.atan2(np.sqrt(3) * (g - b), 2 * r - g - b))

    changed = [op(patch) for _ in range(20)]
    assert all(0 <= float(c.min()) and float(c.max()) <= 255 for c in changed)
    assert any(abs(float(c.mean()) - float(patch.float().mean())) > 5 for c in changed)  # it does change
    assert max(abs(hue(c) - hue(patch)) for c in changed) < 0.03  # radians: the hue stays orange


def test_train_transform_with_every_option_gives_a_normalised_crop():
    pre = Preprocessing(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    t = TrainConfig(photometric=1.0, white_balance=0.05, blur=1.0, jpeg=1.0, noise=1.0, random_erasing=1.0,
                    rot90=0.5, colour_jitter=0.2)
    x = torch.randint(0, 256, (3, 150, 200), dtype=torch.uint8)
    out = create_train_transform(pre, augment_spec(t))(x)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    preview = create_train_transform(pre, augment_spec(t), normalize=False)(x)
    assert preview.dtype == torch.uint8 and preview.shape == (3, 64, 64)
    assert preview.float().mean() > 40  # colour jitter after the other colour operations keeps the 0-255 range


def test_cache_keeps_photos_larger_and_evaluation_resizes_them(grocery_small):
    pre = Preprocessing(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    photo = str(next(grocery_small.rglob("*.jpg")))
    small, large = DecodedImages(pre), DecodedImages(pre, max_side=2 * pre.resize_size)
    assert min(small.get(photo).shape[1:]) == pre.resize_size
    assert min(large.get(photo).shape[1:]) == 2 * pre.resize_size
    evaluate = create_eval_transform(pre)
    a, b = evaluate(small.get(photo)), evaluate(large.get(photo))
    assert a.shape == b.shape == (3, 64, 64) and float((a - b).abs().mean()) < 0.05
